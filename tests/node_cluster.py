"""A multi-node Ray cluster on this machine, run by tests in its own process and driven over stdin:
a head (no CPUs: the drivers and Ray Train's controllers live there) and worker nodes of 1 CPU each,
every node with its own node-local shard cache (INCEPTION_SHARD_CACHE under the cluster's folder), all
on loopback (Ray's own multi-node test utility, `ray.cluster_utils.Cluster`).

    python tests/node_cluster.py FOLDER a b

prints `READY {"address", "temp_dir", "nodes": {name: node id}, "caches": {name: folder}}`, then reads
one command a line and answers one JSON line each:

    kill PID   SIGKILL every process of the worker node that runs process PID: its raylet (with the
               node's object store), its agents and every worker process below the raylet, in one
               sweep, as when a machine disappears  -> KILLED {"name", "node_id", "pids"}
               (and "alive_after": those still running 10 s later)
    add NAME   a new worker node (spare, replacement) -> ADDED {"name", "node_id"}
    nodes      Ray's view of the nodes              -> NODES {node id: alive}
    quit       stop the cluster and exit
"""

import json
import sys
import time
from pathlib import Path

import pipeline  # noqa: F401  (Ray on loopback: it reads the setting when it is imported)

# isort: split
import psutil
import ray

from benchmarks.chaos import kill_node, local_cluster, node_pids


def running(pid: int) -> bool:
    """Whether process `pid` still runs (a killed child not yet reaped by its parent does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(folder: str, names: list[str]) -> None:
    folder = Path(folder)
    cluster, add_node, nodes = local_cluster(folder, names)
    ray.init(address=cluster.address)

    def say(word: str, obj: dict) -> None:
        print(f"{word} {json.dumps(obj)}", flush=True)

    say("READY", {"address": cluster.address, "temp_dir": str(folder / "ray"),
                  "nodes": {n: node.node_id for n, node in nodes.items()},
                  "caches": {n: str(folder / f"cache-{n}") for n in nodes}})
    try:
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "kill":
                pid = int(arg)
                [(name, node)] = [(n, nd) for n, nd in nodes.items() if pid in node_pids(nd)]
                pids = kill_node(node)
                deadline = time.monotonic() + 10
                while (left := [p for p in pids if running(p)]) and time.monotonic() < deadline:
                    time.sleep(0.1)
                say("KILLED", {"name": name, "node_id": node.node_id, "pids": pids, "alive_after": left})
            elif cmd == "add":
                node = nodes[arg] = add_node(arg)
                say("ADDED", {"name": arg, "node_id": node.node_id})
            elif cmd == "nodes":  # Ray's view: node id -> alive
                say("NODES", {n["NodeID"]: n["Alive"] for n in ray.nodes()})
            elif cmd == "quit":
                break
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
