"""The corrupt-image scan's cache: private to the user, keyed by what was scanned, never taken on trust."""

import json
import os
import stat

from conftest import jpeg_bytes, write_test_split

from pipeline.data.scan import corrupt_images
from pipeline.shards.splits import open_split

CORRUPT = "test-split-000000.tar:s000003"


def scan(info, cache):
    lines = []
    found = corrupt_images(info, cache, log=lines.append, use_ray=False)
    return found, "\n".join(lines)


def test_the_scan_cache_is_private_and_keyed_by_what_was_scanned(tmp_path):
    images = [jpeg_bytes(seed=i) for i in range(12)]
    images[3] = images[3][: len(images[3]) // 2]  # truncated: PIL cannot decode it
    info = open_split(write_test_split(tmp_path / "split", images, [i % 3 for i in range(12)]))
    cache = tmp_path / "scans"
    found, log = scan(info, cache)
    assert found == [CORRUPT] and "decoding 12 images" in log
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    found, log = scan(info, cache)
    assert found == [CORRUPT] and "cached in" in log
    [entry] = cache.iterdir()

    # an entry that does not record the fingerprint it is filed under (edited, or written for other data)
    body = json.loads(entry.read_text())
    entry.write_text(json.dumps({**body, "fingerprint": "0" * 24, "corrupt": []}))
    found, log = scan(info, cache)
    assert found == [CORRUPT] and "ignoring cache entry" in log and "decoding" in log

    # an entry another user could have written: owned by someone else, or writable by others
    entry.chmod(0o666)
    found, log = scan(info, cache)
    assert found == [CORRUPT] and "writable by group or others" in log
    if os.getuid() == 0:
        entry.chmod(0o644)
        os.chown(entry, 65534, 65534)
        found, log = scan(info, cache)
        assert found == [CORRUPT] and "owned by uid 65534" in log
        os.chown(entry, 0, 0)
        os.chown(cache, 65534, 65534)  # the folder itself, e.g. pre-created in a shared /tmp
        found, log = scan(info, cache)
        assert found == [CORRUPT] and "not cached" in log and "owned by uid 65534" in log
        os.chown(cache, 0, 0)

    # a tar rewritten in place, same size, mtime put back: another fingerprint, scanned again
    tar = info.tars[0]
    st = tar.stat()
    tar.write_bytes(tar.read_bytes())
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    found, log = scan(info, cache)
    assert "decoding 12 images" in log and "cached in" not in log
