"""WebDataset shards: writing one tar with its DALI index, the split manifest, and reading them back.

Layout of a split (see shared/DESIGN.md, "Data contract: shards"):

    <out>/<dataset>/<split>/<dataset>-<split>-000000.tar   samples: <key>.cls/.jpg/.json/.lbl
                            <dataset>-<split>-000000.idx   DALI webdataset index (wds2idx format v1.2)
                            manifest.json                  written last; a split without it is incomplete
                            .parts/                        per-shard results, used to resume

Per sample: `jpg` image bytes, `cls` label as ASCII integer (webdataset convention), `json` metadata,
`lbl` the same label as a little-endian int32 (DALI reads it as a fixed-width INT32 component; the
ASCII `cls` would come out as a variable-length byte array).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
PARTS_DIR = ".parts"
FORMAT = "inception-pipeline/webdataset-shards/v1"
# Tar members carry this fixed mtime (2000-01-01T00:00:00Z), uid/gid 0 and mode 0644, so that the same
# input and seed give byte-identical shards.
TAR_MTIME = 946684800
INDEX_VERSION = "v1.2"  # the format DALI's wds2idx writes
COMPONENT_ORDER = ("cls", "jpg", "json", "lbl")


class ShardError(Exception):
    """A shard set is incomplete or does not match its manifest."""


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}"


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes (one pass over the bytes)."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.pos = 0

    def write(self, b) -> int:
        self._f.write(b)
        self.sha.update(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos


@dataclass(frozen=True)
class ShardSample:
    key: str
    label: int
    jpg: bytes
    meta: dict

    def components(self) -> list[tuple[str, bytes]]:
        parts = {
            "cls": str(self.label).encode(),
            "jpg": self.jpg,
            "json": json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode(),
            "lbl": struct.pack("<i", self.label),
        }
        return [(ext, parts[ext]) for ext in COMPONENT_ORDER]


def write_tar(path: Path, samples: Iterable[ShardSample]) -> tuple[int, int, str, str]:
    """Write samples to `path` (USTAR tar). Returns (num_samples, bytes, sha256, DALI index text).

    The index is built from the offsets as they are written, in the exact format `wds2idx` produces
    (a test checks this against the tool), so no second pass over the tar is needed.
    """
    lines = []
    n = 0
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        with tarfile.open(fileobj=w, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                if "." in s.key or "/" in s.key:
                    raise ValueError(f"sample key {s.key!r} contains '.' or '/'")
                entry = []
                for ext, data in s.components():
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size = len(data)
                    info.mtime = TAR_MTIME
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    header_at = w.tell()
                    tar.addfile(info, io.BytesIO(data))
                    entry.append(f"{ext} {header_at + tarfile.BLOCKSIZE} {len(data)} {info.name}")
                lines.append(" ".join(entry))
                n += 1
        size = w.pos
        digest = w.sha.hexdigest()
        f.flush()
        os.fsync(f.fileno())  # on disk before anything names it complete (rename, part, manifest)
    index = f"{INDEX_VERSION} {n}\n" + "".join(line + "\n" for line in lines)
    return n, size, digest, index


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the folder: after a crash the file is old or new, whole."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        # file names read from disk may not be UTF-8: Python holds them with surrogate escapes, written
        # back here as the original bytes
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def dump_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


@dataclass
class SplitInfo:
    """A complete split, opened through its manifest."""

    dir: Path
    manifest: dict

    @property
    def tars(self) -> list[Path]:
        return [self.dir / s["name"] for s in self.manifest["shards"]]

    @property
    def index_files(self) -> list[Path]:
        return [self.dir / s["index"] for s in self.manifest["shards"]]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]


def open_split(split_dir: str | os.PathLike, verify: str = "size") -> SplitInfo:
    """Open a split by its manifest.

    verify: "none", "size" (every tar and index exists, tar sizes match; cheap) or "sha256" (also
    re-hash every tar). Raises ShardError naming the split or shard at fault. An s3:// split is opened
    from its node-local copy, fetched and sha256-checked first (`pipeline.data.s3shards.localize`; with
    "sha256" every cached tar is hashed again there).
    """
    if "://" in str(split_dir):
        from pipeline.data.s3shards import localize

        split_dir = localize(str(split_dir), verify="sha256" if verify == "sha256" else "stamp")
        verify = "size" if verify == "sha256" else verify  # just hashed
    d = Path(split_dir)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ShardError(f"{d}: no {MANIFEST}; the split is incomplete or not a shard set (rerun the shard job)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if verify not in ("none", "size", "sha256"):
        raise ValueError(f"verify must be none, size or sha256, not {verify!r}")
    for s in manifest.get("shards", []):  # names are joined to the split folder: plain file names only
        for key in ("name", "index"):
            name = str(s.get(key, ""))
            if not name or name != Path(name).name or name.startswith(".") or "\\" in name:
                raise ShardError(f"{mpath}: shard {key} {name!r} is not a plain file name in the split folder")
    if verify != "none":
        for s in manifest["shards"]:
            tar, idx = d / s["name"], d / s["index"]
            if not tar.is_file():
                raise ShardError(f"shard {tar} listed in the manifest is missing")
            if not idx.is_file():
                raise ShardError(f"index file {idx} is missing (regenerate it with wds2idx or rerun the shard job)")
            if tar.stat().st_size != s["bytes"]:
                raise ShardError(f"shard {tar}: {tar.stat().st_size} bytes, manifest says {s['bytes']}")
            if verify == "sha256" and sha256_file(tar) != s["sha256"]:
                raise ShardError(f"shard {tar}: sha256 differs from the manifest")
    return SplitInfo(d, manifest)


def _every_shard(urls):
    yield from urls


def iter_samples(split: SplitInfo | str | os.PathLike) -> Iterator[dict]:
    """Every sample of a split in shard order, via the `webdataset` package.

    Yields {"key", "label" (int), "jpg" (bytes), "meta" (dict), "shard"}.
    """
    import webdataset as wds

    info = split if isinstance(split, SplitInfo) else open_split(split)
    for tar in info.tars:
        # every sample on every rank: without a node splitter, webdataset refuses to run inside a
        # multi-process (torch.distributed) job, e.g. a data-parallel replica's workers
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False, nodesplitter=_every_shard):
            label = int(s["cls"])
            if struct.unpack("<i", s["lbl"])[0] != label:
                raise ShardError(f"{tar}: sample {s['__key__']} has cls {label} but lbl differs")
            yield {"key": s["__key__"], "label": label, "jpg": s["jpg"],
                   "meta": json.loads(s["json"]), "shard": tar.name}


def image_profile(split: SplitInfo | str | os.PathLike, n: int = 32) -> tuple[int, int]:
    """(median shorter side in pixels, most colour channels) over the first n samples of a split: what
    the sampling presets adapt to (`SamplingStrategy.for_source`). A JPEG's channel count comes from its
    header (PIL mode "L" = 1)."""
    import io
    from itertools import islice

    from PIL import Image

    sides, channels = [], 1
    for s in islice(iter_samples(split), n):
        sides.append(min(s["meta"]["width"], s["meta"]["height"]))
        with Image.open(io.BytesIO(s["jpg"])) as img:
            channels = max(channels, len(img.getbands()))
    if not sides:
        raise ShardError(f"{split}: no samples to profile")
    return sorted(sides)[len(sides) // 2], channels


def write_split(split_dir: str | os.PathLike, samples: Iterable[ShardSample], classes: list[str],
                per_shard: int = 1000, prefix: str = "split") -> SplitInfo:
    """Write samples straight to a complete split (tars, index files, manifest last), in order.

    For tools and tests that make their own data; datasets on disk go through the shard job.
    """
    d = Path(split_dir)
    d.mkdir(parents=True, exist_ok=True)
    shards, batch = [], []

    def flush():
        name = f"{prefix}-{len(shards):06d}"
        n, size, digest, index = write_tar(d / f"{name}.tar", batch)
        atomic_write_text(d / f"{name}.idx", index)
        shards.append({"name": f"{name}.tar", "index": f"{name}.idx", "num_samples": n, "bytes": size,
                       "sha256": digest})
        batch.clear()

    for s in samples:
        batch.append(s)
        if len(batch) == per_shard:
            flush()
    if batch:
        flush()
    manifest = {"format": FORMAT, "classes": list(classes), "num_classes": len(classes),
                "num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                "skipped": [], "repaired": []}
    atomic_write_text(d / MANIFEST, dump_json(manifest))
    return SplitInfo(d, manifest)
