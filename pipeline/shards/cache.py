"""The node-local copy of an s3:// split that training and evaluation read (`data.shards=s3://bucket/prefix`).

`localize(split_uri)` fills a node-local copy of the split (manifest, tars, index files) and returns its
folder, which `open_split`, the DALI loaders, the corrupt-image scan and the quarantine read like any
local split. Each version of a split (its manifest's bytes) gets a folder of its own,
`<split>/v-<sha256 of the manifest>`, that is never rewritten with other content: a process still reading
the previous version (a training started before the split was sharded again) keeps reading exactly
what it opened, while newer processes read the new version. A version no process on the node reads is
removed when a newer one is filled (before the fill when the cache or its disk has no room for both).

Each tar is downloaded under a temporary name, its sha256 checked against the manifest, then renamed: a
tar under its final name is verified, and its (size, mtime, ctime, inode) stamp is recorded in
`.verified.json`. Later calls keep a tar whose manifest entry and stamp are unchanged (or, with
`verify="sha256"`, whose bytes hash to the manifest's sha256) and fetch again what is missing or damaged
(the same bytes, so a reader of that version sees no change); files the manifest does not list are
removed; the local manifest is written last. A lock file serialises the replicas and evaluation ranks of
one node: the first fills the cache, the others wait and then find it complete.

The cache is private to the user: `$INCEPTION_SHARD_CACHE`, else `$XDG_CACHE_HOME/inception-pipeline/
shards`, else `~/.cache/inception-pipeline/shards`, created 0700 and refused if another user owns it or
group/others can write it. It holds at most `$INCEPTION_SHARD_CACHE_GB` (default 200) GB: before a fill
(room for what it fetches, under the cap and on the disk) and after it, the least recently used split
versions that no process on the node is reading are removed until it fits; a disk that cannot hold the
split even then is a one-line ShardError.
(DALI 2.4's own webdataset reader streams s3:// tars and index files too (tests/test_s3.py), but the
evaluation loader, the scan and the quarantine read tar bytes by offset from local files.)
"""


from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.shards.cachedir import CacheDirError, file_stamp, private_dir, user_cache_root
from pipeline.shards.format import (
    MANIFEST,
    ShardError,
    atomic_write_text,
    check_format,
    dump_json,
    fsync_dir,
    sha256_file,
)
from pipeline.shards.storage import objstore

CACHE_ENV = "INCEPTION_SHARD_CACHE"  # node-local folder for shards copied from object storage
CACHE_GB_ENV = "INCEPTION_SHARD_CACHE_GB"  # its size cap
DEFAULT_CACHE_GB = 200.0  # ImageNet's train and val splits (~155 GB) fit
CACHE_LOCK = ".cache.lock"  # in a split's folder: held (exclusive) while a process fills one of its versions
VERSION_PREFIX = "v-"  # a split version's folder: v-<first 16 hex digits of its manifest's sha256>
IN_USE_LOCK = ".in-use.lock"  # held (shared) by every process reading a version; removal needs it exclusive
VERIFIED = ".verified.json"  # {tar name: {"sha256", "stamp", "index", "index_stamp"}}
LAST_USED = ".last-used"  # its mtime: when a process last opened the version (least recently used goes first)
_KEEP = {MANIFEST, IN_USE_LOCK, VERIFIED, LAST_USED}
_in_use: dict[Path, int] = {}  # version folder -> fd holding its shared in-use lock for this process's lifetime


def split_location(shards: str, split: str) -> str:
    """Where a split of `data.shards` is: a URI or a local path."""
    return objstore.join(shards, split)


def cache_root() -> Path:
    """The user's private shard cache (created 0700; ShardError if it is not private)."""
    root = os.environ.get(CACHE_ENV) or user_cache_root() / "shards"
    try:
        return private_dir(root)
    except CacheDirError as e:
        raise ShardError(f"{e} (the shard cache: set {CACHE_ENV} to choose another)") from None


