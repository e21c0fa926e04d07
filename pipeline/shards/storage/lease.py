"""A writer lease on object storage: one shard job per s3:// split at a time.

Object storage has no lock and no rename, so two shard jobs on one prefix could interleave their shards
and part records. The job takes a lease object (`<split>/.shard-job.lease`) with a conditional create
(`If-None-Match: *`: the PUT fails if the object exists), renews it every third of its lifetime with a
conditional overwrite (`If-Match: <its ETag>`), and deletes it at the end (again only if it is still its
own). A second job finds it and is refused, `--overwrite` or not. A job that was killed cannot release
its lease: it expires `seconds` after its last renewal, measured on the storage server's clock (the
object's Last-Modified against the server's Date header), so clocks of the nodes do not matter; the next
job takes an expired lease over with a conditional overwrite of exactly that version.

A conditional PUT whose answer is lost (a connection dropped after the server stored it) is retried by
the client and then refused, since the first attempt landed; every refusal is therefore checked against
the object: if it holds a write of this job (its owner token), the lease is the job's and it goes on.

pyarrow's S3 filesystem (used for everything else) cannot send these conditions, so this uses boto3,
with the same AWS variables (`AWS_ENDPOINT_URL`, credentials, `AWS_REGION`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from pipeline.config import env_int
from pipeline.shards.plan import ShardJobError

LEASE_NAME = ".shard-job.lease"
SECONDS_ENV = "INCEPTION_SHARD_LEASE_SECONDS"
DEFAULT_SECONDS = 120  # a killed job blocks its split this long; renewed every 40 s while it runs
_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class LeaseError(ShardJobError):
    """The split is leased by another live job, or this job lost its lease."""


def lease_seconds() -> int:
    try:
        return env_int(SECONDS_ENV, DEFAULT_SECONDS, 2, "seconds")
    except ValueError as e:
        raise LeaseError(str(e)) from None


def s3_client():
    """A boto3 S3 client configured as pyarrow and DALI are: endpoint from AWS_ENDPOINT_URL(_S3), region
    from AWS_REGION, AWS_DEFAULT_REGION or the profile (us-east-1 if none names one). Checksums only where
    an operation requires them (botocore's default adds CRC32 to every PUT, which some S3-compatible
    servers refuse), and a bounded connect time with retries."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or session.region_name or "us-east-1"
    config = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    connect_timeout=10, retries={"mode": "standard", "max_attempts": 5})
    return session.client("s3", region_name=region, config=config)


def _bucket_key(uri: str) -> tuple[str, str]:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""


class Lease:
    """`with Lease(split_uri, what) as lease:` holds `<split_uri>/.shard-job.lease` for the block."""

    def __init__(self, split_uri: str, what: str, seconds: int | None = None):
        self.uri = split_uri.rstrip("/") + "/" + LEASE_NAME
        self.bucket, self.key = _bucket_key(self.uri)
        self.what = what
        self.seconds = seconds or lease_seconds()
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self._renewals = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._s3 = s3_client()

    def _body(self) -> bytes:
        self._renewals += 1  # every version differs, so If-Match names exactly one of them
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "job": self.what, "seconds": self.seconds, "renewal": self._renewals}).encode()

    def acquire(self) -> Lease:
        from botocore.exceptions import ClientError

        try:
            r = self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")
        except ClientError as e:
            if _code(e) not in _CONFLICT:
                raise
            etag = self._landed()
            r = {"ETag": etag} if etag else self._take_over_expired()
        self.etag = r["ETag"]
        self._thread = threading.Thread(target=self._renew_loop, name="shard-lease", daemon=True)
        self._thread.start()
        return self

    def _landed(self) -> str | None:
        """The lease object's ETag if it holds a write of this job (a PUT refused only because an earlier
        attempt of it, whose answer was lost, had landed; the owner token is this job's alone), else None."""
        held = holder(self.uri, self._s3)
        if held and isinstance(held[0], dict) and held[0].get("owner") == self.owner:
            return held[1]
        return None

    def _take_over_expired(self) -> dict:
        from botocore.exceptions import ClientError

        held = holder(self.uri, self._s3)
        if held is None:  # released between our PUT and this read: try once more
            return self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")
        info, etag, age = held
        limit = int(info.get("seconds", DEFAULT_SECONDS)) if isinstance(info, dict) else DEFAULT_SECONDS
        if age <= limit:
            who = (f"{info.get('job', '?')} on {info.get('host', '?')} (pid {info.get('pid', '?')})"
                   if isinstance(info, dict) else "an unreadable lease")
            raise LeaseError(f"{self.uri.rsplit('/', 1)[0]} is being written by another shard job: {who} holds "
                             f"{self.uri}, renewed {age:.0f}s ago; a stopped job's lease expires {limit}s after its "
                             "last renewal. Wait for that job or stop it (--overwrite does not override a live lease)")
        try:  # expired: replace exactly that version, so two jobs cannot both take it over
            return self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=etag)
        except ClientError as e:
            if _code(e) in _CONFLICT or _code(e) in ("NoSuchKey", "404"):
                etag = self._landed()
                if etag:
                    return {"ETag": etag}
                raise LeaseError(f"{self.uri}: another shard job took the expired lease first; wait for it") from None
            raise

    def _renew_loop(self) -> None:
        from botocore.exceptions import ClientError

        while not self._stop.wait(self.seconds / 3):
            try:
                r = self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=self.etag)
                self.etag = r["ETag"]
            except ClientError as e:
                if _code(e) in _CONFLICT or _code(e) in ("NoSuchKey", "404"):
                    try:
                        etag = self._landed()
                    except Exception:
                        continue  # cannot tell yet: the next tick tries again
                    if etag:
                        self.etag = etag
                        continue
                    self.lost = f"{self.uri} was replaced or removed by someone else"
                    return
                # a transient error: try again at the next tick; check() tells if it expired meanwhile
            except Exception:
                pass

    def check(self) -> None:
        """Raise LeaseError unless the lease object is still this job's version."""
        if self.lost:
            raise LeaseError(f"lost the writer lease: {self.lost}; nothing more is written")
        held = holder(self.uri, self._s3)
        if held is None or not isinstance(held[0], dict) or held[0].get("owner") != self.owner:
            raise LeaseError(f"lost the writer lease {self.uri} (expired and taken over, or removed); "
                             "nothing more is written")

    def release(self) -> None:
        from botocore.exceptions import ClientError

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is None:
            return
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError:
            pass  # no longer ours (taken over after it expired): not ours to delete
        self.etag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(lease_uri: str, s3=None) -> tuple[dict | None, str, float] | None:
    """(the lease's content, its ETag, seconds since its last renewal by the server's clock), or None."""
    from email.utils import parsedate_to_datetime

    from botocore.exceptions import ClientError

    s3 = s3 or s3_client()
    bucket, key = _bucket_key(lease_uri)
    try:
        r = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if _code(e) in ("NoSuchKey", "404"):
            return None
        raise
    body = r["Body"].read()
    try:
        info = json.loads(body)
    except ValueError:
        info = None
    date = r["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date).timestamp() if date else time.time()
    return info, r["ETag"], max(0.0, now - r["LastModified"].timestamp())


def owner_of(split_uri: str) -> str | None:
    """The owner token of the lease on a split (None if there is none): what a shard task checks before
    it commits a shard, so a task of a job that lost its lease writes nothing more."""
    held = holder(split_uri.rstrip("/") + "/" + LEASE_NAME)
    return held[0].get("owner") if held and isinstance(held[0], dict) else None
