"""A 3-node Ray cluster on this machine runs the shard job across its nodes, onto one shared path (a
path every node mounts at the same place). Training across nodes, with a node lost mid-training and
everything in object storage: tests/test_s3.py::test_a_node_lost_mid_training_with_everything_on_s3."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FASHION_MNIST_ROOT, REPO

pytestmark = pytest.mark.slow


def test_three_nodes_share_the_shard_job(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_run.py"), str(FASHION_MNIST_ROOT),
                        str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("MULTINODE-RESULT ")]
    out = json.loads(line.split(" ", 1)[1])
    assert len(out["nodes"]) == 3
    assert out["addresses"] == ["127.0.0.1"]  # every node on loopback, none on the machine's network address
    shard_line = next(line for line in out["lines"] if line.startswith("shards written by tasks on"))
    assert int(shard_line.split()[5]) >= 2  # shard tasks ran on more than one node
    manifest = json.loads((Path(out["shared"]) / "shards" / "fashion-mnist" / "train" / "manifest.json").read_text())
    assert sum(s["num_samples"] for s in manifest["shards"]) == manifest["num_samples"] == 600  # limit=600
