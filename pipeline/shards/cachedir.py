"""Node-local caches that another local user cannot plant or swap files in, and whose files are known
unchanged since they were verified.

- `private_dir`: a cache folder is created with mode 0700, and an existing one is refused unless it is
  a real folder (not a symbolic link), owned by this user and not writable by group or others, and
  every folder on the way to it is owned by this user or root and, where others may write in it, has
  the sticky bit (as /tmp does), so nobody else can rename or replace an entry on that way (a shared
  /tmp folder pre-created by someone else, or a link they placed, would let them serve their files as
  ours).
- `file_stamp`: (size, mtime_ns, ctime_ns, inode) of a file, recorded after a full sha256: while the
  stamp is unchanged the file is the one that was hashed. A write changes mtime and ctime, `touch -d`
  changes ctime (which no unprivileged call sets back), a replacement changes the inode.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class CacheDirError(Exception):
    """A cache folder is not private to this user."""


def user_cache_root(app: str = "inception-pipeline") -> Path:
    """$XDG_CACHE_HOME/<app> (if set and absolute, per the XDG spec), else ~/.cache/<app>; without a home
    folder, a per-user folder under the system temp dir."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / app
    home = os.path.expanduser("~")
    if home and home != "~" and os.path.isabs(home):
        return Path(home) / ".cache" / app
    return Path(tempfile.gettempdir()) / f"{app}-{os.getuid()}"


def _check_above(path: Path, uid: int) -> None:
    """Every folder above `path`, as written and as the links in it resolve, is one nobody else can
    change the entries of: owned by this user or root, and sticky wherever group or others may write."""
    above = list(path.parents) + list(Path(os.path.realpath(path.parent)).parents) + [Path(os.path.realpath(path.parent))]
    for d in dict.fromkeys(above):
        lst = os.lstat(d)
        if stat.S_ISLNK(lst.st_mode) and lst.st_uid not in (0, uid):
            raise CacheDirError(f"{d}, on the way to cache folder {path}, is a symbolic link owned by uid "
                                f"{lst.st_uid}; use a folder of your own")
        st = os.stat(d)
        if st.st_uid not in (0, uid):
            raise CacheDirError(f"{d}, above cache folder {path}, is owned by uid {st.st_uid} (not you or root); "
                                "use a folder of your own")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise CacheDirError(f"{d}, above cache folder {path}, is writable by group or others without the "
                                f"sticky bit (mode {stat.S_IMODE(st.st_mode):o}): they could replace the cache "
                                "folder; use a folder of your own")


def check_private(path: str | os.PathLike) -> None:
    """Raise CacheDirError unless `path` (a cache folder or a file in one) is private to this user, on a
    way nobody else can change (see the module's docstring)."""
    path = Path(os.path.abspath(path))
    uid = os.getuid()
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise CacheDirError(f"cache folder {path} is a symbolic link; use a folder of your own, not a link")
    if st.st_uid != uid:
        raise CacheDirError(f"cache folder {path} is owned by uid {st.st_uid}, not by you (uid {uid}); "
                            "use a folder of your own")
    if st.st_mode & 0o022:
        raise CacheDirError(f"cache folder {path} is writable by group or others (mode {st.st_mode & 0o777:o}); "
                            f"run `chmod 700 {path}` or use a folder of your own")
    _check_above(path, uid)


def private_dir(path: str | os.PathLike) -> Path:
    """`path`, created 0700 if missing (with its missing parents), after checking it is private. The
    folder itself is made with one mkdir: if someone else placed a folder or a link there first, that is
    found and refused, never used."""
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CacheDirError(f"cannot create cache folder {path}: {e.strerror or e}") from None
    check_private(path)
    if not path.is_dir():
        raise CacheDirError(f"cache folder {path} is not a folder")
    return path


def file_stamp(path: str | os.PathLike) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
