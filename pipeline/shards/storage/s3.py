"""Shards in object storage (`--out s3://bucket/prefix`): the shard job's backend for an s3:// split, the
same interface as `pipeline.shards.storage.local` (guard, prepare_output, write_shard, write_manifest).

Each shard task writes its shard with the folder writer into a node-local staging folder, then uploads
the tar, the index file and last its `.parts/<name>.json` (the part names a shard complete, as the
rename does on a filesystem). The manifest is uploaded after every shard, so a split without it reads
as incomplete. A rerun verifies every uploaded shard (size, then sha256 of the object's bytes) against
its part and rewrites only missing or damaged ones; output made with other settings or from a changed
listing is refused as for a folder, and a part record written with other settings (its `job` digest
differs) is never taken as verified. One job per split at a time: the job holds a writer lease on the
split (`pipeline.shards.storage.lease`), taken before `--overwrite` deletes anything, checked by every
task before it commits a shard and by the driver before the manifest.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.shards.format import MANIFEST, PARTS_DIR, dump_json, shard_name
from pipeline.shards.plan import (
    INPUTS_FILE,
    ShardJobError,
    SplitPlan,
    input_lines,
    node_id,
    part_matches,
    refuse_other_settings,
)
from pipeline.shards.storage import local, objstore
from pipeline.shards.storage.lease import Lease, LeaseError, owner_of


def shard_is_complete(split_uri: str, name: str, job: str) -> dict | None:
    """The uploaded part of a finished shard if this job's settings wrote it (`job`) and its tar and
    index objects still match it, else None."""
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
                job: str, owner: str | None = None) -> dict:
    """Verify what is uploaded, or write the shard in a local staging folder (`local.write_shard`) and
    upload tar, index, then part. Nothing is uploaded unless the split's writer lease is still the job's
    (`owner`, its token)."""

    def check_lease():
        if owner_of(split_uri) != owner:
            raise LeaseError(f"{split_uri}: the shard job lost its writer lease (expired and taken over, or "
                             "removed); shard not written")

    t0 = time.perf_counter()
    name = shard_name(dataset, split, index)
    done = shard_is_complete(split_uri, name, job)
    if done is not None:
        return {**done, "status": "verified", "seconds": time.perf_counter() - t0, "node": node_id()}
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    try:
        (staging / PARTS_DIR).mkdir()
        result = local.write_shard(source, str(staging), dataset, split, index, items, max_side, full_decode, job)
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


def prepare_output(plan: SplitPlan, cfg) -> None:
    """`local.prepare_output` for an s3:// split (same refusals, same records)."""
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
        with tempfile.TemporaryDirectory() as tmp:
            if objstore.size(inputs := objstore.join(parts, INPUTS_FILE)) is not None:
                Path(tmp, INPUTS_FILE).write_bytes(objstore.read_bytes(inputs))
            refuse_other_settings(d, recorded, plan, Path(tmp))
    if recorded is None and any(n.endswith(".tar") for n in _owned(d, cfg.dataset, plan.split)):
        raise ShardJobError(f"{d} holds shards this job did not record (no manifest, no .parts/job.json); "
                            "pass --overwrite to replace them")
    lines = input_lines(plan.listing)  # file names that are not UTF-8 are stored as their original bytes
    objstore.write_bytes(objstore.join(parts, INPUTS_FILE),
                         "".join(ln + "\n" for ln in lines).encode("utf-8", "surrogateescape"))
    objstore.write_bytes(objstore.join(parts, "job.json"), dump_json(fp).encode())  # last, as on a filesystem


@contextlib.contextmanager
def guard(plans: list[SplitPlan]):
    """Hold the writer lease of every split for the block (refused while another job's is live)."""
    leases = []
    try:
        for plan in plans:
            fp = plan.fingerprint
            lease = Lease(str(plan.dir), f"shard job {fp.get('dataset')}/{plan.split} seed {fp.get('seed')}")
            lease.acquire()
            leases.append(lease)
            plan.owner = lease.owner
        yield
    finally:
        for lease in leases:
            lease.release()


def write_manifest(plan: SplitPlan, text: str) -> None:
    """The manifest, last, and only while this job's lease is still the split's."""
    if owner_of(str(plan.dir)) != plan.owner:
        raise LeaseError(f"{plan.dir}: the shard job lost its writer lease (expired and taken over, or removed); "
                         "the manifest is not written")
    objstore.write_bytes(objstore.join(str(plan.dir), MANIFEST), text.encode())
