"""The summarize job on a tiny catalog with the test-only fake backend: keys skip unchanged
users, a changed history re-summarizes exactly that user, bad outputs are retried then flagged,
a SIGKILLed run resumes, import of existing summaries, and the CLI surface."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from click.testing import CliRunner
from embsum.index.catalog import Catalog
from embsum.index.summaries import training_summaries
from embsum.offline.cli import cli
from embsum.offline.summarize import import_file, summarize

from embsum.summarizer import Item, PromptTemplate, SummarizerConfig
from embsum.summarizer.fake import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
ITEMS = {f"b{i}": (f"{w.title()} of Yesterday", f"A story about {w}.") for i, w in
         enumerate(["trains", "whales", "kings", "gardens", "robots", "storms", "cooks", "spies"])}


def histories(n_users: int) -> dict[str, list[str]]:
    ids = sorted(ITEMS)
    return {f"u{u:02d}": [ids[(u + k) % len(ids)] for k in range(1 + u % 3)] for u in range(n_users)}


def build_catalog(path: Path, hist: dict[str, list[str]]) -> None:
    with Catalog(path) as cat:
        cat.upsert_items(pa.table({"item_id": list(ITEMS), "title": [t for t, _ in ITEMS.values()],
                                   "description": [d for _, d in ITEMS.values()]}))
        set_histories(cat, hist)


def set_histories(cat: Catalog, hist: dict[str, list[str]]) -> None:
    rows = [(u, i, p) for u, items in hist.items() for p, i in enumerate(items)]
    cat.upsert_interactions(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                      "position": pa.array([r[2] for r in rows], pa.int32())}),
                            replace_users=True)


def rows(cat: Catalog) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in cat.arrow("SELECT * FROM summaries ORDER BY user_id, created_at").to_pylist():
        out.setdefault(r["user_id"], []).append(r)
    return out


class CountingFake(FakeBackend):
    """The fake backend, recording which prompts it was asked for."""

    def __init__(self, config):
        super().__init__(config)
        self.prompts = []

    def generate(self, prompts, seed, temperature=0.0):
        self.prompts += list(prompts)
        return super().generate(prompts, seed, temperature)


def run_job(cat, config=None, template=None, **kw):
    config = config or SummarizerConfig(backend="test-fake", batch_size=3)
    template = template or PromptTemplate.load(item_token_budget=config.item_token_budget)
    backends = []

    def factory():
        backends.append(CountingFake(config))
        return backends[-1]

    counts = summarize(cat, config, template, factory, **kw)
    return counts, backends


def test_rerun_skips_unchanged_and_never_loads_the_model(db_file):
    build_catalog(db_file, histories(7))
    with Catalog(db_file) as cat:
        counts, backends = run_job(cat)
        assert counts == {"pending": 7, "written": 7, "flagged": 0, "retried": 0}
        assert len(backends[0].prompts) == 7
        first = rows(cat)
        assert all(len(v) == 1 and not v[0]["flagged"] and v[0]["backend"] == "test-fake" for v in first.values())
        assert set(training_summaries(cat)) == set(first)

        counts, backends = run_job(cat)
        assert counts["pending"] == 0 and backends == []  # nothing to do: no model load
        assert rows(cat) == first


def test_changed_history_resummarizes_exactly_that_user(db_file):
    hist = histories(6)
    build_catalog(db_file, hist)
    with Catalog(db_file) as cat:
        run_job(cat)
        before = rows(cat)
        set_histories(cat, {"u03": hist["u03"] + ["b7"]})
        counts, backends = run_job(cat)
        assert counts["pending"] == 1 and counts["written"] == 1
        assert len(backends[0].prompts) == 1 and "Spies of Yesterday" in backends[0].prompts[0].user
        after = rows(cat)
        assert {u: v for u, v in after.items() if u != "u03"} == {u: v for u, v in before.items() if u != "u03"}
        assert len(after["u03"]) == 2  # the old key's row stays; training uses the current one
        current = cat.users(["u03"]).column("history_hash")[0].as_py()
        assert after["u03"][1]["history_hash"] == current
        assert training_summaries(cat)["u03"] == after["u03"][1]["summary"]


def test_changed_prompt_or_model_resummarizes_everyone(db_file, tmp_path):
    build_catalog(db_file, histories(3))
    with Catalog(db_file) as cat:
        run_job(cat)
        assert run_job(cat, SummarizerConfig(backend="test-fake", model="fake-v2"))[0]["pending"] == 3
        assert run_job(cat, SummarizerConfig(backend="test-fake", item_token_budget=100))[0]["pending"] == 3
        edited = tmp_path / "prompt.txt"
        edited.write_text(PromptTemplate.load().text.replace("librarian", "bookseller"))
        counts, _ = run_job(cat, template=PromptTemplate.load(edited), limit=2)
        assert counts == {"pending": 2, "written": 2, "flagged": 0, "retried": 0}


def test_bad_output_is_retried_with_another_seed(db_file, monkeypatch):
    build_catalog(db_file, histories(4))
    monkeypatch.setenv("EMBSUM_TEST_FAKE_BAD", "echo")  # echo on the first attempt only
    with Catalog(db_file) as cat:
        counts, _ = run_job(cat)
        assert counts == {"pending": 4, "written": 4, "flagged": 0, "retried": 4}
        assert all(not r[0]["flagged"] and r[0]["summary"].startswith("Drawn to") for r in rows(cat).values())


def test_still_bad_after_retry_is_stored_flagged_and_never_a_target(db_file, monkeypatch):
    build_catalog(db_file, histories(3))
    with Catalog(db_file) as cat:
        monkeypatch.setenv("EMBSUM_TEST_FAKE_BAD", "always-echo")
        counts, _ = run_job(cat)
        assert counts["flagged"] == 3 and counts["retried"] == 3
        stored = rows(cat)
        assert all(r[0]["flagged"] and r[0]["flag_reason"].startswith("echo-only") for r in stored.values())
        assert all(r[0]["summary"] for r in stored.values())  # kept for inspection
        assert training_summaries(cat) == {}
        # A flagged user gets another chance on the next run (same key, the row is replaced).
        monkeypatch.delenv("EMBSUM_TEST_FAKE_BAD")
        counts, _ = run_job(cat)
        assert counts["pending"] == 3 and counts["flagged"] == 0
        assert all(len(v) == 1 and not v[0]["flagged"] for v in rows(cat).values())
        assert len(training_summaries(cat)) == 3


def test_user_without_item_text_is_flagged_without_a_model_call(db_file):
    build_catalog(db_file, {"u1": ["b1"]})
    with Catalog(db_file) as cat:
        # An interaction with an item that has no row in `items` (MIND's sampled files do that).
        cat.con.execute("INSERT INTO interactions (user_id, item_id, position) VALUES ('u2', 'missing', 0)")
        cat.refresh_users(["u2"])
        counts, backends = run_job(cat)
        assert counts["written"] == 2 and counts["flagged"] == 1
        assert rows(cat)["u2"][0]["flag_reason"] == "no item text"
        assert len(backends[0].prompts) == 1


def test_only_selected_users(db_file):
    build_catalog(db_file, histories(5))
    with Catalog(db_file) as cat:
        counts, _ = run_job(cat, user_ids=["u01", "u04", "nobody"])
        assert counts["written"] == 2 and set(rows(cat)) == {"u01", "u04"}


# -- import ----------------------------------------------------------------------------------------
def test_import_goodreads_style_file_matches_ingest_keys(db_file, tmp_path):
    build_catalog(db_file, histories(3))
    src = tmp_path / "users.jsonl"
    src.write_text("\n".join([
        json.dumps({"user_id": "u00", "history": [], "llm_interests": ["ballet", "love", "family"]}),
        json.dumps({"user_id": "u01", "llm_interests": []}),
        json.dumps({"user_id": "ghost", "llm_interests": ["x"]}),
        "{not json",
    ]) + "\n")
    with Catalog(db_file) as cat:
        counts = import_file(cat, src, SummarizerConfig(backend="import"))
        assert counts == {"written": 2, "flagged": 1, "rejected": 2}
        stored = rows(cat)
        assert stored["u00"][0]["summary"] == "ballet, love, family"
        assert stored["u00"][0]["model"] == "goodreads-llm_interests" and stored["u00"][0]["backend"] == "import"
        assert stored["u01"][0]["flagged"] and stored["u01"][0]["flag_reason"] == "empty"
        assert sorted(cat.arrow("SELECT reason FROM rejects").column("reason").to_pylist()) == [
            "bad_json", "unknown_user"]
        assert training_summaries(cat, backend="import") == {"u00": "ballet, love, family"}
        # Idempotent: a second import replaces the same keys.
        import_file(cat, src, SummarizerConfig(backend="import"))
        assert cat.count("summaries") == 2 and cat.count("rejects") == 2


def test_import_csv_with_summary_column(db_file, tmp_path):
    build_catalog(db_file, histories(2))
    src = tmp_path / "s.csv"
    src.write_text('user_id,summary\nu00,"Sea stories, whales and storms."\nu01,Whales of Yesterday\n')
    with Catalog(db_file) as cat:
        counts = import_file(cat, src, SummarizerConfig(backend="import", model="gpt-4o-2024"))
        assert counts["written"] == 2 and counts["flagged"] == 1  # u01's text only echoes a title
        assert rows(cat)["u00"][0]["model"] == "gpt-4o-2024"


# -- CLI -------------------------------------------------------------------------------------------
def invoke(db_file, *args, env=None):
    return CliRunner().invoke(cli, ["--db", str(db_file), "summarize", *args], env=env)


def test_cli_fake_backend_then_up_to_date(db_file, monkeypatch):
    build_catalog(db_file, histories(4))
    monkeypatch.setenv("EMBSUM_TEST_BACKENDS", "1")
    result = invoke(db_file, "--backend", "test-fake", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "summarized 4 users (0 flagged" in result.output
    result = invoke(db_file, "--backend", "test-fake")
    assert result.exit_code == 0 and "up to date" in result.output
    with Catalog(db_file, read_only=True) as cat:
        runs = cat.runs("summarize").to_pylist()
        assert [r["status"] for r in runs] == ["ok", "ok"]
        assert json.loads(runs[0]["counts"])["written"] == 4


def test_cli_user_errors_are_one_line(db_file, tmp_path, monkeypatch):
    build_catalog(db_file, histories(2))
    monkeypatch.delenv("EMBSUM_TEST_BACKENDS", raising=False)
    for args, message in [
        (["--backend", "test-fake"], "is not one of local, llamacpp, hf, http, import"),
        (["--backend", "hf"], "needs a model name or path"),
        (["--backend", "http", "--model", "m"], "--endpoint"),
        (["--backend", "import"], "needs --from FILE"),
        (["--backend", "hf", "--model", str(tmp_path / "nope")], "cannot load model"),
    ]:
        result = invoke(db_file, *args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_cli_http_endpoint_down_fails_the_run_cleanly(db_file, monkeypatch):
    import socket

    build_catalog(db_file, histories(2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-never-shown")
    result = invoke(db_file, "--backend", "http", "--endpoint", f"http://127.0.0.1:{port}", "--model", "m",
                    "--retries", "1", "--backoff", "0.01")
    assert result.exit_code == 1 and "cannot connect" in result.output
    assert "sk-secret-never-shown" not in result.output
    with Catalog(db_file, read_only=True) as cat:
        run = cat.runs("summarize").to_pylist()[-1]
        assert run["status"] == "failed" and "sk-secret" not in (run["args"] + (run["error"] or ""))


def test_cli_import_goodreads_folder(db_file, tmp_path):
    build_catalog(db_file, histories(2))
    folder = tmp_path / "gr"
    folder.mkdir()
    (folder / "users.jsonl").write_text(json.dumps({"user_id": "u00", "llm_interests": ["spies", "cooks"]}) + "\n")
    result = invoke(db_file, "--backend", "import", "--from", str(folder))
    assert result.exit_code == 0 and "imported 1 summaries (0 flagged, 0 rows rejected)" in result.output


def test_killed_run_resumes_where_it_stopped(db_file):
    """A real SIGKILL in the middle of a run: committed batches stay, the re-run does exactly
    the remaining users."""
    build_catalog(db_file, histories(12))
    env = {**os.environ, "EMBSUM_TEST_BACKENDS": "1", "EMBSUM_TEST_FAKE_SLEEP": "0.2",
           "EMBSUM_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "embsum.offline.cli", "-v", "--db", str(db_file), "summarize",
           "--backend", "test-fake", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    committed = 0
    try:
        for line in proc.stderr:  # the job logs each committed batch at debug level (-v)
            if "committed" in line:
                committed += 1
                if committed == 2:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
    finally:
        proc.kill()
        proc.wait()
    assert committed == 2 and proc.returncode == -signal.SIGKILL
    with Catalog(db_file, read_only=True) as cat:
        partial = cat.count("summaries")
        assert cat.runs("summarize").column("status").to_pylist() == ["running"]
    assert 4 <= partial < 12 and partial % 2 == 0  # whole batches only

    result = subprocess.run(cmd, check=False, cwd=ROOT, env={**env, "EMBSUM_TEST_FAKE_SLEEP": "0"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"summarized {12 - partial} users" in result.stdout
    with Catalog(db_file, read_only=True) as cat:
        assert cat.count("summaries") == 12
        assert int(cat.scalar("SELECT count(DISTINCT user_id) FROM summaries")) == 12


def test_length_bucketed_batches_write_each_summary_to_its_own_user(db_file):
    """Users of a window are regrouped by prompt length (1 to 3 items here): each batch holds
    similar lengths, and every row still carries the summary of that user's own prompt."""
    hist = histories(9)
    build_catalog(db_file, hist)
    config = SummarizerConfig(backend="test-fake", batch_size=3, bucket_window=3)
    batches = []

    class BatchRecorder(CountingFake):
        def generate(self, prompts, seed, temperature=0.0):
            batches.append([len(p.titles) for p in prompts])
            return super().generate(prompts, seed, temperature)

    template = PromptTemplate.load()
    with Catalog(db_file) as cat:
        counts = summarize(cat, config, template, lambda: BatchRecorder(config))
        stored = rows(cat)
    assert counts["written"] == 9 and counts["flagged"] == 0
    assert batches == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]  # users interleave 1, 2, 3 items in file order
    expected = FakeBackend(config)
    for user, history in hist.items():
        prompt = template.render([Item(*ITEMS[i]) for i in history])
        assert stored[user][0]["summary"] == expected.generate([prompt], config.seed)[0]