def cache_limit_bytes() -> int:
    raw = os.environ.get(CACHE_GB_ENV, "")
    try:
        gb = float(raw) if raw else DEFAULT_CACHE_GB
    except ValueError:
        raise ShardError(f"{CACHE_GB_ENV}={raw!r}: expected a size in GB, e.g. 200") from None
    return int(gb * 1e9)


def cache_dir_for(split_uri: str) -> Path:
    """The node-local folder mirroring `split_uri` (readable: <root>/<scheme>/<bucket>/<prefix...>); it
    holds a folder per version of the split."""
    scheme, _, rest = split_uri.rstrip("/").partition("://")
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ShardError(f"{split_uri}: '.' or '..' in an object key")
    return cache_root().joinpath(scheme, *parts)


def localize(split: str | os.PathLike, log=None, verify: str = "stamp") -> Path:
    """A local folder holding the split: the path itself, or for s3:// a verified node-local copy.

    verify: "stamp" (a tar verified by sha256 before is trusted while its recorded size, mtime, ctime and
    inode are unchanged) or "sha256" (every cached tar is hashed again)."""
    if not objstore.is_uri(split):
        return Path(split)
    uri = str(split).rstrip("/")
    objstore.check_uri(uri, "shards")
    dest = cache_dir_for(uri)
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    import fcntl

    fd = os.open(dest / CACHE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: other processes on this node wait, then reuse
        text, manifest = _read_manifest(uri)
        version = dest / (VERSION_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16])
        version.mkdir(mode=0o700, exist_ok=True)
        _hold_in_use(version)  # before the fill: another process's eviction must not remove it mid-fill
        _make_room(uri, dest, version, manifest, log)
        try:
            _fill(uri, version, text, manifest, log, full=verify == "sha256")
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise ShardError(f"{uri}: no room for its node-local copy in {version} ({e.strerror or e}): free space "
                             f"there, or set {CACHE_ENV} to a folder on a larger disk") from None
        (version / LAST_USED).touch()
        _remove_older_versions(dest, keep=version, log=log)
    finally:
        os.close(fd)
    evict(keep=version, log=log)
    return version


