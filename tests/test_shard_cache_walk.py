"""The node-local shard cache tolerates another process removing split versions while it looks at them
(an eviction in a second training process): the walk leaves a vanished version out, never fails."""

import subprocess
import sys

from pipeline.shards import cache

CHURN = """
import os, shutil, sys
root, n = sys.argv[1], int(sys.argv[2])
print("started", flush=True)
removed = 0
while sys.stdin.readline().strip() != "stop":  # one pass per line the test sends
    for i in range(n):
        v = os.path.join(root, "s3", "bucket", f"split{i}", f"v-{i:016x}")
        shutil.rmtree(v, ignore_errors=True)
        removed += 1
        os.mkdir(v)
        open(os.path.join(v, ".in-use.lock"), "w").close()
print(removed, flush=True)
"""


def test_versions_removed_during_the_walk_are_left_out(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(cache.CACHE_GB_ENV, "1000")  # nothing needs evicting: the walk is what is checked
    root = cache.cache_root()
    n = 100
    for i in range(n):
        v = root / "s3" / "bucket" / f"split{i}" / f"v-{i:016x}"
        v.mkdir(parents=True)
        (v / cache.IN_USE_LOCK).touch()
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(root), str(n)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert churn.stdout.readline().strip() == "started"
        for _ in range(60):
            churn.stdin.write("go\n")
            churn.stdin.flush()
            assert cache.evict() == []  # (raised FileNotFoundError when a version vanished mid-walk)
            assert all(d.name.startswith(cache.VERSION_PREFIX) for d in cache._version_dirs(root))
        churn.stdin.write("stop\n")
        churn.stdin.flush()
        assert int(churn.stdout.readline()) > 0  # versions were removed while the walks ran
    finally:
        churn.kill()
        churn.wait()
