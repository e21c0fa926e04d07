"""Run by tests/test_replica_planning.py in its own process: Ray clusters on this machine with 2, 16 and 8
logical CPUs and a memory limit, the demo recipe's plan on each (`max_concurrent: auto`; on 2 CPUs
`memory_per_worker: auto`, measured by a real probe; elsewhere that measured figure, stated), and on the
8-CPU cluster one training whose replicas Ray places under its plan. Prints one JSON line with what was
planned, measured and placed."""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (Ray on loopback: it reads the setting when it is imported)

# isort: split
from conftest import local_ray

from pipeline.config import load_recipe
from pipeline.train.ensemble import run_ensemble
from pipeline.train.memory import GIB, REPLICA_OVERHEAD

TINY = ["data.limit_train=32", "data.limit_val=16", "data.batch_size=8", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "tracking.register_model=null", "tracking.register_ensemble=null", "tracking.system_metrics_s=0", "tracking.log_every=1",
        "ensemble.budget_min_images=32"]


def recipe(shards, storage, uri, name, extra=()):
    return load_recipe("demo", [f"data.shards={shards}", f"ensemble.storage_path={storage}", f"tracking.uri={uri}",
                                f"ensemble.name={name}", *TINY, *extra])


def runs(uri, parent):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    out = []
    for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'"):
        steps = client.get_metric_history(r.info.run_id, "train/step_loss")
        out.append({"replica": int(r.data.tags["replica"]), "status": r.info.status,
                    "cpus": r.data.tags.get("worker_cpus"), "memory_gib": r.data.tags.get("worker_memory_gib"),
                    "threads": r.data.tags.get("torch_threads"),
                    "first_ms": min(m.timestamp for m in steps), "last_ms": max(m.timestamp for m in steps)})
    return sorted(out, key=lambda x: x["replica"])


def main(shards: str, uri: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="planning-"))
    result = {"plans": {}}

    def measure():
        """The demo on 2 CPUs: a dry run before anything was measured, the probe (twice: measured, then
        cached), the dry run again."""
        from pipeline.shards.splits import open_split
        from pipeline.train.memory import worker_memory

        lines = []
        dry = run_ensemble(recipe(shards, tmp / "a", uri, "plan-measure"), log=lines.append, dry_run=True)
        result["dry_unmeasured"] = {"lines": lines[:], "placement": dry["placement"]}
        cfg = recipe(shards, tmp / "a", uri, "plan-measure")
        cfg.validate()
        train = open_split(Path(cfg.data.shards) / "train")
        lines.clear()
        # (2 threads: the widest worker on 2 CPUs, the demo's 7th replica; what the run measures)
        result["need"] = worker_memory(cfg, train, lines.append, threads=2)
        result["need_again"] = worker_memory(cfg, train, lines.append, threads=2)
        result["measure_lines"] = lines[:]
        lines.clear()
        dry = run_ensemble(recipe(shards, tmp / "a", uri, "plan-measure"), log=lines.append, dry_run=True)
        result["plans"][2] = {"lines": lines, "placement": dry["placement"]}

    with local_ray(num_cpus=2):
        measure()
    need = result["need"]
    per_replica = need + REPLICA_OVERHEAD
    stated = [f"ensemble.memory_per_worker={need / GIB!r}"]  # (the measured figure, as a user would state it)

    def plan():
        lines = []
        dry = run_ensemble(recipe(shards, tmp / "b", uri, "plan-16", stated), log=lines.append, dry_run=True)
        result["plans"][16] = {"lines": lines, "placement": dry["placement"]}

    with local_ray(num_cpus=16, memory=int(4 * per_replica + 0.5 * GIB)):  # memory for 4 replicas at once, not 5
        plan()

    def train():
        lines = []
        out = run_ensemble(recipe(shards, tmp / "c", uri, "plan-train", ["ensemble.replicas=3", *stated]),
                           log=lines.append)
        result["trained"] = {"lines": lines, "runs": runs(uri, out["parent_run_id"])}

    with local_ray(num_cpus=8, memory=int(2 * per_replica + 0.5 * GIB)):  # 8 CPUs, memory for 2 replicas at once
        train()
    shutil.rmtree(tmp, ignore_errors=True)
    print("PLANNING-RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
