"""Chaos run: train a short ensemble while faults strike, then print what survived: per replica, epochs
logged to MLflow once / twice / never, child runs, completed tags and registered model versions.

Faults, each at a random moment (every K seconds, +-50%):
- `--kills N`: SIGKILL a random Ray Train worker of this run (found with the state API);
- `--node-kills N`: SIGKILL every process of a random worker node that runs one of this run's workers
  (its raylet and object store, its agents, its workers), as when a spot node is reclaimed, and start a
  replacement node. The run then gets a cluster of its own on this machine: a head without CPUs and one
  worker node of 1 CPU per replica, on loopback, each with its own node-local shard cache;
- `--tracking-outage S`: stop the MLflow server for S seconds, then start it again on the same address
  and database (a deploy, a database failover). The run then gets an MLflow server of its own (on a free
  loopback port, its database and artifacts under --storage).

Needs demo shards (`make shard-demo`) and, without --node-kills, a running Ray cluster (`make up`);
`make chaos` does both (CHAOS_ARGS adds options). Only this run's own workers and nodes are killed.

    python benchmarks/chaos.py --shards .run/shards/fashion-mnist [--kills 6] [--every 12] [--replicas 2]
    python benchmarks/chaos.py --shards .run/shards/fashion-mnist --kills 2 --node-kills 2 --tracking-outage 60
"""

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (loopback Ray defaults before ray is imported)


def node_pids(node) -> set[int]:
    """Every live process of a Ray node started on this machine by `ray.cluster_utils.Cluster`: the
    processes Ray started for it and all their descendants (the raylet's worker processes lead process
    groups of their own, so a process group would miss them)."""
    import psutil

    pids = set()
    for infos in node.all_processes.values():
        for info in infos:
            if info.process.poll() is None:
                pids.add(info.process.pid)
                with contextlib.suppress(psutil.NoSuchProcess):
                    pids |= {c.pid for c in psutil.Process(info.process.pid).children(recursive=True)}
    return pids


def kill_node(node) -> list[int]:
    """SIGKILL every process of `node` in one sweep (none gets to react to the others' deaths)."""
    pids = sorted(node_pids(node))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for infos in node.all_processes.values():  # reap the ones this process started
        for info in infos:
            with contextlib.suppress(subprocess.TimeoutExpired):
                info.process.wait(10)
    return pids


def local_cluster(folder: Path, names: list[str]):
    """A head without CPUs (the driver and Ray Train's controllers run there) and a worker node of 1 CPU
    per name, on loopback, each with its own shard cache (`folder`/cache-NAME); returns (cluster,
    add_node(name) -> node, {name: node})."""
    from ray.cluster_utils import Cluster

    # (Ray's Cluster records the head's address in /tmp/ray/ray_current_cluster: on a machine where no Ray
    # ever ran, that folder does not exist yet)
    Path(tempfile.gettempdir(), "ray").mkdir(exist_ok=True)
    # every port of its own: a `make up` cluster on this machine keeps its dashboard, client and agent ports;
    # and RAY_ADDRESS naming this one for its processes: beside another cluster, Ray's own address lookups
    # (Ray Train's placement-group cleaner, every second per replica) would find both, warn, and slow training
    port = free_port()
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": str(folder / "ray"), "gcs_server_port": port, "dashboard_port": free_port(),
        "ray_client_server_port": free_port(), "dashboard_agent_listen_port": free_port()})

    def add_node(name: str):
        return cluster.add_node(num_cpus=1, resources={f"node_{name}": 1}, temp_dir=str(folder / "ray"),
                                env_vars={"INCEPTION_SHARD_CACHE": str(folder / f"cache-{name}")})

    nodes = {name: add_node(name) for name in names}
    cluster.wait_for_nodes()
    return cluster, add_node, nodes


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


