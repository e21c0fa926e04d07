"""Chaos run: train a short ensemble while SIGKILLing a random Ray Train worker every K seconds, then
print what survived: per replica, epochs logged to MLflow once / twice / never, child runs, completed
tags and registered model versions.

Needs a running Ray cluster and MLflow server (`make up`) and demo shards (`make shard-demo`);
`make chaos` does all three. Only this run's own workers are killed (Ray Train worker actors whose
job is this process's Ray job, found with the state API).

    python benchmarks/chaos.py --shards .run/shards/fashion-mnist [--kills 6] [--every 12] [--replicas 2]
"""

import argparse
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (loopback Ray defaults before ray is imported)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="a shard job output folder with train/ and val/")
    p.add_argument("--kills", type=int, default=6, help="SIGKILLs to deliver (default: 6)")
    p.add_argument("--every", type=float, default=10.0, help="seconds between kills, +-50%% jitter (default: 10)")
    p.add_argument("--replicas", type=int, default=2, help="default: 2")
    p.add_argument("--epochs", type=int, default=10, help="default: 10")
    p.add_argument("--storage", default=".run/chaos", help="checkpoint storage (default: .run/chaos)")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    p.add_argument("--seed", type=int, default=0, help="victim and timing choices (default: 0)")
    args = p.parse_args()

    import mlflow
    import ray
    from ray.util.state import list_actors

    from pipeline.config import load_recipe
    from pipeline.train.ensemble import run_ensemble

    name = f"chaos-{int(time.time())}"
    cfg = load_recipe("demo", [f"data.shards={Path(args.shards).resolve()}", "data.limit_train=1280",
                               "data.limit_val=256", f"schedule.epochs={args.epochs}",
                               f"ensemble.replicas={args.replicas}", f"ensemble.max_concurrent={args.replicas}",
                               f"ensemble.max_failures={args.kills + 2}", f"ensemble.name={name}",
                               f"ensemble.storage_path={Path(args.storage).resolve()}",
                               f"tracking.uri={args.mlflow_uri}", "tracking.log_every=0"])
    ray.init(log_to_driver=False, configure_logging=False)
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
    kills = []
    t0 = time.monotonic()
    while t.is_alive() and len(kills) < args.kills:
        time.sleep(args.every * rng.uniform(0.5, 1.5))
        workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                          limit=1000) if a.job_id == job and a.pid]
        if not workers or not t.is_alive():
            continue
        victim = rng.choice(workers)
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills.append((round(time.monotonic() - t0, 1), victim.pid))
        print(f"[chaos] t={kills[-1][0]}s SIGKILL Ray Train worker pid {victim.pid} ({len(kills)}/{args.kills})",
              flush=True)
    t.join()
    if "error" in result:
        print(f"[chaos] the ensemble failed: {type(result['error']).__name__}: {result['error']}")

    client = mlflow.MlflowClient(args.mlflow_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parents = client.search_runs([exp.experiment_id], f"tags.ensemble = '{name}' and tags.kind = 'ensemble'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'") \
        if parents else []
    print(f"\nchaos summary: {len(kills)} SIGKILLs in {time.monotonic() - t0:,.0f}s; ensemble {name}: "
          f"{len(parents)} parent run(s), {len(children)} child run(s) for {args.replicas} replicas")
    bad = len(kills) < args.kills or len(parents) != 1 or len(children) != args.replicas or "error" in result
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
          "every epoch logged exactly once, one run and one model version per replica")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
