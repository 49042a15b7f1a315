"""Index snapshots on disk: immutable version folders and a `CURRENT` pointer swapped by rename.

```
<root>/
  CURRENT                  the name of the live version (one line)
  v000007-<hash12>/        one immutable version
    manifest.json          format version, model hash, factory, counts, sizes of the files
    index.faiss            the FAISS index of the last full build (ids: item row * n + code, or
                           item row when pooled)
    items.parquet          row -> item_id, content_hash, live (False: removed, awaiting rebuild)
    cpe.npy, cpe_prime.npy the items' vectors by row at the last full build: the exact re-rank
                           needs no catalog
    overlay_rows.npy       (updates only) rows whose vectors changed or were added since then,
    overlay_cpe.npy, ...   and those vectors
```

An incremental update writes only what changed: the full build's three large files are
hard-linked into the new version (same inode, no copy; a copy where links are unsupported) and
the changed rows go to the overlay, cumulative since the full build (so a version is always
base + one overlay, and the overlay stays under `max_drift` of the catalog). A reader applies
the overlay when it loads: the base index loses the vectors of replaced and removed rows and
gains the overlay's live rows, giving exactly the index an in-place update would have written.

A writer fills `.tmp-<pid>-<rand>/`, fsyncs every file and the folder, renames the folder to
its version name, then writes `CURRENT` the same way (temp file, fsync, rename, fsync the
folder). A reader resolves `CURRENT` once and opens that version's files: a swap during or
after its load never changes what it holds, and a reload sees the new version. The newest
`keep` versions stay on disk so readers that resolved an older one can still open it (pruning
an old version only drops its links to shared files). A killed writer leaves only a temp
folder, removed by the next writer once its pid is gone.

Because the re-rank vectors travel with the index, a scoring process needs the catalog only
for the users' vectors: it never waits on a refresh that holds the catalog's write lock.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import failpoints
from .errors import StorageError

FORMAT_VERSION = 2  # 2: incremental versions carry an overlay over hard-linked base files
READABLE_FORMATS = (1, 2)  # a format-1 version is a format-2 one without an overlay
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
VECTOR_FILES = ("cpe.npy", "cpe_prime.npy")
OVERLAY_ROWS = "overlay_rows.npy"
OVERLAY_FILES = ("overlay_cpe.npy", "overlay_cpe_prime.npy")
BASE_FILES = (INDEX_FILE, *VECTOR_FILES)


class IndexFileError(StorageError):
    """A missing, truncated, foreign or unreadable index: one clear line for the user."""


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def current_version(root: str | Path) -> str | None:
    """The live version's folder name, or None without an index. Cheap: readers poll it."""
    try:
        return (Path(root) / CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


def versions(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v"))


class Staging:
    """A temp version folder being written; `commit()` makes it live atomically.

    Files are created under `path` by the caller (`file(name)` gives their path); each is
    fsynced and its size recorded in the manifest at commit, so a later truncation is caught.
    """

    def __init__(self, root: str | Path, model_hash: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_stale_temps()
        self.model_hash = model_hash
        self.path = self.root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()

    def file(self, name: str) -> Path:
        return self.path / name

    def link(self, src: Path) -> None:
        """Put the immutable file `src` into this version under its own name: a hard link (no
        bytes written), or a copy on a filesystem without them."""
        dst = self.file(src.name)
        try:
            os.link(src, dst)
        except FileNotFoundError:
            raise
        except OSError:  # no hard links on this filesystem
            shutil.copyfile(src, dst)

    def _clean_stale_temps(self) -> None:
        for p in self.root.glob(".tmp-*"):
            try:
                pid = int(p.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)

    def commit(self, manifest: dict, keep: int = 3) -> str:
        sizes = {}
        for f in sorted(self.path.iterdir()):
            fsync_path(f)
            sizes[f.name] = f.stat().st_size
        manifest = {**manifest, "format_version": FORMAT_VERSION, "model_hash": self.model_hash,
                    "files": sizes}
        man = self.path / MANIFEST
        man.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        fsync_path(man)
        fsync_path(self.path)
        failpoints.hit("snapshot.before_rename")
        seq = max([int(v[1:7]) for v in versions(self.root) if v[1:7].isdigit()] + [0]) + 1
        name = f"v{seq:06d}-{self.model_hash[:12]}"
        os.rename(self.path, self.root / name)
        fsync_path(self.root)
        failpoints.hit("snapshot.before_swap")
        tmp = self.root / f".{CURRENT}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / CURRENT)
        fsync_path(self.root)
        failpoints.hit("snapshot.after_swap")
        self._prune(keep, name)
        return name

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _prune(self, keep: int, live: str) -> None:
        old = [v for v in versions(self.root) if v != live]
        for v in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(self.root / v, ignore_errors=True)


def write_items_table(path: Path, items: pa.Table) -> None:
    pq.write_table(items, path)


def save_array(path: Path, x: np.ndarray, dtype=np.float32) -> None:
    np.save(path, np.ascontiguousarray(x, dtype=dtype), allow_pickle=False)


class RowVectors:
    """[rows, n, d] vectors by item row, indexed like a numpy array (int, slice, array of rows):
    the base arrays of the last full build (memory-mapped) under an overlay of the rows that
    updates replaced or appended since."""

    def __init__(self, base: np.ndarray, overlay: np.ndarray | None = None, overlay_rows: np.ndarray | None = None,
                 n_rows: int | None = None):
        self.base, self.overlay = base, overlay
        self.shape = (int(n_rows if n_rows is not None else base.shape[0]), *base.shape[1:])
        self.dtype = base.dtype
        self._where = None  # row -> position in the overlay, -1: in the base
        if overlay_rows is not None and len(overlay_rows):
            self._where = np.full(self.shape[0], -1, dtype=np.int64)
            self._where[overlay_rows] = np.arange(len(overlay_rows))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if self._where is None:
            return self.base[key]
        if isinstance(key, slice):
            rows = np.arange(*key.indices(self.shape[0]))
        else:
            rows = np.asarray(key, dtype=np.int64)
            rows = np.where(rows < 0, rows + self.shape[0], rows)
        flat = rows.reshape(-1)
        pos = self._where[flat]
        out = np.empty((len(flat), *self.shape[1:]), dtype=self.dtype)
        in_base = pos < 0
        out[in_base] = self.base[flat[in_base]]
        out[~in_base] = self.overlay[pos[~in_base]]
        return out.reshape(*rows.shape, *self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


@dataclass
class Snapshot:
    """One loaded version: the FAISS index, the row table and the re-rank vectors (memory-mapped,
    so only the rows a re-rank touches are read)."""

    root: Path
    version: str
    manifest: dict
    index: object  # faiss.Index
    items: pa.Table
    cpe: RowVectors
    cpe_prime: RowVectors
    overlay_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _row_of: dict | None = field(default=None, repr=False)

    @property
    def model_hash(self) -> str:
        return self.manifest["model_hash"]

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.items.column("live").to_numpy(zero_copy_only=False))

    def item_ids(self) -> list[str]:
        return self.items.column("item_id").to_pylist()

    def row_of(self) -> dict[str, int]:
        """item_id -> row, live rows only."""
        if self._row_of is None:
            ids = self.item_ids()
            self._row_of = {ids[r]: int(r) for r in self.live_rows()}
        return self._row_of


def _check_files(vdir: Path, manifest: dict) -> None:
    for name, size in manifest.get("files", {}).items():
        f = vdir / name
        if not f.exists():
            raise IndexFileError(f"index file {f} is missing: rebuild with `embsum index`")
        actual = f.stat().st_size
        if actual != size:
            raise IndexFileError(f"index file {f} is truncated or damaged ({actual} of {size} bytes):"
                                 " rebuild with `embsum index`")


def read_manifest(root: str | Path, version: str | None = None) -> tuple[str, dict]:
    root = Path(root)
    version = version or current_version(root)
    if version is None:
        raise IndexFileError(f"no index at {root}: build one with `embsum index`")
    path = root / version / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise IndexFileError(f"index version {root / version} is missing its manifest:"
                             " rebuild with `embsum index`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexFileError(f"index manifest {path} is unreadable ({err}): rebuild with `embsum index`") from None
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise IndexFileError(f"index at {root} has format {manifest.get('format_version')}, this embsum reads "
                             f"{', '.join(map(str, READABLE_FORMATS))}: rebuild with `embsum index`")
    return version, manifest


def check_model(root: str | Path, manifest: dict, model_hash: str | None) -> None:
    if model_hash is not None and manifest.get("model_hash") != model_hash:
        raise IndexFileError(
            f"index at {root} was built for model {str(manifest.get('model_hash'))[:12]}, not "
            f"{model_hash[:12]}: rebuild it with `embsum index` for this checkpoint")


def load(root: str | Path, model_hash: str | None = None, mmap: bool = True, gpu: bool = False) -> Snapshot:
    """Open the live version. Refuses (IndexFileError) an index of another model hash, a
    missing or truncated file, or one FAISS cannot read."""
    from .faiss_index import faiss_module, to_gpu

    faiss = faiss_module()
    root = Path(root)
    for attempt in range(3):  # the version resolved may be pruned under us by a swap: re-resolve
        version, manifest = read_manifest(root)
        check_model(root, manifest, model_hash)
        vdir = root / version
        try:
            _check_files(vdir, manifest)
            break
        except IndexFileError:
            if attempt == 2 or current_version(root) == version:
                raise
            time.sleep(0.05)
    try:
        index = faiss.read_index(str(vdir / INDEX_FILE))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise IndexFileError(f"cannot read index file {vdir / INDEX_FILE} ({first}): rebuild with "
                             "`embsum index`") from None
    try:
        items = pq.read_table(vdir / ITEMS_FILE)
        mode = "r" if mmap else None
        base = [np.load(vdir / f, mmap_mode=mode, allow_pickle=False) for f in VECTOR_FILES]
        has_overlay = OVERLAY_ROWS in manifest.get("files", {})
        overlay_rows = (np.load(vdir / OVERLAY_ROWS, allow_pickle=False) if has_overlay
                        else np.zeros(0, np.int64))
        overlay = [np.load(vdir / f, mmap_mode=mode, allow_pickle=False) for f in OVERLAY_FILES] if has_overlay \
            else [None, None]
    except (OSError, ValueError, pa.ArrowException) as err:
        raise IndexFileError(f"index version {vdir} is unreadable ({err}): rebuild with `embsum index`") from None
    cpe, cpe_prime = (RowVectors(b, o, overlay_rows, items.num_rows) for b, o in zip(base, overlay))
    if has_overlay:
        from .faiss_index import apply_overlay

        live = items.column("live").to_numpy(zero_copy_only=False)
        apply_overlay(index, manifest["n"], manifest["mode"], live, base[0].shape[0], overlay_rows, cpe.overlay)
    if "nprobe" in manifest and hasattr(index, "nprobe"):
        index.nprobe = int(manifest["nprobe"])
    if gpu:
        index = to_gpu(index)
    return Snapshot(root, version, manifest, index, items, cpe, cpe_prime, overlay_rows)
