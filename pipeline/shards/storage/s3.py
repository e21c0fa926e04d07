"""Shards in object storage (`--out s3://bucket/prefix`): the shard job's backend for an s3:// split, the
same interface as `pipeline.shards.storage.local` (guard, prepare_output, write_shard, write_manifest).

Object storage has no rename and no lock a write can be fenced with: a job that pauses (a GC pause, a
frozen VM, a request held in the network) past its writer lease can still land a PUT after another job
took the split over. So no write of a job can damage another job's split:

- A shard's tar and index are stored under names that carry the tar's sha256 and the token of the job
  that uploaded them (`<dataset>-<split>-000000-<first 16 hex digits of the sha256>-<8 hex digits of
  the job's lease token>.tar` and `.idx`). A late upload can only store bytes that its name already
  implies, under a name no other job writes: it replaces nothing another job's manifest lists. A resume
  keeps the names its verified part records give.
- The manifest, which names them, is the only object two jobs share. Under its lease, when it prepares
  the split, a job claims it: a conditional PUT (`If-Match` the version it read, or `If-None-Match: *`)
  of a placeholder carrying its lease token (format `...-pending`, which readers take as an incomplete
  split), unless the manifest is already a complete one of the job's own settings (a resume). The
  final manifest is a conditional PUT against the claimed version: once a later job has claimed the
  split, a late manifest of an earlier job is refused (that job ends with an error, its shards listed
  nowhere), whether the earlier job had seen a manifest or none.
- `--overwrite` replaces the manifest with the placeholder and removes the part records; it deletes no
  tar or index. Objects the new manifest does not list are removed once it has landed, in batches, each
  only while the lease is still the job's and the manifest still the one it wrote. A deletion that
  lands late (a job paused past its lease) removes a name of an earlier job: a job that took the split
  over has uploaded its shards under names of its own.

Each shard task writes its shard with the folder writer into a node-local staging folder, then uploads
the tar, the index and last its `.parts/<name>.json` (the part names a shard complete, as the rename
does on a filesystem). A rerun verifies every uploaded shard (sizes, then sha256 of the objects' bytes)
against its part and rewrites only missing or damaged ones; output made with other settings or from a
changed listing is refused as for a folder, and a part record written with other settings (its `job`
digest differs) is never taken as verified. One job per split at a time: the job holds a writer lease
on the split (`pipeline.shards.storage.lease`), taken before `--overwrite` changes anything (the
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

from pipeline.shards.format import FORMAT, MANIFEST, PARTS_DIR, PENDING_FORMAT, dump_json, shard_name
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


def content_names(name: str, sha256: str, owner: str) -> tuple[str, str]:
    """The object names of shard `name` (`<dataset>-<split>-<index>`) whose tar hashes to `sha256`, as
    uploaded by the job whose lease token is `owner`."""
    stem = f"{name}-{sha256[:16]}-{owner[:8]}"
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


def put_if_unchanged(uri: str, data: bytes, etag: str) -> str | None:
    """PUT `data` only if the object is still the version `etag` ("" : only if there is none); the new
    version's ETag, or None if it has changed (written or removed by someone else since)."""
    from botocore.exceptions import ClientError

    bucket, key = lease_module._bucket_key(uri)
    cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        r = _s3().put_object(Bucket=bucket, Key=key, Body=data, **cond)
    except ClientError as e:
        if lease_module._code(e) in (*lease_module._CONFLICT, "NoSuchKey", "404"):
            # a retried PUT whose first attempt landed is refused too: then the object holds our bytes
            now, now_etag = get_with_etag(uri)
            return now_etag if now == data else None
        raise
    return r["ETag"]


def placeholder(owner: str | None) -> bytes:
    """The manifest a job claims the split with: readers take it as an incomplete split; its lease token
    makes every job's claim a version of its own."""
    return dump_json({"format": PENDING_FORMAT, "owner": owner}).encode()


