"""Corrupt images found once, before training, so that every data-parallel rank leaves out the same ones.

A corrupt image stops a DALI pipeline without naming the sample. One rank finding it mid-epoch would
end its epoch early while the other ranks of its replica wait in a gradient collective, then hold one
sample fewer than they do. So the ensemble driver decodes the training split once with PIL, in
parallel (Ray tasks over chunks of the index when Ray is up, threads otherwise), before any replica
starts, and hands the list to every rank (`DALITrainLoader(exclude=...)`).

The result is cached by the split's fingerprint (its manifest's bytes, which hold every tar's sha256,
and each tar's size, mtime, ctime and inode, as for the verified shard cache), so the seven replicas, a
resubmitted job and later runs on the same shards scan once; a tar rewritten or replaced, even with its
size and mtime put back, changes the fingerprint and is scanned again. The cache folder must be private
to the user (`pipeline.shards.cachedir.private_dir`; created 0700) and an entry is used only if it records
the fingerprint it is filed under; otherwise the split is scanned again, and the reason logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from pipeline.data.dali import find_corrupt, read_index
from pipeline.shards.cachedir import CacheDirError, check_private, file_stamp, private_dir
from pipeline.shards.format import MANIFEST, atomic_write_text
from pipeline.shards.splits import SplitInfo, open_split

CHUNK = 20_000  # images per Ray task (ImageNet: 64 tasks)


def split_fingerprint(split: SplitInfo) -> str:
    h = hashlib.sha256((split.dir / MANIFEST).read_bytes())
    for tar in split.tars:
        h.update(f"{tar.name}:{':'.join(map(str, file_stamp(tar)))}\n".encode())
    return h.hexdigest()[:24]


def _cached(cache: Path, key: str, log) -> list[str] | None:
    """The corrupt list filed under `key`, if the entry is this user's, unaltered by others, and records
    that very fingerprint; else None (logged)."""
    if not cache.exists():
        return None
    try:
        check_private(cache)  # a file someone else wrote (or could rewrite) is not evidence
        entry = json.loads(cache.read_text())
        if entry.get("fingerprint") != key or not isinstance(entry.get("corrupt"), list):
            raise ValueError("it records another fingerprint")
        return [str(x) for x in entry["corrupt"]]
    except (CacheDirError, OSError, ValueError, AttributeError) as e:
        log(f"corrupt-image scan: ignoring cache entry {cache} ({e})")
        return None


def _names(samples) -> list[str]:
    return [f"{Path(s.tar).name}:{s.key}" for s in samples]


def scan_chunk(split_dir: str, lo: int, hi: int, workers: int | None = None) -> list[str]:
    """Names ("shard.tar:key") of the undecodable images among samples [lo, hi) of a split."""
    return _names(find_corrupt(read_index(open_split(split_dir))[lo:hi], workers))


def corrupt_images(split: SplitInfo, cache_dir: str | os.PathLike | None = None, log=print,
                   use_ray: bool = True, chunk: int = CHUNK) -> list[str]:
    """Sorted names of the split's undecodable images (cached in `cache_dir` by the split's fingerprint)."""
    key = split_fingerprint(split)
    cache = None
    if cache_dir:
        try:
            cache = private_dir(cache_dir) / f"corrupt-images-{key}.json"
        except CacheDirError as e:
            log(f"corrupt-image scan: not cached ({e})")
    if cache is not None and (found := _cached(cache, key, log)) is not None:
        log(f"corrupt-image scan of {split.dir}: {len(found)} found (cached in {cache})")
        return found
    n = split.num_samples
    t0 = time.perf_counter()
    log(f"corrupt-image scan of {split.dir}: decoding {n:,} images once before training "
        "(every rank must leave out the same ones)")
    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    found: list[str] = []
    ray = None
    if use_ray and len(bounds) > 1:
        import ray as ray_mod

        ray = ray_mod if ray_mod.is_initialized() else None
    if ray is not None:
        task = ray.remote(num_cpus=1, max_retries=2)(scan_chunk)
        pending = {task.remote(str(split.dir), lo, hi, 1): hi - lo for lo, hi in bounds}
        done = 0
        last = time.perf_counter()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=10)
            for ref in ready:
                found += ray.get(ref)
                done += pending.pop(ref)
            if time.perf_counter() - last >= 10 or not pending:
                last = time.perf_counter()
                rate = done / max(last - t0, 1e-9)
                log(f"  scanned {done:,}/{n:,} images, {len(found)} corrupt, eta {(n - done) / max(rate, 1e-9):,.0f}s")
    else:
        samples = read_index(split)
        for i, (lo, hi) in enumerate(bounds):
            found += _names(find_corrupt(samples[lo:hi]))
            if len(bounds) > 1 and (i % 5 == 4 or hi == n):
                rate = hi / max(time.perf_counter() - t0, 1e-9)
                log(f"  scanned {hi:,}/{n:,} images, {len(found)} corrupt, eta {(n - hi) / max(rate, 1e-9):,.0f}s")
    found = sorted(found)
    log(f"corrupt-image scan: {len(found)} corrupt in {time.perf_counter() - t0:,.1f}s"
        + (f": {', '.join(found[:10])}{' ...' if len(found) > 10 else ''}" if found else ""))
    if cache is not None:
        atomic_write_text(cache, json.dumps({"split": str(split.dir), "fingerprint": key, "corrupt": found}))
    return found