class TrackingServer:
    """An MLflow server of this run's own (SQLite and artifacts under `folder`) on a free loopback port,
    which can be stopped and started again on the same address and database."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts")]
        with open(self.folder / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"chaos: the MLflow server exited; see {self.folder / 'server.log'}")
            time.sleep(0.5)
        raise SystemExit(f"chaos: the MLflow server did not answer within 300 s; see {self.folder / 'server.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="a shard job output folder with train/ and val/")
    p.add_argument("--kills", type=int, default=6, help="Ray Train workers to SIGKILL (default: 6)")
    p.add_argument("--node-kills", type=int, default=0,
                   help="worker nodes to SIGKILL, each replaced by a new node; runs on a cluster of its own (default: 0)")
    p.add_argument("--tracking-outage", type=float, default=0, metavar="S",
                   help="stop the MLflow server once for S seconds; runs with a server of its own (default: 0, none)")
    p.add_argument("--every", type=float, default=10.0, help="seconds between faults, +-50%% jitter (default: 10)")
    p.add_argument("--replicas", type=int, default=2, help="default: 2")
    p.add_argument("--epochs", type=int, default=10, help="default: 10")
    p.add_argument("--storage", default=".run/chaos", help="checkpoint storage (default: .run/chaos)")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
                   help="MLflow server (default: $MLFLOW_TRACKING_URI or http://127.0.0.1:5000; not used with "
                        "--tracking-outage)")
    p.add_argument("--seed", type=int, default=0, help="victim and timing choices (default: 0)")
    args = p.parse_args()
    if min(args.kills, args.node_kills, args.tracking_outage, args.replicas - 1, args.epochs - 1) < 0 or args.every <= 0:
        p.error("--kills, --node-kills and --tracking-outage must be >= 0, --replicas and --epochs >= 1, --every > 0")

    import mlflow
    import ray
    from ray.util.state import list_actors

    from pipeline.config import load_recipe
    from pipeline.train.ensemble import run_ensemble

    name = f"chaos-{int(time.time())}"
    storage = Path(args.storage).resolve()
    own = storage / f"{name}-services"
    server = cluster = folder = None
    try:
        server = TrackingServer(own / "mlflow") if args.tracking_outage else None
        uri = server.uri if server else args.mlflow_uri
        cfg = load_recipe("demo", [f"data.shards={Path(args.shards).resolve()}", "data.limit_train=1280",
                                   "data.limit_val=256", f"schedule.epochs={args.epochs}",
                                   f"ensemble.replicas={args.replicas}", f"ensemble.max_concurrent={args.replicas}",
                                   f"ensemble.max_failures={args.kills + args.node_kills + 2}", f"ensemble.name={name}",
                                   f"ensemble.storage_path={storage}", f"tracking.uri={uri}", "tracking.log_every=0"])
        add_node = None
        if args.node_kills:
            folder = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))  # (short: Ray's socket paths are limited)
            os.environ.pop("RAY_ADDRESS", None)  # (`make up`'s: neither its nodes nor the state API may see it)
            cluster, add_node, _ = local_cluster(folder, [str(i) for i in range(args.replicas)])
            os.environ["RAY_ADDRESS"] = cluster.address
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
            print(f"[chaos] a cluster of its own: a head and {args.replicas} worker node(s) of 1 CPU", flush=True)
        else:
            ray.init(log_to_driver=False, configure_logging=False)
        if server:
            print(f"[chaos] an MLflow server of its own at {uri} ({own / 'mlflow'})", flush=True)
        job = ray.get_runtime_context().get_job_id()
        result: dict = {}

        def train():
            try:
                result["out"] = run_ensemble(cfg, log=lambda m: print(f"[driver] {m}", flush=True))
            except Exception as e:  # reported below
                result["error"] = e

        t = threading.Thread(target=train, daemon=True)
        t.start()
        rng = random.Random(args.seed)
        faults = ["worker"] * args.kills + ["node"] * args.node_kills + ["outage"] * bool(args.tracking_outage)
        rng.shuffle(faults)
        kills, node_kills, outages = [], [], []
        t0 = time.monotonic()

        def workers():
            # (a lost node's actors still show ALIVE for a while)
            up = {n.node_id for n in cluster.worker_nodes} if cluster else None
            return [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                           limit=1000) if a.job_id == job and a.pid and (up is None or a.node_id in up)]

        while t.is_alive() and faults:
            time.sleep(args.every * rng.uniform(0.5, 1.5))
            live = workers() if faults[0] != "outage" else []
            if not t.is_alive() or (faults[0] != "outage" and not live):
                continue
            now = round(time.monotonic() - t0, 1)
            fault = faults.pop(0)
            if fault == "worker":
                victim = rng.choice(live)
                try:
                    os.kill(victim.pid, signal.SIGKILL)
                except ProcessLookupError:  # gone meanwhile: another victim next time
                    faults.insert(0, fault)
                    continue
                kills.append((now, victim.pid))
                print(f"[chaos] t={now}s SIGKILL Ray Train worker pid {victim.pid}", flush=True)
            elif fault == "node":
                busy = {a.node_id for a in live}
                nodes = [n for n in cluster.worker_nodes if n.node_id in busy]
                if not nodes:
                    faults.insert(0, fault)
                    continue
                node = rng.choice(nodes)
                pids = kill_node(node)
                cluster.worker_nodes.discard(node)
                new = add_node(f"r{len(node_kills)}")
                node_kills.append((now, node.node_id))
                print(f"[chaos] t={now}s SIGKILL every process of node {node.node_id[:12]} ({len(pids)} processes); "
                      f"replacement node {new.node_id[:12]} started", flush=True)
            else:
                server.stop()
                print(f"[chaos] t={now}s MLflow server stopped for {args.tracking_outage:.0f} s", flush=True)
                time.sleep(args.tracking_outage)
                server.start()
                outages.append((now, args.tracking_outage))
                print(f"[chaos] t={round(time.monotonic() - t0, 1)}s MLflow server started again at {uri}",
                      flush=True)
        t.join()
        if "error" in result:
            print(f"[chaos] the ensemble failed: {type(result['error']).__name__}: {result['error']}")

        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        parents = client.search_runs([exp.experiment_id], f"tags.ensemble = '{name}' and tags.kind = 'ensemble'")
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'") \
            if parents else []
        print(f"\nchaos summary: {len(kills)} worker SIGKILL(s), {len(node_kills)} node(s) lost, {len(outages)} "
              f"tracking outage(s) in {time.monotonic() - t0:,.0f}s; ensemble {name}: {len(parents)} parent run(s), "
              f"{len(children)} child run(s) for {args.replicas} replicas")
        missed = args.kills - len(kills) + args.node_kills - len(node_kills) + bool(args.tracking_outage) - len(outages)
        if missed:
            print(f"[chaos] {missed} fault(s) not delivered: the training ended first (fewer --every seconds, or more "
                  "--epochs)")
        bad = len(parents) != 1 or len(children) != args.replicas or "error" in result
        print(f"{'replica':>7} {'runs':>4} {'logged once':>11} {'twice+':>6} {'lost':>4} {'completed':>9} {'versions':>8} "
              f"{'resumed from':>12}")
        for i in range(args.replicas):
            runs = [c for c in children if c.data.tags.get("replica") == str(i)]
            steps = [m.step for r in runs for m in client.get_metric_history(r.info.run_id, "val/top1_err")]
            once = sum(steps.count(e) == 1 for e in range(1, args.epochs + 1))
            twice = sum(steps.count(e) > 1 for e in range(1, args.epochs + 1))
            lost = sum(steps.count(e) == 0 for e in range(1, args.epochs + 1))
            versions = sum(len(client.search_model_versions(f"name = 'googlenet-replica' and run_id = '{r.info.run_id}'"))
                           for r in runs)
            completed = all(r.data.tags.get("completed") == "true" for r in runs) and bool(runs)
            resumed = ",".join(r.data.tags.get("resumed_from_epoch", "-") for r in runs) or "-"
            print(f"{i:>7} {len(runs):>4} {once:>11} {twice:>6} {lost:>4} {str(completed):>9} {versions:>8} {resumed:>12}")
            bad |= len(runs) != 1 or twice or lost or not completed or versions != 1
        print("verdict:", "FAILED: something was lost or doubled" if bad else
              f"INCOMPLETE: {missed} fault(s) not delivered" if missed else
              "every epoch logged exactly once, one run and one model version per replica")
        return 1 if bad or missed else 0
    finally:  # also on an error or Ctrl-C: nothing of the run's own left running
        if server:
            server.stop()
        if ray.is_initialized():
            ray.shutdown()
        if cluster:
            cluster.shutdown()
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
