"""The shard format: one WebDataset tar with its DALI index, the split's names and manifest constants, and
the file primitives every writer uses (fsynced, atomic). Reading a split: `pipeline.shards.splits`.

Layout of a split (docs/reference/shard-format.md):

    <out>/<dataset>/<split>/<dataset>-<split>-000000.tar   samples: <key>.cls/.jpg/.json/.lbl
                            <dataset>-<split>-000000.idx   DALI webdataset index (wds2idx format v1.2)
                            manifest.json                  written last; a split without it is incomplete
                            .parts/                        per-shard results, used to resume

On object storage (s3://) a shard's tar and index carry the tar's sha256 and the writing job's token in
their names (`<dataset>-<split>-000000-<16 hex digits>-<8 hex digits>.tar`, `.idx`:
`pipeline.shards.storage.s3`); readers take every name from the manifest, which records per shard its
tar's and its index's size and sha256 (`bytes`, `sha256`, `index_bytes`, `index_sha256`; manifests
written before the index fields read as then, their index files checked for presence only).

Per sample: `jpg` image bytes, `cls` label as ASCII integer (webdataset convention), `json` metadata,
`lbl` the same label as a little-endian int32 (DALI reads it as a fixed-width INT32 component; the
ASCII `cls` would come out as a variable-length byte array).
"""

from __future__ import annotations

import hashlib
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
# On s3:// a shard job claims the split's manifest with a placeholder of this format (and its lease
# token) before it writes anything: readers take it as an incomplete split.
PENDING_FORMAT = FORMAT + "-pending"
# Tar members carry this fixed mtime (2000-01-01T00:00:00Z), uid/gid 0 and mode 0644, so that the same
# input and seed give byte-identical shards.
TAR_MTIME = 946684800
INDEX_VERSION = "v1.2"  # the format DALI's wds2idx writes
COMPONENT_ORDER = ("cls", "jpg", "json", "lbl")


class ShardError(Exception):
    """A shard set is incomplete or does not match its manifest."""


def check_format(manifest: dict, where: str) -> None:
    """Raise ShardError unless `manifest` (read from `where`) is a complete split's."""
    if manifest.get("format") == PENDING_FORMAT:
        raise ShardError(f"{where}: the split is incomplete (a shard job is writing it, or stopped before it "
                         "finished); rerun the shard job")
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}")


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}"


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


_NUL = b"\0"
_RECORD = tarfile.RECORDSIZE  # a tar ends with two zero blocks, padded to a whole record (tarfile's layout)
# The fixed fields of every member's USTAR header (tarfile's `_create_header` for mode 0644, uid/gid 0,
# our mtime, a regular file, empty link, owner and group names, and (a regular file) empty device fields).
_MODE_IDS = b"0000644\0" + b"0000000\0" * 2
_MTIME = b"%011o\0" % TAR_MTIME
_AFTER_CHKSUM = b"0" + _NUL * 100 + tarfile.POSIX_MAGIC + _NUL * 64 + _NUL * 16
_TAIL = _AFTER_CHKSUM + _NUL * 155
_FIXED_SUM = 256 + sum(_MODE_IDS) + sum(_MTIME) + sum(_TAIL)  # (the checksum field counts as 8 spaces)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for one of our members (byte for byte: a test compares
    them), built directly: tarfile's general path (a TarInfo copied, every field formatted) cost more per
    sample than hashing it. Names over 100 bytes take tarfile's own path (its prefix/name split)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = size, TAR_MTIME, 0o644, 0, 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    if size >= 8 ** 11:
        raise ValueError(f"{name}: {size} bytes is too large for a USTAR member")
    size_field = b"%011o\0" % size
    chksum = _FIXED_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, _NUL * (100 - len(raw)), _MODE_IDS, size_field, _MTIME, b"%06o\0 " % chksum, _TAIL,
                     _NUL * 12))


def _writeback_starter():
    """A function (fd, offset, nbytes) that asks the kernel to start writing that range to disk now,
    without waiting (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`), or None where there is none. A
    shard written in full and then fsynced waits for all of its bytes at the end; started as it is
    written, the disk works while the next samples are read and hashed, and the fsync finds little left."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # (2: SYNC_FILE_RANGE_WRITE; errors ignored)


_start_writeback = _writeback_starter()
WRITEBACK_BYTES = 4 << 20  # start writing back every 4 MB


def _write_all(fd: int, chunks: list[bytes]) -> None:
    """Write the chunks in order with as few system calls as the kernel allows (no copy into one buffer)."""
    while chunks:
        done = os.writev(fd, chunks)
        while chunks and done >= len(chunks[0]):
            done -= len(chunks.pop(0))
        if done:
            chunks[0] = chunks[0][done:]


def write_tar(path: Path, samples: Iterable[ShardSample]) -> tuple[int, int, str, str]:
    """Write samples to `path` (USTAR tar, the bytes Python's tarfile writes). Returns (num_samples,
    bytes, sha256, DALI index text).

    The index is built from the offsets as they are written, in the exact format `wds2idx` produces
    (a test checks this against the tool), so no second pass over the tar is needed. Each sample's four
    members go out in one system call (`writev`), not copied into one buffer first; writing back to disk
    starts every few MB, so the closing fsync waits for little.
    """
    lines = []
    n = pos = synced = 0
    sha = hashlib.sha256()
    with open(path, "wb", buffering=0) as f:
        fd = f.fileno()
        for s in samples:
            if "." in s.key or "/" in s.key:
                raise ValueError(f"sample key {s.key!r} contains '.' or '/'")
            entry, chunks = [], []
            for ext, data in s.components():
                member = f"{s.key}.{ext}"
                header = ustar_header(member, len(data))
                entry.append(f"{ext} {pos + len(header)} {len(data)} {member}")
                pad = -len(data) % tarfile.BLOCKSIZE
                chunks += (header, data, _NUL * pad)
                pos += len(header) + len(data) + pad
            for c in chunks:
                sha.update(c)
            _write_all(fd, chunks)  # (empties the list)
            lines.append(" ".join(entry))
            n += 1
            if _start_writeback and pos - synced >= WRITEBACK_BYTES:
                _start_writeback(fd, synced, pos - synced)
                synced = pos
        end = _NUL * (2 * tarfile.BLOCKSIZE)
        end += _NUL * (-(pos + len(end)) % _RECORD)
        _write_all(fd, [end])
        sha.update(end)
        size = pos + len(end)
        os.fsync(fd)  # on disk before anything names it complete (rename, part, manifest)
    index = f"{INDEX_VERSION} {n}\n" + "".join(line + "\n" for line in lines)
    return n, size, sha.hexdigest(), index


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
