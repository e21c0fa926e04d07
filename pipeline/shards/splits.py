"""A complete split, read by its manifest: open (and verify) it, iterate its samples, profile its images;
and `write_split` for tools and tests that make their own data. An s3:// split is read from its verified
node-local copy (`pipeline.shards.cache.localize`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.shards.format import (
    FORMAT,
    MANIFEST,
    ShardError,
    ShardSample,
    atomic_write_text,
    check_format,
    dump_json,
    sha256_file,
    write_tar,
)


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

    verify: "none", "size" (every tar and index exists, their sizes match; cheap) or "sha256" (also
    re-hash every tar and index). Raises ShardError naming the split or shard at fault. A manifest written
    before index files were recorded (no `index_bytes`/`index_sha256`) is read as then: its index files
    are checked for presence only. An s3:// split is opened
    from its node-local copy, fetched and sha256-checked first (`pipeline.shards.cache.localize`; with
    "sha256" every cached tar is hashed again there).
    """
    if "://" in str(split_dir):
        from pipeline.shards.cache import localize

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
    check_format(manifest, str(mpath))
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
            if "index_bytes" in s and idx.stat().st_size != s["index_bytes"]:
                raise ShardError(f"index file {idx}: {idx.stat().st_size} bytes, manifest says {s['index_bytes']} "
                                 "(rerun the shard job)")
            if verify == "sha256" and sha256_file(tar) != s["sha256"]:
                raise ShardError(f"shard {tar}: sha256 differs from the manifest")
            if verify == "sha256" and "index_sha256" in s and sha256_file(idx) != s["index_sha256"]:
                raise ShardError(f"index file {idx}: sha256 differs from the manifest (rerun the shard job)")
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
        raw = index.encode("utf-8", "surrogateescape")
        shards.append({"name": f"{name}.tar", "index": f"{name}.idx", "num_samples": n, "bytes": size,
                       "sha256": digest, "index_bytes": len(raw), "index_sha256": hashlib.sha256(raw).hexdigest()})
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