def _hold_in_use(dest: Path) -> None:
    import fcntl

    if dest not in _in_use:
        fd = os.open(dest / IN_USE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # released when this process exits
        _in_use[dest] = fd


def _version_dirs(root: Path) -> list[Path]:
    """The version folders under `root`; a folder another process removes during the walk (an eviction)
    is left out, never an error."""
    found = []
    for d, _subdirs, files in os.walk(root):  # (os.walk ignores what vanishes; rglob raised on it)
        if IN_USE_LOCK in files and os.path.basename(d).startswith(VERSION_PREFIX):
            found.append(Path(d))
    return found


def _usage(dirs: list[Path]) -> tuple[int, dict[Path, int]]:
    """(bytes the versions take on disk, each file once however many versions link it; per version, the
    bytes its removal frees: its files no other version links)."""
    inodes, freed = {}, {}
    for d in dirs:
        freed[d] = 0
        try:
            files = [p.stat() for p in d.iterdir() if p.is_file()]
        except FileNotFoundError:  # removed meanwhile
            continue
        for st in files:
            inodes[(st.st_dev, st.st_ino)] = st.st_size
            freed[d] += st.st_size if st.st_nlink == 1 else 0
    return sum(inodes.values()), freed


def _remove_unless_in_use(d: Path) -> bool:
    """Remove a version folder unless a process on this node holds it (its shared in-use lock). The
    caller holds the split's fill lock, so no process is between creating the folder and locking it."""
    import fcntl

    try:
        fd = os.open(d / IN_USE_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False  # removed meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # a process on this node reads it
    try:
        shutil.rmtree(d)
    finally:
        os.close(fd)
    for other in d.parent.iterdir():  # (their files linked from `d` have a new ctime)
        if other.name.startswith(VERSION_PREFIX):
            _restamp_links(other)
    return True


def _remove_older_versions(dest: Path, keep: Path, log=None) -> None:
    """Other versions of the split that no process reads, and anything else left in the split's folder
    (temporaries, a copy in an older layout); a version still being read is left to a later call. The
    caller holds the split's fill lock."""
    for p in dest.iterdir():
        if p == keep or p.name == CACHE_LOCK:
            continue
        if p.is_dir() and not p.is_symlink() and (p / IN_USE_LOCK).exists():
            if _remove_unless_in_use(p) and log:
                log(f"shard cache: removed {p.name}, an older version of {dest.name} that no process reads")
        else:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _restamp_links(version: Path) -> None:
    """After an older version is removed, the files this version linked from it have a new ctime (the
    link count changed) and nothing else: record their stamps anew, so that they are not fetched again."""
    try:
        state = json.loads((version / VERIFIED).read_text())
    except (OSError, ValueError):
        return
    changed = False
    for name, rec in state.items() if isinstance(state, dict) else ():
        for key, f in (("stamp", name), ("index_stamp", rec.get("index") if isinstance(rec, dict) else None)):
            try:
                old, now = rec[key], file_stamp(version / f)
            except (OSError, KeyError, TypeError):
                continue
            if isinstance(old, list) and len(old) == 4 and old != now and [old[0], old[1], old[3]] == [now[0], now[1], now[3]]:
                rec[key], changed = now, True
    if changed:
        atomic_write_text(version / VERIFIED, dump_json(state))


_PAGE = 4096


def _on_disk(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def _bytes_to_fetch(dest: Path, manifest: dict) -> int:
    """About the disk space a fill of `dest` takes: the tars and index files it does not hold yet and
    cannot link from another version, in whole pages, and its records."""
    donors = _verified_in_other_versions(dest)
    need = 0
    for s in manifest.get("shards", []):
        tar = dest / s["name"]
        if (tar.is_file() and tar.stat().st_size == s["bytes"]) or s["sha256"] in donors:
            continue
        need += _on_disk(s["bytes"]) + _on_disk(int(s.get("index_bytes", _PAGE)))
    return need + 4 * _PAGE if need else 0


def _make_room(uri: str, dest: Path, version: Path, manifest: dict, log) -> None:
    """Before a fill: room for it under the cap and on the disk, made by removing the split's other
    versions and then the least recently used ones that no process reads. A disk that cannot hold the
    fill even then is a ShardError (one line); a cap exceeded by splits being read is logged (`evict`).
    The caller holds the split's fill lock."""
    root = cache_root()

    def short(need: int) -> bool:
        total, _ = _usage(_version_dirs(root))
        return need > 0 and (total + need > cache_limit_bytes() or shutil.disk_usage(root).free < need)

    if not short(_bytes_to_fetch(version, manifest)):
        return
    _remove_older_versions(dest, keep=version, log=log)  # (their shards could have been linked: now fetched)
    need = _bytes_to_fetch(version, manifest)
    if not short(need):
        return
    evict(keep=version, log=log, need=need)
    free = shutil.disk_usage(root).free
    if free < need:
        raise ShardError(f"{uri}: no room for its node-local copy: it needs {need / 1e9:,.2f} GB, {free / 1e9:,.2f} GB "
                         f"are free on the disk of {root} once every split no process reads is removed; free space "
                         f"there, or set {CACHE_ENV} to a folder on a larger disk")


def evict(keep: Path | None = None, log=None, need: int = 0) -> list[Path]:
    """Remove least recently used split versions that no process is reading until the cache fits its cap
    (with `need` bytes more: a fill about to start, which also needs them free on the disk). A version
    is removed under its split's fill lock, taken without waiting: a split being filled (or evicted by
    another process) is skipped."""
    import fcntl

    limit = cache_limit_bytes()
    root = cache_root()
    dirs = _version_dirs(root)
    total, freed = _usage(dirs)
    removed = []

    def fits() -> bool:
        return total + need <= limit and (need == 0 or shutil.disk_usage(root).free >= need)

    def last_used(d: Path) -> float:
        try:
            return (d / LAST_USED).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    for d in sorted(dirs, key=last_used):
        if fits():
            break
        if d == keep:
            continue
        try:
            fd = os.open(d.parent / CACHE_LOCK, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            gone = _remove_unless_in_use(d)
        except BlockingIOError:
            gone = False
        finally:
            os.close(fd)
        if not gone:
            continue
        removed.append(d)
        size = freed.get(d, 0)
        total, freed = _usage([x for x in dirs if x not in removed])
        if log:
            log(f"shard cache: removed {d} ({size / 1e9:,.2f} GB, least recently used) to stay under "
                f"{limit / 1e9:,.1f} GB")
    if total + need > limit and log:
        log(f"shard cache: {(total + need) / 1e9:,.2f} GB in use by splits being read"
            + (f" and {need / 1e9:,.2f} GB about to be fetched" if need else "")
            + f", over the {limit / 1e9:,.1f} GB cap ({CACHE_GB_ENV})")
    return removed


def _read_manifest(uri: str) -> tuple[str, dict]:
    text = objstore.read_text(objstore.join(uri, MANIFEST))
    if text is None:
        raise ShardError(f"{uri}: no {MANIFEST}; the split is incomplete or not a shard set (rerun the shard job)")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{uri}/{MANIFEST}: not valid JSON ({e})") from None
    check_format(manifest, f"{uri}/{MANIFEST}")
    for s in manifest.get("shards", []):
        for key in ("name", "index"):
            name = str(s.get(key, ""))
            if not name or name != Path(name).name or name.startswith(".") or "\\" in name:
                raise ShardError(f"{uri}/{MANIFEST}: shard {key} {name!r} is not a plain file name in the split")
    return text, manifest


def _fill(uri: str, dest: Path, text: str, manifest: dict, log, full: bool = False) -> None:
    """Make `dest` (the folder of the split version whose manifest is `text`) a verified copy of it."""
    shards = manifest.get("shards", [])
    local_manifest = dest / MANIFEST
    try:
        state = json.loads((dest / VERIFIED).read_text())
        if not isinstance(state, dict):
            state = {}
    except (OSError, ValueError):
        state = {}

    def verified(s) -> bool:
        tar, idx = dest / s["name"], dest / s["index"]
        rec = state.get(s["name"])
        if not (tar.is_file() and idx.is_file()) or not isinstance(rec, dict) or rec.get("index_stamp") != file_stamp(idx):
            return False
        if not full and rec.get("sha256") == s["sha256"] and rec.get("stamp") == file_stamp(tar):
            return True
        if tar.stat().st_size != s["bytes"] or sha256_file(tar) != s["sha256"] or not _index_matches(idx, s):
            return False
        rec.update(sha256=s["sha256"], stamp=file_stamp(tar), index=s["index"])
        return True

    todo = [s for s in shards if not verified(s)]
    listed = {s[k] for s in shards for k in ("name", "index")} | _KEEP
    stray = [p for p in dest.iterdir() if p.name not in listed]
    state = {s["name"]: state[s["name"]] for s in shards if s not in todo and s["name"] in state}
    if not todo and not stray and local_manifest.is_file() and local_manifest.read_text() == text:
        atomic_write_text(dest / VERIFIED, dump_json(state))
        return
    if local_manifest.is_file():
        local_manifest.unlink()  # from here on the copy is incomplete until the new manifest lands
        fsync_dir(dest)
    for p in stray:  # temporaries of a killed fill (we hold the lock: no fill is running)
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    donors = _verified_in_other_versions(dest) if todo else {}
    linked = 0
    try:
        for s in todo:
            if s["sha256"] in donors and _link(dest, s, donors[s["sha256"]], state, full):
                linked += 1
            else:
                _fetch(uri, dest, s, state)
    finally:
        atomic_write_text(dest / VERIFIED, dump_json(state))
    fsync_dir(dest)
    atomic_write_text(local_manifest, text)  # last: marks the local copy complete
    if log:
        log(f"shard cache: {uri} -> {dest} ({len(todo) - linked} of {len(shards)} shards fetched"
            + (f", {linked} unchanged ones linked from an older version)" if linked else ")"))


def _verified_in_other_versions(dest: Path) -> dict[str, tuple[Path, Path]]:
    """{sha256: (tar, index)} of the tars that other versions of the split hold verified (their recorded
    stamp unchanged): a new version links its unchanged shards instead of downloading them again."""
    found = {}
    for other in dest.parent.iterdir():
        if other == dest or not other.name.startswith(VERSION_PREFIX):
            continue
        try:
            state = json.loads((other / VERIFIED).read_text())
        except (OSError, ValueError):
            continue
        for name, rec in state.items() if isinstance(state, dict) else ():
            try:
                tar, idx = other / name, other / rec["index"]
                if rec["stamp"] == file_stamp(tar) and rec["index_stamp"] == file_stamp(idx):
                    found[rec["sha256"]] = (tar, idx)
            except (OSError, KeyError, TypeError):
                continue
    return found


def _link(dest: Path, s: dict, donor: tuple[Path, Path], state: dict, full: bool) -> bool:
    """Hard-link a verified tar (and its index) of another version as this version's shard `s`. Versions
    never rewrite a file in place (a repair replaces it), so the link keeps the verified bytes. False if
    the filesystem refuses, or (with `full`) the bytes do not hash to the manifest's sha256."""
    tar, idx = dest / s["name"], dest / s["index"]
    tmp = tar.with_name(tar.name + f".tmp-{os.getpid()}")
    idx_tmp = idx.with_name(idx.name + f".tmp-{os.getpid()}")
    state.pop(s["name"], None)
    try:
        os.link(donor[0], tmp)
        os.link(donor[1], idx_tmp)
        if tmp.stat().st_size != s["bytes"] or (full and sha256_file(tmp) != s["sha256"]) \
                or not _index_matches(idx_tmp, s):
            return False
        os.replace(idx_tmp, idx)
        os.replace(tmp, tar)
    except OSError:
        return False
    finally:
        for p in (tmp, idx_tmp):
            p.unlink(missing_ok=True)
    state[s["name"]] = {"sha256": s["sha256"], "stamp": file_stamp(tar), "index": s["index"],
                        "index_stamp": file_stamp(idx)}
    return True


def _index_matches(idx: Path, s: dict) -> bool:
    """The index file's size and sha256 are the manifest's (index files are small: always hashed). A
    manifest from before index files were recorded lists neither: its index is taken as it is."""
    if "index_sha256" not in s:
        return True
    return idx.stat().st_size == s.get("index_bytes") and sha256_file(idx) == s["index_sha256"]


def _fetch(uri: str, dest: Path, s: dict, state: dict) -> None:
    """Download one shard's tar (sha256-checked) and index; no temporary survives a failure."""
    tar, idx = dest / s["name"], dest / s["index"]
    tmp = tar.with_name(tar.name + f".tmp-{os.getpid()}")
    idx_tmp = idx.with_name(idx.name + f".tmp-{os.getpid()}")
    state.pop(s["name"], None)
    try:
        digest = objstore.download(objstore.join(uri, s["name"]), tmp)
        if digest != s["sha256"] or tmp.stat().st_size != s["bytes"]:
            raise ShardError(f"{uri}/{s['name']}: sha256 or size differs from the manifest (object damaged "
                             "or replaced; rerun the shard job)")
        objstore.download(objstore.join(uri, s["index"]), idx_tmp)
        if not _index_matches(idx_tmp, s):
            raise ShardError(f"{uri}/{s['index']}: sha256 or size differs from the manifest (object damaged "
                             "or replaced; rerun the shard job)")
        os.replace(idx_tmp, idx)
        os.replace(tmp, tar)  # last: a tar under its final name has been verified
    finally:
        for p in (tmp, idx_tmp):
            p.unlink(missing_ok=True)
    state[s["name"]] = {"sha256": s["sha256"], "stamp": file_stamp(tar), "index": s["index"],
                        "index_stamp": file_stamp(idx)}
