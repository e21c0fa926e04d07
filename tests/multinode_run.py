"""Run by tests/test_multinode.py in its own process: a 3-node Ray cluster on this machine (a head and
two workers, 1 CPU and a custom resource each) and the shard job across it, onto one shared path.
Prints one JSON line with what ran where. (Training across nodes, and losing one of them mid-training:
tests/test_s3.py.)"""

import json
import sys
from pathlib import Path

import pipeline  # noqa: F401  (Ray on loopback: it reads the setting when it is imported)

# isort: split
import ray
from conftest import cluster_head_args
from ray.cluster_utils import Cluster

from pipeline.config import ShardConfig
from pipeline.shards.job import run as shard


def main(fmnist_root: str, shared: str) -> None:
    shared = Path(shared)  # one machine: every node sees it, as a shared FS
    cluster = Cluster(initialize_head=True, head_node_args=cluster_head_args(num_cpus=1, resources={"head": 1}))
    cluster.add_node(num_cpus=1, resources={"worker_a": 1})
    cluster.add_node(num_cpus=1, resources={"worker_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        lines = []
        shard(ShardConfig(root=fmnist_root, out=str(shared / "shards"), limit=600, samples_per_shard=100, workers=3),
              log=lines.append)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        addresses = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        print("MULTINODE-RESULT " + json.dumps({"nodes": nodes, "addresses": addresses, "lines": lines,
                                                      "shared": str(shared)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
