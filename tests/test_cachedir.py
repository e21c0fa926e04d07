"""The node-local cache folders are private: the folder and the way to it (no process needed)."""

import os
import stat
import tempfile

import pytest

from pipeline.shards.cachedir import CacheDirError, private_dir, user_cache_root


def test_a_cache_folder_others_could_replace_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename or replace what is in it (no sticky bit)
    with pytest.raises(CacheDirError, match="writable by group or others without the sticky bit"):
        private_dir(shared / "cache")
    shared.chmod(0o1777)  # as /tmp: others cannot touch our entry
    assert stat.S_IMODE(private_dir(shared / "cache").stat().st_mode) == 0o700


def test_a_link_as_the_cache_folder_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(CacheDirError, match="is a symbolic link"):
        private_dir(tmp_path / "link")


def test_the_temp_folder_fallback_is_made_safely(tmp_path, monkeypatch):
    """Without a home folder the cache goes to <temp>/inception-pipeline-<uid>: a link or a folder placed
    there first by someone else is refused, never used."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "not-a-home")  # not absolute: no usable home folder
    fallback = user_cache_root()
    assert fallback == tmp / f"inception-pipeline-{os.getuid()}"
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    fallback.symlink_to(theirs)  # placed there before us
    with pytest.raises(CacheDirError, match="symbolic link"):
        private_dir(fallback)
    fallback.unlink()
    if os.getuid() == 0:  # a folder of another user
        fallback.mkdir(mode=0o700)
        os.chown(fallback, 65534, 65534)
        with pytest.raises(CacheDirError, match="owned by uid 65534"):
            private_dir(fallback)
        fallback.rmdir()
    made = private_dir(fallback)
    assert not made.is_symlink() and stat.S_IMODE(made.stat().st_mode) == 0o700


_UMASK_002 = """
import os, stat, sys
os.umask(0o002)
from pipeline.shards.cachedir import CacheDirError, private_dir, user_cache_root
try:
    made = private_dir(user_cache_root() / "shards")
except CacheDirError as e:
    print("refused:", e)
    sys.exit(3)
print(oct(stat.S_IMODE(made.parent.parent.stat().st_mode)), oct(stat.S_IMODE(made.stat().st_mode)))
"""


def _private_group() -> bool:
    import grp
    import pwd
    group = grp.getgrgid(os.getgid())
    return not group.gr_mem and group.gr_name == pwd.getpwuid(os.getuid()).pw_name


def test_umask_002_users_get_a_cache(tmp_path):
    """Accounts with a private group usually run with umask 002: the first cache use in a fresh home
    makes ~/.cache 0700, and a ~/.cache another tool made 775 is accepted when its group is the user's
    own (and refused when the group may hold others)."""
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.getcwd()
    run = subprocess.run([sys.executable, "-c", _UMASK_002], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.split() == ["0o700", "0o700"]  # ~/.cache and the cache folder

    # ~/.cache as pip makes it under umask 002
    (home / ".cache" / "inception-pipeline" / "shards").rmdir()
    (home / ".cache" / "inception-pipeline").rmdir()
    (home / ".cache").chmod(0o775)
    run = subprocess.run([sys.executable, "-c", _UMASK_002], env=env, capture_output=True, text=True, timeout=60)
    if _private_group():
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.split() == ["0o775", "0o700"]  # ~/.cache left as it was
    else:  # a group with other members could replace the cache folder
        assert run.returncode == 3 and "without the sticky bit" in run.stdout, run.stdout + run.stderr
