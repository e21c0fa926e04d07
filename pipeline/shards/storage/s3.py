"""Shards in object storage (`--out s3://bucket/prefix`): the shard job's backend for an s3:// split, the
same interface as `pipeline.shards.storage.local` (guard, prepare_output, write_shard, write_manifest).

Object storage has no rename and no lock a write can be fenced with: a job that pauses (a GC pause, a
frozen VM, a request held in the network) past its writer lease can still land a PUT after another job
took the split over. So no write of a job can damage another job's split:

- A shard's tar and index are stored under names that carry the tar's sha256
  (`<dataset>-<split>-000000-<first 16 hex digits>.tar` and `.idx`). A late upload can only store bytes
  that its name already implies: it replaces nothing another job's manifest lists with anything else.
- The manifest, which names them, is the only object two jobs share. It is written with a conditional
  PUT against the version the job saw when it prepared the split (`If-Match: <its ETag>`, or
  `If-None-Match: *` when there was none): if another job has written or removed it since, the write is
  refused and the job ends with an error, its shards listed nowhere.

Each shard task writes its shard with the folder writer into a node-local staging folder, then uploads
the tar, the index and last its `.parts/<name>.json` (the part names a shard complete, as the rename
does on a filesystem). A rerun verifies every uploaded shard (sizes, then sha256 of the objects' bytes)
against its part and rewrites only missing or damaged ones; output made with other settings or from a
changed listing is refused as for a folder, and a part record written with other settings (its `job`
digest differs) is never taken as verified. One job per split at a time: the job holds a writer lease
on the split (`pipeline.shards.storage.lease`), taken before `--overwrite` deletes anything (the
manifest first), checked by every task before it commits a shard and by the driver before the manifest;
the conditional manifest write is what holds when those checks are overtaken by a pause.

An error from the object store (no such bucket, access denied, an endpoint that does not answer) ends
the job with one line naming the split and the cause.
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
    ShardJobError,
    SplitPlan,
    node_id,
    prepare_split,
    verified_part,
)
from pipeline.shards.storage import lease as lease_module
from pipeline.shards.storage import local, objstore
from pipeline.shards.storage.lease import Lease, LeaseError, owner_of


def content_names(name: str, sha256: str) -> tuple[str, str]:
    """The object names of shard `name` (`<dataset>-<split>-<index>`) whose tar hashes to `sha256`."""
    stem = f"{name}-{sha256[:16]}"
    return f"{stem}.tar", f"{stem}.idx"


@contextlib.contextmanager
def storage_errors(where: str):
    """Errors of the S3 client (boto3) as ShardJobError: one line naming `where` and the cause."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as e:
        err = e.response.get("Error", {}) if hasattr(e, "response") else {}
        code, msg = err.get("Code", "?"), err.get("Message") or ""
        raise ShardJobError(f"{where}: object storage refused {e.operation_name}: {code}"
                            + (f" ({msg})" if msg else "") + "; check the bucket, the credentials and "
                            "AWS_ENDPOINT_URL, then run the same command again") from None
    except BotoCoreError as e:
        raise ShardJobError(f"{where}: {' '.join(str(e).split())}; check AWS_ENDPOINT_URL and the network, then "
                            "run the same command again") from None


def _s3():
    return lease_module.s3_client()


def get_with_etag(uri: str) -> tuple[bytes | None, str]:
    """(the object's bytes, its ETag), or (None, "") if there is none: one request, so the two belong to
    one version."""
    from botocore.exceptions import ClientError

    bucket, key = lease_module._bucket_key(uri)
    try:
        r = _s3().get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if lease_module._code(e) in ("NoSuchKey", "404"):
            return None, ""
        raise
    return r["Body"].read(), r["ETag"]


def put_if_unchanged(uri: str, data: bytes, etag: str) -> bool:
    """PUT `data` only if the object is still the version `etag` ("" : only if there is none); False if
    it has changed (written or removed by someone else since)."""
    from botocore.exceptions import ClientError

    bucket, key = lease_module._bucket_key(uri)
    cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        _s3().put_object(Bucket=bucket, Key=key, Body=data, **cond)
    except ClientError as e:
        if lease_module._code(e) in (*lease_module._CONFLICT, "NoSuchKey", "404"):
            # a retried PUT whose first attempt landed is refused too: then the object holds our bytes
            now, _ = get_with_etag(uri)
            return now == data
        raise
    return True


def shard_is_complete(split_uri: str, name: str, job: str) -> dict | None:
    """The uploaded part of a finished shard if this job's settings wrote it (`job`) and its tar and
    index objects still match it, else None."""
    return verified_part(objstore.read_text(objstore.join(split_uri, PARTS_DIR, f"{name}.json")), job,
                         lambda n: objstore.size(objstore.join(split_uri, n)),
                         lambda n: objstore.sha256(objstore.join(split_uri, n)))


