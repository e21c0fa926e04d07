"""The shard format: one WebDataset tar with its DALI index, the split's names and manifest constants, and
the file primitives every writer uses (fsynced, atomic). Reading a split: `pipeline.shards.splits`.

Layout of a split (README, "Sharding", "Output"):

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
from collections.abc import Iterable
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
