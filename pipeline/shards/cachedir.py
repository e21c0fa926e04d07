"""Node-local caches that another local user cannot plant or swap files in, and whose files are known
unchanged since they were verified.

- `private_dir`: a cache folder is created with mode 0700, and an existing one is refused unless it is
  a real folder (not a symbolic link), owned by this user and not writable by group or others, and
  every folder on the way to it is owned by this user or root and, where others may write in it, has
  the sticky bit (as /tmp does), so nobody else can rename or replace an entry on that way (a shared
  /tmp folder pre-created by someone else, or a link they placed, would let them serve their files as
  ours). A folder of this user on the way may be writable by its group when that group is the user's
  private group (named as the user, no listed members: the usual setup with umask 002, where tools
  such as pip make ~/.cache mode 775). Missing folders on the way are created 0700.
- `file_stamp`: (size, mtime_ns, ctime_ns, inode) of a file, recorded after a full sha256: while the
  stamp is unchanged the file is the one that was hashed. A write changes mtime and ctime, `touch -d`
  changes ctime (which no unprivileged call sets back), a replacement changes the inode.
"""

from __future__ import annotations

import grp
import os
import pwd
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


def _private_group(gid: int, uid: int) -> bool:
    """`gid` is this user's own group: their primary group, named as the user, with no listed members."""
    if gid != os.getgid():
        return False
    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(uid)
    except KeyError:
        return False
    return not group.gr_mem and group.gr_name == user.pw_name


def _check_above(path: Path, uid: int) -> None:
    """Every folder above `path`, as written and as the links in it resolve, is one nobody else can
    change the entries of: owned by this user or root, and sticky wherever group or others may write
    (a group write bit is fine on a folder of this user whose group is the user's private group)."""
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
        shared = st.st_mode & 0o002 or (st.st_mode & 0o020 and not (st.st_uid == uid and _private_group(st.st_gid, uid)))
        if shared and not st.st_mode & stat.S_ISVTX:
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
    """`path`, created 0700 if missing (with its missing parents, each also 0700: Path.mkdir would give
    them the umask's mode, 775 under umask 002), after checking it is private. The folder itself is made
    with one mkdir: if someone else placed a folder or a link there first, that is found and refused,
    never used."""
    path = Path(os.path.abspath(path))
    try:
        for d in reversed(path.parents):
            if not os.path.lexists(d):
                try:
                    os.mkdir(d, 0o700)
                except FileExistsError:
                    pass
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