def write_shard(source, split_uri: str, dataset: str, split: str, index: int, items, max_side, full_decode,
                job: str, owner: str | None = None) -> dict:
    """Verify what is uploaded, or write the shard in a local staging folder (`local.write_shard`) and
    upload tar and index under their content names, then the part. Nothing is uploaded unless the
    split's writer lease is still the job's (`owner`, its token)."""

    def check_lease():
        if owner_of(split_uri) != owner:
            raise LeaseError(f"{split_uri}: the shard job lost its writer lease (expired and taken over, or "
                             "removed); shard not written")

    t0 = time.perf_counter()
    name = shard_name(dataset, split, index)
    with storage_errors(split_uri):
        done = shard_is_complete(split_uri, name, job)
        if done is not None:
            return {**done, "status": "verified", "seconds": time.perf_counter() - t0, "node": node_id()}
        staging = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        try:
            (staging / PARTS_DIR).mkdir()
            result = local.write_shard(source, str(staging), dataset, split, index, items, max_side, full_decode,
                                       job)
            part = json.loads((staging / PARTS_DIR / f"{name}.json").read_text())
            check_lease()
            if part["num_samples"]:
                tar, idx = content_names(name, part["sha256"])
                objstore.upload(staging / part["name"], objstore.join(split_uri, tar))
                objstore.upload(staging / part["index"], objstore.join(split_uri, idx))
                part.update(name=tar, index=idx)
            check_lease()  # the part commits the shard: only while the lease is ours
            objstore.write_bytes(objstore.join(split_uri, PARTS_DIR, f"{name}.json"), dump_json(part).encode())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {**result, **part, "seconds": time.perf_counter() - t0}


def _owned(split_uri: str, dataset: str, split: str) -> list[str]:
    prefix = f"{dataset}-{split}-"
    return [n for n in objstore.list_names(split_uri)
            if n == MANIFEST or (n.startswith(prefix) and n.endswith((".tar", ".idx")))]


class _Prefix:
    """The split's prefix as `prepare_split` sees it; reading the manifest notes its version (ETag) on
    the plan, the one this job's conditional manifest write is made against."""

    def __init__(self, plan: SplitPlan, cfg):
        self.plan, self.d = plan, str(plan.dir)
        self.parts = objstore.join(self.d, PARTS_DIR)
        self.dataset, self.split = cfg.dataset, plan.split

    def remove_all(self) -> None:
        # the manifest first: a reader meanwhile finds an incomplete split, never one naming deleted shards
        objstore.delete(objstore.join(self.d, MANIFEST))
        for n in _owned(self.d, self.dataset, self.split):
            objstore.delete(objstore.join(self.d, n))
        for n in objstore.list_names(self.parts):
            objstore.delete(objstore.join(self.parts, n))

    def read(self, name: str) -> bytes | None:
        data, etag = get_with_etag(objstore.join(self.d, name))
        if name == MANIFEST:
            self.plan.seen_manifest = etag
        return data

    def read_part(self, name: str) -> bytes | None:
        uri = objstore.join(self.parts, name)
        return objstore.read_bytes(uri) if objstore.size(uri) is not None else None

    def has_tars(self) -> bool:
        return any(n.endswith(".tar") for n in _owned(self.d, self.dataset, self.split))

    def clean_temporaries(self) -> None:
        pass  # an object is whole or absent: nothing is left half-written

    def write_part(self, name: str, data: bytes) -> None:
        objstore.write_bytes(objstore.join(self.parts, name), data)


def prepare_output(plan: SplitPlan, cfg) -> None:
    """`local.prepare_output` for an s3:// split (same refusals, same records); notes the manifest version
    the job's conditional manifest write is made against."""
    with storage_errors(str(plan.dir)):
        plan.seen_manifest = None
        prepare_split(plan, cfg, _Prefix(plan, cfg))
        if plan.seen_manifest is None:  # (not read: the split holds no manifest)
            plan.seen_manifest = ""


@contextlib.contextmanager
def guard(plans: list[SplitPlan]):
    """Hold the writer lease of every split for the block (refused while another job's is live)."""
    leases = []
    try:
        for plan in plans:
            fp = plan.fingerprint
            with storage_errors(str(plan.dir)):
                lease = Lease(str(plan.dir), f"shard job {fp.get('dataset')}/{plan.split} seed {fp.get('seed')}")
                lease.acquire()
            leases.append(lease)
            plan.owner = lease.owner
        yield
    finally:
        for lease in leases:
            try:
                lease.release()
            except Exception:
                pass  # the store is unreachable now: the lease expires by itself


def write_manifest(plan: SplitPlan, text: str) -> None:
    """The manifest, last: only while this job's lease is still the split's, and only over the version the
    job saw when it prepared the split (a conditional PUT: a job paused past its lease cannot replace the
    manifest of the job that took over)."""
    with storage_errors(str(plan.dir)):
        if owner_of(str(plan.dir)) != plan.owner:
            raise LeaseError(f"{plan.dir}: the shard job lost its writer lease (expired and taken over, or "
                             "removed); the manifest is not written")
        if plan.seen_manifest is None:
            raise RuntimeError("write_manifest before prepare_output")  # an internal invariant
        if not put_if_unchanged(objstore.join(str(plan.dir), MANIFEST), text.encode(), plan.seen_manifest):
            raise LeaseError(f"{plan.dir}: another shard job wrote or removed the split's manifest after this job "
                             "started (this job's lease had expired); the manifest is not written and this job's "
                             "shards are listed nowhere. Run the job again if its settings are the ones you want")
