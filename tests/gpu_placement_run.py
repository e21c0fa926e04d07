"""Run by tests/test_gpu_placement.py in its own process: Ray clusters on this machine with *logical*
GPUs (`num_gpus`; no CUDA here), the recipes' GPU requests placed on them, training on the CPU.
Prints one JSON line with what each replica asked for and received."""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (Ray on loopback: it reads the setting when it is imported)

# isort: split
import ray
from conftest import local_ray

from pipeline.config import load_recipe
from pipeline.train.ensemble import EnsembleError, run_ensemble

TINY = ["data.limit_train=32", "data.limit_val=16", "data.batch_size=8", "data.input_size=32", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "model.variant=bn", "tracking.register_model=null", "tracking.register_ensemble=null",
        "data.num_threads=1"]


def recipe(name, shards, storage, uri, extra=()):
    return load_recipe(name, [f"data.shards={shards}", f"ensemble.storage_path={storage}", f"tracking.uri={uri}",
                              f"ensemble.name=placement-{name}", *TINY, *extra])


def runs(uri, parent):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    out = []
    for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'"):
        out.append({"replica": r.data.tags["replica"], "gpus": r.data.tags.get("ray_gpu_ids"),
                    "devices": r.data.tags.get("worker_devices"), "status": r.info.status,
                    "epochs": [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]})
    return out


def with_cluster(fn, result, **head_args):
    with local_ray(**head_args):
        result.setdefault("addresses", []).extend(sorted({n["NodeManagerAddress"] for n in ray.nodes()}))
        return fn()


def main(shards: str, uri: str) -> None:
    import mlflow

    tmp = Path(tempfile.mkdtemp(prefix="placement-"))
    result = {}

    def one_gpu():
        lines = []
        # fashion-mnist-full: replicas of 1 worker x 0.14 GPU share the one GPU, all at once (2 of its 7 here;
        # imagenet-1node's check plans seven at once, one GPU each)
        out = run_ensemble(recipe("fashion-mnist-full", shards, tmp / "a", uri,
                                  ["ensemble.cpus_per_worker=0.5", "ensemble.replicas=2"]), log=lines.append)
        result["packed"] = {"lines": lines, "runs": runs(uri, out["parent_run_id"])}
        # imagenet-paper: 4 workers x 1 GPU per replica can never fit one GPU: refused before training
        try:
            run_ensemble(recipe("imagenet-paper", shards, tmp / "b", uri, ["ensemble.replicas=1"]), log=lines.append)
            result["refused"] = None
        except EnsembleError as e:
            result["refused"] = str(e)
            result["refused_dir_exists"] = (tmp / "b").exists()

    def eight_gpus():
        """One machine with 8 (logical) GPUs. imagenet-paper: one replica's 4 data-parallel workers. Then
        imagenet-1node: the dry run's placement plan for its seven replicas (Ray's own view of the node), the
        effective learning rate and nothing written; then two of them trained at once (submitted together),
        one GPU each, at the learning rate the rule gives. (Two, not seven: seven at once take 16 GB and
        minutes on a CPU-only machine; what Ray hands each is the same.)"""
        lines = []
        out = run_ensemble(recipe("imagenet-paper", shards, tmp / "c", uri,
                                  ["ensemble.replicas=1", "ensemble.cpus_per_worker=0.5", "model.aux_logits=false"]),
                           log=lines.append)
        result["per_replica"] = {"lines": lines, "runs": runs(uri, out["parent_run_id"])}

        lines = []
        extra = ["ensemble.cpus_per_worker=0.25", "tracking.experiment=one-node"]
        plan = run_ensemble(recipe("imagenet-1node", shards, tmp / "d", uri, extra), log=lines.append, dry_run=True)
        result["dry_run"] = {"lines": lines[:], "out": plan["placement"], "ckpt_dir": (tmp / "d").exists(),
                             "experiments": [e.name for e in mlflow.MlflowClient(uri).search_experiments()]}
        lines.clear()
        out = run_ensemble(recipe("imagenet-1node", shards, tmp / "d", uri, [*extra, "ensemble.replicas=2"]),
                           log=lines.append)
        client = mlflow.MlflowClient(uri)
        result["trained"] = {"lines": lines, "runs": runs(uri, out["parent_run_id"]),
                             "lr": {r["replica"]: client.get_run(r["run_id"]).data.params["optim.effective_lr"]
                                    for r in out["replicas"]},
                             "step_lr": {r["replica"]: [m.value for m in client.get_metric_history(r["run_id"],
                                                                                                   "train/lr")]
                                         for r in out["replicas"]}}

    try:
        with_cluster(one_gpu, result, num_cpus=4, num_gpus=1)
        # (the memory of such a machine: 7 replicas fit)
        with_cluster(eight_gpus, result, num_cpus=2, num_gpus=8, memory=256 * 2**30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (the replicas' checkpoints: about 0.8 GB)
    print("PLACEMENT-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
