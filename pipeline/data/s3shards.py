"""Shards in object storage: the shard job writing to s3://, and a node-local cache that training and
evaluation read from.

Writing (`--out s3://bucket/prefix`): each shard task writes its shard with the ordinary writer into a
node-local staging folder, then uploads the tar, the index file and last its `.parts/<name>.json`
(the part names a shard complete, as the rename does on a filesystem). The manifest is uploaded after
every shard, so a split without it reads as incomplete. A rerun verifies every uploaded shard (size,
then sha256 of the object's bytes) against its part and rewrites only missing or damaged ones; output
made with other settings or from a changed listing is refused as for local output, and a part record
written with other settings (its `job` digest differs) is never taken as verified. One job per split at
a time: the job holds a writer lease on the split (`pipeline.data.lease`), taken before `--overwrite`
deletes anything, checked by every task before it commits a shard and by the driver before the
manifest.

Reading (`data.shards=s3://bucket/prefix`): `localize(split_uri)` fills a node-local copy of the split
(manifest, tars, index files) and returns its folder, which `open_split`, the DALI loaders, the
corrupt-image scan and the quarantine read like any local split. Each tar is downloaded under a
temporary name, its sha256 checked against the manifest, then renamed: a tar under its final name is
verified. Later calls keep tars whose manifest entry is unchanged (size checked), fetch what is missing
or changed, and write the local manifest last. A lock file serialises the replicas and evaluation
ranks of one node: the first fills the cache, the others wait and then find it complete.
(DALI 2.4's own webdataset reader streams s3:// tars and index files too (tests/test_s3.py), but the
evaluation loader, the scan and the quarantine read tar bytes by offset from local files.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.data import objstore
from pipeline.data.shards import (
    FORMAT,
    MANIFEST,
    PARTS_DIR,
    ShardError,
    atomic_write_text,
    dump_json,
    fsync_dir,
)

CACHE_ENV = "INCEPTION_SHARD_CACHE"  # node-local folder for shards copied from object storage
CACHE_LOCK = ".cache.lock"


# ------------------------------------------------------------------------------------ shard job side

def shard_is_complete(split_uri: str, name: str, job: str) -> dict | None:
    """The uploaded part of a finished shard if this job's settings wrote it (`job`) and its tar and
    index objects still match it, else None."""
    from pipeline.data.shard_job import part_matches

    text = objstore.read_text(objstore.join(split_uri, PARTS_DIR, f"{name}.json"))
    if text is None:
        return None
    try:
        part = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not part_matches(part, job):
        return None
    if part["num_samples"] == 0:
        return part
    tar = objstore.join(split_uri, part["name"])
    if objstore.size(tar) != part["bytes"] or objstore.size(objstore.join(split_uri, part["index"])) is None:
        return None
    if objstore.sha256(tar) != part["sha256"]:
        return None
    return part


def write_shard(source, split_uri: str, dataset: str, split: str, index: int, items, max_side, full_decode,
                job: str, lease_owner: str) -> dict:
    """`pipeline.data.shard_job.write_shard` for an s3:// split: verify what is uploaded, or write the
    shard in a local staging folder and upload tar, index, then part. Nothing is uploaded unless the
    split's writer lease is still the job's (`lease_owner`)."""
    import time

    from pipeline.data import shard_job
    from pipeline.data.lease import LeaseError, owner_of
    from pipeline.data.shards import shard_name

    def check_lease():
        if owner_of(split_uri) != lease_owner:
            raise LeaseError(f"{split_uri}: the shard job lost its writer lease (expired and taken over, or "
                             "removed); shard not written")

    t0 = time.perf_counter()
    name = shard_name(dataset, split, index)
    done = shard_is_complete(split_uri, name, job)
    if done is not None:
        return {**done, "status": "verified", "seconds": time.perf_counter() - t0, "node": shard_job._node_id()}
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    try:
        (staging / PARTS_DIR).mkdir()
        result = shard_job.write_shard(source, str(staging), dataset, split, index, items, max_side, full_decode,
                                       job)
        check_lease()
        if result["num_samples"]:
            objstore.upload(staging / result["name"], objstore.join(split_uri, result["name"]))
            objstore.upload(staging / result["index"], objstore.join(split_uri, result["index"]))
        check_lease()  # the part commits the shard: only while the lease is ours
        objstore.upload(staging / PARTS_DIR / f"{name}.json", objstore.join(split_uri, PARTS_DIR, f"{name}.json"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**result, "seconds": time.perf_counter() - t0}


def _owned(split_uri: str, dataset: str, split: str) -> list[str]:
    prefix = f"{dataset}-{split}-"
    return [n for n in objstore.list_names(split_uri)
            if n == MANIFEST or (n.startswith(prefix) and n.endswith((".tar", ".idx")))]


def prepare_output(plan, cfg) -> None:
    """`pipeline.data.shard_job.prepare_output` for an s3:// split (same refusals, same records)."""
    from pipeline.data.shard_job import INPUTS_FILE, ShardJobError, _listing_change, input_lines

    d, fp = plan.dir, plan.fingerprint
    parts = objstore.join(d, PARTS_DIR)
    if cfg.overwrite:
        for n in _owned(d, cfg.dataset, plan.split):
            objstore.delete(objstore.join(d, n))
        for n in objstore.list_names(parts):
            objstore.delete(objstore.join(parts, n))
    recorded = None
    if (text := objstore.read_text(objstore.join(d, MANIFEST))) is not None:
        recorded = json.loads(text).get("job")
    elif (text := objstore.read_text(objstore.join(parts, "job.json"))) is not None:
        recorded = json.loads(text)
    if recorded is not None and recorded != fp:
        changed = [k for k in sorted(set(fp) | set(recorded)) if recorded.get(k) != fp.get(k)]
        if changed == ["inputs"]:
            with tempfile.TemporaryDirectory() as tmp:
                if (before := objstore.read_text(objstore.join(parts, INPUTS_FILE))) is not None:
                    Path(tmp, INPUTS_FILE).write_text(before)
                change = _listing_change(Path(tmp), input_lines(plan.listing))
            raise ShardJobError(f"{d}: {change}; resuming would mix two listings (samples stored twice or "
                                "never), so it is refused: pass --overwrite to rewrite the split from the current inputs")
        diff = ", ".join(f"{k}={recorded.get(k)!r} (now {fp.get(k)!r})" for k in changed)
        raise ShardJobError(f"{d} holds shards made with other settings: {diff}; "
                            "pass --overwrite to replace them or choose another --out")
    if recorded is None and any(n.endswith(".tar") for n in _owned(d, cfg.dataset, plan.split)):
        raise ShardJobError(f"{d} holds shards this job did not record (no manifest, no .parts/job.json); "
                            "pass --overwrite to replace them")
    objstore.write_bytes(objstore.join(parts, "job.json"), dump_json(fp).encode())
    lines = input_lines(plan.listing)
    objstore.write_bytes(objstore.join(parts, INPUTS_FILE), "".join(ln + "\n" for ln in lines).encode())


