"""Shards in a folder (a local disk, or a filesystem every node mounts at the same place).

Each shard task writes its tar and index under temporary names, then its `.parts/<name>.json` record,
then renames the tar into place (a tar under its final name is complete); the manifest is written last.
One job per split at a time: an flock on `<split>/.shard-job.lock` (local filesystems and NFSv4; on
others, one writer at a time is the user's rule).

The interface both backends (this one and `pipeline.shards.storage.s3`) provide to the shard job:
`guard(plans)` (a context: one writer per split), `prepare_output(plan, cfg)` (refuse other settings,
clean up, record the job), `write_shard(...)` (one Ray task: verify or write one shard; returns its
part record) and `write_manifest(plan, text)` (last).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path

from pipeline.shards.format import (
    MANIFEST,
    PARTS_DIR,
    ShardSample,
    atomic_write_text,
    dump_json,
    fsync_dir,
    sha256_file,
    shard_name,
    write_tar,
)
from pipeline.shards.plan import (
    ShardJobError,
    SplitPlan,
    node_id,
    prepare_split,
    verified_part,
)
from pipeline.shards.sources import Item, SkipSample, error_reason


def _part_path(split_dir: Path, name: str) -> Path:
    return split_dir / PARTS_DIR / f"{name}.json"


def _size(split_dir: Path, name: str) -> int | None:
    f = split_dir / name
    return f.stat().st_size if f.is_file() else None


def shard_is_complete(split_dir: Path, name: str, job: str) -> dict | None:
    """The recorded result of a finished shard if it was written by this job's settings (`job`, see
    job_digest) and its tar and index still match it, else None."""
    part_file = _part_path(split_dir, name)
    text = part_file.read_text() if part_file.is_file() else None
    return verified_part(text, job, lambda n: _size(split_dir, n), lambda n: sha256_file(split_dir / n))


def write_shard(source, split_dir: str, dataset: str, split: str, index: int, items: list[Item],
                max_side: int | None, full_decode: bool, job: str, owner: str | None = None) -> dict:
    """Write (or verify) one shard. Never raises for one bad input: it is recorded as skipped. (`owner`:
    the writer's token, used by object storage; here the lock already keeps other jobs out.)"""
    d = Path(split_dir)
    name = shard_name(dataset, split, index)
    t0 = time.perf_counter()
    node = node_id()
    done = shard_is_complete(d, name, job)
    if done is not None:
        return {**done, "status": "verified", "seconds": time.perf_counter() - t0, "node": node}
    skipped: list[dict] = []
    repaired: list[dict] = []

    def samples():
        for it in items:
            try:
                p = source.prepare(it, max_side=max_side, full_decode=full_decode)
            except SkipSample as e:
                skipped.append({"source": it.source, "reason": str(e)})
                continue
            except Exception as e:  # one odd file must not take the shard down
                skipped.append({"source": it.source, "reason": f"unexpected error: {error_reason(e)}"})
                continue
            if p.repaired:
                repaired.append({"source": it.source, "reason": p.repaired})
            meta = {"source": it.source, **{k: v for k, v in it.meta.items() if k != "index"},
                    "width": p.width, "height": p.height}
            yield ShardSample(it.key, it.label, p.jpg, meta)

    tmp_tar = d / f"{name}.tar.tmp-{os.getpid()}"
    try:  # (a full disk, a quota: the error goes to the driver, no temporary stays behind)
        n, size, digest, index_text = write_tar(tmp_tar, samples())
        index_raw = index_text.encode("utf-8", "surrogateescape")  # the bytes atomic_write_text writes
        part = {"shard": index, "job": job, "name": f"{name}.tar" if n else None,
                "index": f"{name}.idx" if n else None, "inputs": len(items), "num_samples": n,
                "bytes": size if n else 0, "sha256": digest if n else None,
                "index_bytes": len(index_raw) if n else 0,
                "index_sha256": hashlib.sha256(index_raw).hexdigest() if n else None,
                "skipped": skipped, "repaired": repaired}
        if n:
            atomic_write_text(d / f"{name}.idx", index_text)
        atomic_write_text(_part_path(d, name), dump_json(part))
        if n:
            os.replace(tmp_tar, d / f"{name}.tar")  # last: a tar under its final name is complete
            fsync_dir(d)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), e.filename or str(d / f"{name}.tar")) from None
    finally:
        tmp_tar.unlink(missing_ok=True)
    return {**part, "status": "written", "seconds": time.perf_counter() - t0, "node": node}


def _owned_files(split_dir: Path, dataset: str, split: str) -> list[Path]:
    prefix = f"{dataset}-{split}-"
    return [p for p in split_dir.iterdir()
            if p.name == MANIFEST or (p.name.startswith(prefix) and (p.suffix in (".tar", ".idx") or ".tmp-" in p.name))]


class _Folder:
    """The split folder as `prepare_split` sees it."""

    def __init__(self, plan: SplitPlan, cfg):
        self.d, self.parts = Path(plan.dir), Path(plan.dir) / PARTS_DIR
        self.dataset, self.split = cfg.dataset, plan.split

    def _owned(self) -> list[Path]:
        return _owned_files(self.d, self.dataset, self.split) if self.d.exists() else []

    def remove_all(self) -> None:
        if not self.d.exists():
            return
        # the manifest first, durably: a reader meanwhile finds an incomplete split, never a manifest
        # naming shards that are gone
        if (self.d / MANIFEST).is_file():
            (self.d / MANIFEST).unlink()
            fsync_dir(self.d)
        for p in self._owned():
            p.unlink()
        shutil.rmtree(self.parts, ignore_errors=True)

    def read(self, name: str) -> bytes | None:
        return (self.d / name).read_bytes() if (self.d / name).is_file() else None

    def read_part(self, name: str) -> bytes | None:
        return (self.parts / name).read_bytes() if (self.parts / name).is_file() else None

    def has_tars(self) -> bool:
        return any(p.suffix == ".tar" for p in self._owned())

    def clean_temporaries(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        for p in [*self._owned(), *self.parts.iterdir()]:
            if ".tmp-" in p.name:
                p.unlink()  # left by a killed run (a tar, or a part record written with atomic_write_text)

    def write_part(self, name: str, data: bytes) -> None:
        atomic_write_text(self.parts / name, data.decode("utf-8", "surrogateescape"))


def prepare_output(plan: SplitPlan, cfg) -> None:
    """Refuse to mix with output made by other settings; clean temporaries; record the job."""
    prepare_split(plan, cfg, _Folder(plan, cfg))


LOCK_FILE = ".shard-job.lock"


def lock_split(split_dir: Path) -> int:
    """An exclusive lock on the split folder for this job's lifetime: a second concurrent run on the same
    output would delete the first one's temporary files and interleave shards (flock: local
    filesystems and NFSv4; on others, one writer at a time is the user's rule)."""
    import fcntl

    fd = os.open(split_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ShardJobError(f"{split_dir} is being written by another shard job (lock {split_dir / LOCK_FILE} is "
                            "held); wait for it to finish or stop it") from None
    return fd


@contextlib.contextmanager
def guard(plans: list[SplitPlan]):
    """Hold the lock of every split folder (created if missing) for the block."""
    fds = []
    try:
        for plan in plans:
            Path(plan.dir).mkdir(parents=True, exist_ok=True)
            fds.append(lock_split(Path(plan.dir)))
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the lock


def write_manifest(plan: SplitPlan, text: str) -> None:
    atomic_write_text(Path(plan.dir) / MANIFEST, text)  # last: marks the split complete
