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