# ---------------------------------------------------------------------------------------- readers' side

def split_location(shards: str, split: str) -> str:
    """Where a split of `data.shards` is: a URI or a local path."""
    return objstore.join(shards, split)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "inception-pipeline-shards")


def cache_dir_for(split_uri: str) -> Path:
    """The node-local folder mirroring `split_uri` (readable: <root>/<scheme>/<bucket>/<prefix...>)."""
    scheme, _, rest = split_uri.rstrip("/").partition("://")
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ShardError(f"{split_uri}: '.' or '..' in an object key")
    return cache_root().joinpath(scheme, *parts)


def localize(split: str | os.PathLike, log=None) -> Path:
    """A local folder holding the split: the path itself, or for s3:// a verified node-local copy."""
    if not objstore.is_uri(split):
        return Path(split)
    uri = str(split).rstrip("/")
    objstore.check_uri(uri, "shards")
    dest = cache_dir_for(uri)
    dest.mkdir(parents=True, exist_ok=True)
    import fcntl

    fd = os.open(dest / CACHE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: other processes on this node wait, then reuse
        _fill(uri, dest, log)
    finally:
        os.close(fd)
    return dest


def _fill(uri: str, dest: Path, log) -> None:
    text = objstore.read_text(objstore.join(uri, MANIFEST))
    if text is None:
        raise ShardError(f"{uri}: no {MANIFEST}; the split is incomplete or not a shard set (rerun the shard job)")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{uri}/{MANIFEST}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{uri}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for s in manifest.get("shards", []):
        for key in ("name", "index"):
            name = str(s.get(key, ""))
            if not name or name != Path(name).name or name.startswith(".") or "\\" in name:
                raise ShardError(f"{uri}/{MANIFEST}: shard {key} {name!r} is not a plain file name in the split")
    local_manifest = dest / MANIFEST
    before = {}
    if local_manifest.is_file():
        before = {s["name"]: s for s in json.loads(local_manifest.read_text()).get("shards", [])}

    def present(s) -> bool:
        tar = dest / s["name"]
        return (before.get(s["name"]) == s and tar.is_file() and tar.stat().st_size == s["bytes"]
                and (dest / s["index"]).is_file())

    todo = [s for s in manifest.get("shards", []) if not present(s)]
    if not todo and local_manifest.is_file() and local_manifest.read_text() == text:
        return
    if local_manifest.is_file():
        local_manifest.unlink()  # from here on the copy is incomplete until the new manifest lands
        fsync_dir(dest)
    for p in dest.glob("*.tmp-*"):
        p.unlink()  # left by a killed fill (we hold the lock: no other fill is running)
    for s in todo:
        tar, idx = dest / s["name"], dest / s["index"]
        tmp = tar.with_name(tar.name + f".tmp-{os.getpid()}")
        digest = objstore.download(objstore.join(uri, s["name"]), tmp)
        if digest != s["sha256"] or tmp.stat().st_size != s["bytes"]:
            tmp.unlink()
            raise ShardError(f"{uri}/{s['name']}: sha256 or size differs from the manifest (object damaged "
                             "or replaced; rerun the shard job)")
        idx_tmp = idx.with_name(idx.name + f".tmp-{os.getpid()}")
        objstore.download(objstore.join(uri, s["index"]), idx_tmp)
        os.replace(idx_tmp, idx)
        os.replace(tmp, tar)  # last: a tar under its final name has been verified
    fetched = len(todo)
    fsync_dir(dest)
    atomic_write_text(local_manifest, text)  # last: marks the local copy complete
    if log:
        log(f"shard cache: {uri} -> {dest} ({fetched} of {len(manifest.get('shards', []))} shards fetched)")
