"""Node-local caches that another local user cannot plant or swap files in, and whose files are known
unchanged since they were verified.

- `private_dir`: a cache folder is created with mode 0700, and an existing one is refused unless it is
  owned by this user and not writable by group or others (a shared /tmp folder pre-created by someone
  else would let them serve their files as ours).
- `file_stamp`: (size, mtime_ns, ctime_ns, inode) of a file, recorded after a full sha256: while the
  stamp is unchanged the file is the one that was hashed. A write changes mtime and ctime, `touch -d`
  changes ctime (which no unprivileged call sets back), a replacement changes the inode.
"""

from __future__ import annotations

import os
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


def check_private(path: Path) -> None:
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise CacheDirError(f"cache folder {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
                            "use a folder of your own")
    if st.st_mode & 0o022:
        raise CacheDirError(f"cache folder {path} is writable by group or others (mode {st.st_mode & 0o777:o}); "
                            f"run `chmod 700 {path}` or use a folder of your own")


def private_dir(path: str | os.PathLike) -> Path:
    """`path`, created 0700 if missing (with its missing parents), after checking it is private."""
    path = Path(path)
    if not path.exists():
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise CacheDirError(f"cannot create cache folder {path}: {e.strerror or e}") from None
    check_private(path)
    return path


def file_stamp(path: str | os.PathLike) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
