"""Object storage (s3://bucket/key) through pyarrow.fs, the filesystem layer Ray Train's storage uses.

Endpoint, credentials and region come from the standard AWS variables, read by pyarrow's AWS SDK (and
by boto3, and by DALI's S3 client): `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` (an S3-compatible
server such as MinIO, or moto in the tests), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`, or an instance profile. Nothing here takes
them as arguments, so no secret is ever on a command line or in a config.

Writes are whole objects (one PUT or multipart upload, visible only when complete), which plays the
role the write-then-rename does on a filesystem: an object under its final key is whole.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

SCHEMES = ("s3",)
CHUNK = 1 << 22


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def check_uri(uri: str, what: str) -> None:
    """Raise ValueError unless `uri` is s3://bucket[/prefix] (the one object store tested here)."""
    scheme, _, rest = uri.partition("://")
    if scheme not in SCHEMES:
        raise ValueError(f"{what}: '{scheme}://' is not supported for shards; use a path or s3://bucket/prefix "
                         "(any S3-compatible server: set AWS_ENDPOINT_URL)")
    if not rest.split("/", 1)[0]:
        raise ValueError(f"{what}: '{uri}' names no bucket")


def join(base: str, *names: str) -> str:
    """`base`/`name`/...: for URIs a string join (pathlib would turn s3:// into s3:/), else a path."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *names])
    return str(Path(base, *names))


@lru_cache(maxsize=8)
def _filesystem(scheme: str, bucket: str):
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


def _fs_path(uri: str):
    scheme, _, rest = uri.partition("://")
    return _filesystem(scheme, rest.split("/", 1)[0]), rest.rstrip("/")


def size(uri: str) -> int | None:
    """Object size in bytes, or None if there is no such object."""
    import pyarrow.fs as pafs

    fs, path = _fs_path(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def read_bytes(uri: str) -> bytes:
    fs, path = _fs_path(uri)
    # A random-access file knows the object's size and reads it in one request; a stream's read() of
    # everything goes in 256 KB pieces, a request each (a 115 MB checkpoint: ~460 requests, 30 s from a
    # local S3 server; 0.2 s in one).
    with fs.open_input_file(path) as f:
        return f.read()


def read_text(uri: str) -> str | None:
    """The object as UTF-8 text, or None if it does not exist (also when it is deleted between the
    look and the read: another job's --overwrite removing it)."""
    if size(uri) is None:
        return None
    try:
        return read_bytes(uri).decode()
    except FileNotFoundError:
        return None
    except OSError:  # (object storage: the GET after the open failed, e.g. 404 "RESOURCE_NOT_FOUND")
        if size(uri) is None:  # gone since the look: missing, as then
            return None
        raise


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = _fs_path(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload(local: str | os.PathLike, uri: str) -> None:
    fs, path = _fs_path(uri)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        while b := src.read(CHUNK):
            dst.write(b)


def download(uri: str, local: str | os.PathLike) -> str:
    """Stream an object to a local file (fsynced); returns its sha256."""
    fs, path = _fs_path(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as src, open(local, "wb") as dst:
        while b := src.read(CHUNK):
            h.update(b)
            dst.write(b)
        dst.flush()
        os.fsync(dst.fileno())
    return h.hexdigest()


def sha256(uri: str) -> str:
    fs, path = _fs_path(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def delete(uri: str) -> None:
    fs, path = _fs_path(uri)
    if size(uri) is not None:
        fs.delete_file(path)


def list_names(uri: str) -> list[str]:
    """Names of the objects directly under the prefix `uri`/ (empty if none)."""
    import pyarrow.fs as pafs

    fs, path = _fs_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def list_dirs(uri: str) -> list[str]:
    """Names of the "folders" (common prefixes) directly under the prefix `uri`/ (empty if none)."""
    import pyarrow.fs as pafs

    fs, path = _fs_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