def _claim(plan: SplitPlan, etag: str) -> None:
    """Replace the manifest version `etag` ("": none) with this job's placeholder; its version is the one
    the job's final manifest is written against."""
    if owner_of(str(plan.dir)) != plan.owner:
        raise LeaseError(f"{plan.dir}: the shard job lost its writer lease (expired and taken over, or removed) "
                         "before it started; nothing is written")
    new = put_if_unchanged(objstore.join(str(plan.dir), MANIFEST), placeholder(plan.owner), etag)
    if new is None:
        raise LeaseError(f"{plan.dir}: the split's manifest changed while this job prepared the split (another "
                         "shard job wrote it); nothing is written. Run the job again")
    plan.seen_manifest = new


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
                tar, idx = content_names(name, part["sha256"], owner or "")
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
        self.claimed = False
        self.seen: tuple[bytes | None, str] = (None, "")

    def remove_all(self) -> None:
        # the manifest first (this job's placeholder: a reader finds an incomplete split), then the part
        # records; tars and index files go only once the new manifest has landed (`_remove_unlisted`)
        _, etag = get_with_etag(objstore.join(self.d, MANIFEST))
        _claim(self.plan, etag)
        self.claimed = True
        for n in objstore.list_names(self.parts):
            objstore.delete(objstore.join(self.parts, n))

    def read(self, name: str) -> bytes | None:
        data, etag = get_with_etag(objstore.join(self.d, name))
        if name == MANIFEST:
            self.seen = (data, etag)
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


def _complete_of(data: bytes | None, fingerprint: dict) -> bool:
    """`data` is a complete manifest written with these settings."""
    try:
        m = json.loads(data) if data is not None else None
    except ValueError:
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT and m.get("job") == fingerprint


def prepare_output(plan: SplitPlan, cfg) -> None:
    """`local.prepare_output` for an s3:// split (same refusals, same records); claims the manifest (see
    the module's docstring) and notes the version the job's final manifest is written against."""
    with storage_errors(str(plan.dir)):
        plan.seen_manifest = None
        prefix = _Prefix(plan, cfg)
        prepare_split(plan, cfg, prefix)
        data, etag = prefix.seen
        if prefix.claimed:
            if etag != plan.seen_manifest:
                raise LeaseError(f"{plan.dir}: the split's manifest changed while this job prepared the split "
                                 "(another shard job wrote it); nothing is written. Run the job again")
        elif _complete_of(data, plan.fingerprint):
            plan.seen_manifest = etag  # a resume of a finished split: kept readable while it is checked
        else:
            _claim(plan, etag)


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
        etag = put_if_unchanged(objstore.join(str(plan.dir), MANIFEST), text.encode(), plan.seen_manifest)
        if etag is None:
            raise LeaseError(f"{plan.dir}: another shard job wrote or removed the split's manifest after this job "
                             "started (this job's lease had expired); the manifest is not written and this job's "
                             "shards are listed nowhere. Run the job again if its settings are the ones you want")
    _remove_unlisted(plan, text, etag)


def _remove_unlisted(plan: SplitPlan, text: str, etag: str, batch: int = 32) -> int:
    """Delete the split's tars and index files the manifest just written (`text`, version `etag`) does not
    list (left by --overwrite or by an earlier job), in batches, each only while the lease is still this
    job's and the manifest still `etag`; never a name it lists. Best effort: the split is complete
    already, and what is left is removed by the next job on the split. Returns how many were deleted."""
    d = str(plan.dir)
    listed = {s[k] for s in json.loads(text)["shards"] for k in ("name", "index")}
    gone = 0
    try:
        names = [n for n in _owned(d, plan.fingerprint.get("dataset"), plan.split) if n != MANIFEST and n not in listed]
        for i in range(0, len(names), batch):
            if owner_of(d) != plan.owner or get_with_etag(objstore.join(d, MANIFEST))[1] != etag:
                break
            for n in names[i:i + batch]:
                objstore.delete(objstore.join(d, n))
                gone += 1
    except Exception:
        pass  # (an unreachable store now): only unlisted objects are left, as before
    return gone
