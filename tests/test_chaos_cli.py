"""`make chaos`'s runner (benchmarks/chaos.py) explains its faults and refuses bad counts before it
starts anything; the faults themselves are the tests in test_kill.py and test_s3.py."""

import subprocess
import sys

from conftest import REPO

CHAOS = REPO / "benchmarks" / "chaos.py"


def test_chaos_lists_its_faults_and_refuses_bad_counts(tmp_path):
    p = subprocess.run([sys.executable, str(CHAOS), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    for option in ("--kills", "--node-kills", "--tracking-outage", "--every", "--replicas"):
        assert option in p.stdout, option
    for bad in (["--node-kills", "-1"], ["--tracking-outage", "-5"], ["--replicas", "0"]):
        p = subprocess.run([sys.executable, str(CHAOS), "--shards", str(tmp_path), "--storage", str(tmp_path / "s"),
                            *bad], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "must be >= 0" in p.stderr, (bad, p.stderr[-500:])
        assert not (tmp_path / "s").exists()  # nothing started
