"""A 3-node Ray cluster on this machine runs the shard job and a 2-replica training across nodes,
with shards and checkpoints on one shared path."""

import json
import subprocess
import sys

import mlflow
import pytest
from conftest import FASHION_MNIST_ROOT, REPO

pytestmark = pytest.mark.slow


def test_three_nodes_share_the_work(mlflow_server):
    p = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_run.py"), str(FASHION_MNIST_ROOT), mlflow_server],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("MULTINODE-RESULT ")]
    out = json.loads(line.split(" ", 1)[1])
    assert len(out["nodes"]) == 3
    assert out["addresses"] == ["127.0.0.1"]  # every node on loopback, none on the machine's network address
    shard_line = next(line for line in out["lines"] if line.startswith("shards written by tasks on"))
    assert int(shard_line.split()[5]) >= 2  # shard tasks ran on more than one node
    client = mlflow.MlflowClient(mlflow_server)
    children = client.search_runs([out["experiment_id"]], f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    assert len(children) == 2 and all(c.data.tags["completed"] == "true" for c in children)
    train_nodes = {c.data.tags["ray_node_id"] for c in children}
    assert len(train_nodes) == 2 and train_nodes <= set(out["nodes"])  # one replica per 1-CPU node
    from pathlib import Path

    shared = Path(out["shared"])
    assert (shared / "shards" / "fashion-mnist" / "train" / "manifest.json").is_file()
    assert len(list((shared / "ray_results").glob("multinode-replica-*/checkpoint_*"))) >= 2
