"""The ensemble driver: the replicas trained concurrently on Ray, one `TorchTrainer.fit()` each.

Ray Train V2 does not run trainers inside `Tuner`, so each replica's trainer is driven from a Ray
task (0 CPUs: it only waits); at most `max_concurrent` run at once. Run names are stable
(`<ensemble name>-replica-<i>`) under `storage_path`, so a resubmitted job resumes every replica from
its latest checkpoint, and `FailureConfig(max_failures)` restarts a failed worker group from it.

MLflow: one parent run per ensemble (found again by its `ensemble` tag on resubmission), one child
run per replica (`replica-<i>-<strategy>`, found by tags), continued rather than duplicated on
resume. A finished replica (tag `completed=true`) is not trained again. The parent run and every
checkpoint carry a digest of the settings that change results (`TrainConfig.result_settings` and the
shards' content): a resubmission under other settings is refused before any work, naming each field
that differs. A job stopped by SIGTERM (`ray job stop`) marks its parent and running replica runs
KILLED before it exits; resubmitting resumes. At the end of a replica its
Polyak-averaged weights are logged as a state dict (`weights/polyak_state_dict.pt`, loadable with
`weights_only=True`) and as an MLflow model, registered as a `googlenet-replica` version.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.config import ConfigError, TrainConfig, canonical_settings, settings_diff, settings_digest
from pipeline.tracking import (
    PatientClient,
    TrackingError,
    end_runs,
    log_datasets,
    log_run_settings,
    manifest_digest,
    pinned_requirements,
    require_server,
    resolve_uri,
    setup_experiment,
    source_tags,
    stop_of,
    stop_on_signals,
    wait_for_tracking,
)
from pipeline.train.budget import fit_budget, log_budget, round_widths, widens
from pipeline.train.memory import REPLICA_OVERHEAD, worker_memory
from pipeline.train.timing import input_bound_advice


class EnsembleError(Exception):
    pass


class PlacementError(EnsembleError):
    """The cluster can never hold one replica's workers: refused before any run is created."""


def replica_seed(ensemble_seed: int, replica: int) -> int:
    """Each replica sees its own random order (paper sec. 7); ranks of one replica share it."""
    return ensemble_seed * 1000 + replica


def init_seed(e, replica: int) -> int:
    """The seed of a replica's initial weights: the ensemble's for every replica with `same_init` (the
    paper's seven models), else the replica's own."""
    return replica_seed(e.seed, 0) if e.same_init else replica_seed(e.seed, replica)


def scan_cache_dir(storage_path: str) -> str:
    """Where the corrupt-image scan is cached: beside the checkpoints, or (object storage) in this user's
    private cache folder."""
    if "://" in storage_path:
        from pipeline.shards.cachedir import user_cache_root

        return str(user_cache_root() / "scans")
    return os.path.join(storage_path, "scans")


def dataset_source(shards: str, split: str, info) -> str:
    """Where a split lives, for MLflow's dataset source: the s3:// URI (not the node-local copy read
    from it) or the absolute folder."""
    from pipeline.shards.storage import objstore

    return objstore.join(shards, split) if objstore.is_uri(shards) else str(info.dir.resolve())


def worker_resources(e, memory: int | None = None) -> dict[str, float]:
    """What one worker asks Ray for: CPUs, GPUs and (when reserved: pipeline.train.memory) memory in bytes."""
    return {"CPU": e.cpus_per_worker, **({"GPU": e.gpus_per_worker} if e.gpus_per_worker > 0 else {}),
            **({"memory": float(memory)} if memory else {})}


def _fits(have: dict, need: dict) -> int:
    return min(int(have.get(k, 0) / v + 1e-9) for k, v in need.items())


def plan_placement(e, nodes: list[dict], memory: int | None = None, driver_node: str | None = None) -> dict:
    """How the recipe's workers fit the cluster's nodes (`ray.nodes()`): a worker's CPUs, GPUs and reserved
    memory (`memory`, bytes, or None) must sit on one node; a replica needs `workers_per_replica` of them at
    once; with memory reserved, each replica running also reserves REPLICA_OVERHEAD on `driver_node` (its
    supervising task and Ray Train's controller run there). Returns the workers that fit (`workers_fit`;
    `cpu_fit` and `memory_fit` per node, the first by CPUs and GPUs alone) and the replicas that run at once:
    never more than fit, nor than a numeric `max_concurrent`. Raises PlacementError when not even one
    replica ever fits."""
    need = worker_resources(e, memory)
    plain = worker_resources(e)
    alive = [n for n in nodes if n.get("Alive", True)]
    cpu_fit = [_fits(n.get("Resources", {}), plain) for n in alive]
    is_driver = [bool(driver_node) and n.get("NodeID") == driver_node for n in alive]

    def memory_fit(replicas: int) -> list[float]:
        """Workers each node's memory holds, with `replicas` replicas' overhead taken from the driver's node."""
        if not memory:
            return [float("inf")] * len(alive)
        return [max(0, int((n.get("Resources", {}).get("memory", 0) - (replicas * REPLICA_OVERHEAD if d else 0))
                           / memory + 1e-9)) for n, d in zip(alive, is_driver, strict=True)]

    def fit_with(replicas: int) -> list[int]:
        return [int(min(c, m)) for c, m in zip(cpu_fit, memory_fit(replicas), strict=True)]

    per_node = fit_with(1)
    fit = sum(per_node)
    if fit < e.workers_per_replica:
        totals = {k: sum(n.get("Resources", {}).get(k, 0) for n in alive) for k in need}
        biggest = {k: max((n.get("Resources", {}).get(k, 0) for n in alive), default=0) for k in need}
        raise PlacementError(
            f"the cluster can never run one replica: it needs {e.workers_per_replica} worker(s) x "
            f"{_fmt(need)} at once, and its nodes hold {fit} such worker(s) (cluster total {_fmt(totals)}, "
            f"largest node {_fmt(biggest)}). Lower ensemble.workers_per_replica / gpus_per_worker / "
            "cpus_per_worker" + (" / memory_per_worker" if memory else "") + ", add nodes, or on an autoscaling "
            "cluster whose nodes are not up yet set ensemble.check_resources=false")
    cap = e.max_concurrent if isinstance(e.max_concurrent, int) else e.replicas
    at_once = max(1, min(cap, e.replicas, fit // e.workers_per_replica))
    if memory and any(is_driver):  # each replica running holds REPLICA_OVERHEAD there, workers or not
        [here] = [n for n, d in zip(alive, is_driver, strict=True) if d]
        supervised = int(here.get("Resources", {}).get("memory", 0) / REPLICA_OVERHEAD + 1e-9)
        if supervised < 1:
            raise PlacementError(
                f"the driver's node has {here.get('Resources', {}).get('memory', 0) / 2**30:.2f} GiB of Ray memory: "
                f"not enough for one replica's supervising task and Ray Train controller "
                f"({REPLICA_OVERHEAD / 2**30:.2f} GiB, which run there). Submit the job to a node with more memory, "
                "or set ensemble.memory_per_worker=null (nothing reserved)")
        at_once = min(at_once, supervised)
    while at_once > 1 and sum(fit_with(at_once)) // e.workers_per_replica < at_once:
        at_once -= 1  # (the driver's node holds the overhead of every replica running)
    per_node = fit_with(at_once)
    return {"worker": need, "workers_fit": sum(per_node), "replicas_at_once": at_once,
            "cpu_fit": cpu_fit,
            "memory_fit": per_node if memory else None, "bound": _bound(e, cpu_fit, per_node, at_once)}


def _bound(e, cpu_fit, per_node, at_once) -> str:
    """What limits the replicas at once, in words."""
    if at_once >= e.replicas:
        return "every replica"
    if isinstance(e.max_concurrent, int) and at_once >= e.max_concurrent:
        return "ensemble.max_concurrent"
    return "memory" if sum(per_node) < sum(cpu_fit) else ("GPUs" if e.gpus_per_worker else "CPUs")


def _fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v / 2**30:.2f} GiB" if k == "memory" else f"{k}: {v:g}"
                           for k, v in d.items()) + "}"


def quiet_train_env(nodes: list[dict]) -> dict[str, str]:
    """Environment of a replica's Ray Train processes (inherited from its driving task), decided when the
    replica starts, from the cluster's nodes then (`ray.nodes()`):
    - each `print` of the training loop once: Ray Train V2 patches `print` to also log it through its
      logger, which Ray then streams beside stdout (every progress line twice in the job logs);
    - on a cluster that can never hold a node to preempt (every node on a loopback address: a single
      machine), no PreemptionWatcher, whose creation logs an alarming but harmless `core_worker.cc ...
      E ... PreemptionWatcher` line per replica. Anywhere else it stays on, also while an autoscaling
      cluster holds only its head: the replica's workers may land on spot nodes started for them;
    - the driver's settings for waiting out a tracking server that is down (INCEPTION_TRACKING_WAIT_S,
      MLflow's MLFLOW_HTTP_REQUEST_*), where set: the workers do not inherit the driver's environment."""
    import ipaddress

    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    for k in ("INCEPTION_TRACKING_WAIT_S", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        if os.environ.get(k):
            env[k] = os.environ[k]

    def loopback(node: dict) -> bool:
        try:
            return ipaddress.ip_address(str(node.get("NodeManagerAddress", "")).strip("[]")).is_loopback
        except ValueError:
            return False

    alive = [n for n in nodes if n.get("Alive", True)]
    if alive and all(loopback(n) for n in alive):
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return env


def _cuda_on_gpu_workers() -> bool:
    import torch

    return torch.cuda.is_available()


def run_settings(cfg: TrainConfig, train_manifest: dict, val_manifest: dict) -> dict:
    """What an ensemble's results depend on: the results-changing settings and the shards' content."""
    return {**cfg.result_settings(), "data.train_digest": manifest_digest(train_manifest),
            "data.val_digest": manifest_digest(val_manifest)}


def check_same_settings(run, settings: dict, name: str) -> None:
    """Refuse to continue an ensemble started under other settings: its finished replicas and checkpoints
    belong to another experiment. Runs from before settings were recorded are compared on their params."""
    import json

    tags, params = run.data.tags, run.data.params
    if "settings" in tags:
        old = json.loads(tags["settings"])
        # Across versions: a field no longer fingerprinted is no difference, nor is a field added since
        # that is at its default.
        defaults = TrainConfig().result_settings()
        old = canonical_settings({**derived_settings(params), **old})
        old = {**{k: v for k, v in settings.items() if k not in old and defaults.get(k, object()) == v},
               **{k: v for k, v in old.items() if k in settings}}
        diff = settings_diff(old, settings) if tags.get("settings_sha256") != settings_digest(settings) else []
    else:
        old = {k: params[k] for k in settings if k in params}
        diff = settings_diff(old, {k: str(settings[k]) for k in old})
    if diff:
        raise ConfigError(f"ensemble '{name}' was started with other settings (MLflow run {run.info.run_id}): "
                          + "; ".join(diff) + ". Resubmit with its settings to resume it, or set ensemble.name "
                          "to start a new ensemble")


def derived_settings(params: dict) -> dict:
    """The derived fingerprint entries (model.precision, data.device) of an ensemble recorded before they
    were fingerprinted, from the params its first submission logged."""
    gpus, device = params.get("ensemble.gpus_per_worker"), params.get("data.device")
    try:
        gpu = float(gpus) > 0
    except (TypeError, ValueError):
        return {}
    out = {"model.precision": "bf16" if gpu else "fp32"}
    if device in ("auto", "cpu", "gpu"):
        out["data.device"] = device if device != "auto" else ("gpu" if gpu else "cpu")
    return out


def check_same_storage(run, cfg: TrainConfig) -> None:
    """Refuse to continue an ensemble whose checkpoints live elsewhere: under another storage_path the
    replicas would train again from scratch into the same MLflow runs, mixing two trainings' metrics."""
    old, new = run.data.tags.get("storage_path"), cfg.ensemble.storage_path
    if old is not None and old.rstrip("/") != new.rstrip("/"):
        raise ConfigError(f"ensemble '{cfg.ensemble.name}' keeps its checkpoints under {old} (MLflow run "
                          f"{run.info.run_id}), not under ensemble.storage_path={new}: resubmit with "
                          f"ensemble.storage_path={old} to resume it (move its folders back there first if they were "
                          "moved), or set ensemble.name to start a new ensemble")


def _parent_run(client, exp_id: str, cfg: TrainConfig, settings: dict) -> str:
    import json

    runs = client.search_runs([exp_id], filter_string=f"tags.ensemble = '{cfg.ensemble.name}' and tags.kind = 'ensemble'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    if runs:
        check_same_settings(runs[0], settings, cfg.ensemble.name)
        check_same_storage(runs[0], cfg)
        run_id = runs[0].info.run_id
        if "storage_path" not in runs[0].data.tags:  # (recorded from now on)
            client.set_tag(run_id, "storage_path", cfg.ensemble.storage_path)
        if "recipe" not in runs[0].data.params:  # a driver died between creating the run and this
            client.log_batch(run_id, params=_params({**cfg.flat(), **cfg.derived()}))
        if runs[0].info.status != "RUNNING":  # stopped, failed or finished before: it runs again
            client.update_run(run_id, status="RUNNING")
            if "error" in runs[0].data.tags:
                with contextlib.suppress(Exception):  # (already gone: a call retried after an outage)
                    client.delete_tag(run_id, "error")
        return run_id
    check_checkpoints(cfg, settings_digest(settings))  # no run in MLflow: checkpoints under the name may be
    e = cfg.ensemble
    note = (f"Ensemble `{e.name}` (recipe `{cfg.recipe}`): {e.replicas} GoogLeNet-{cfg.model.variant} replicas, "
            f"each with its own sampling strategy and data order, {cfg.schedule.epochs} epochs at "
            f"{cfg.data.input_size} px, {e.workers_per_replica} worker(s) per replica. Child runs: one per replica "
            "and one per evaluation (Table 3). The ensemble's headline Table 3 numbers appear here as `table3/*` "
            "metrics after an evaluation; the ensemble as one model: `googlenet-ensemble`.")
    run = client.create_run(exp_id, run_name=cfg.ensemble.name,
                            tags={"ensemble": cfg.ensemble.name, "kind": "ensemble", "recipe": cfg.recipe,
                                  "settings": json.dumps(settings, sort_keys=True, default=str),
                                  "settings_sha256": settings_digest(settings),
                                  "storage_path": cfg.ensemble.storage_path, "mlflow.note.content": note, **source_tags("jobs/train_ensemble.py")})
    client.log_batch(run.info.run_id, params=_params({**cfg.flat(), **cfg.derived()}))
    return run.info.run_id


def _child_run(client, exp_id: str, parent_id: str, cfg: TrainConfig, replica: int, strategy: str, seed: int,
               splits=(), unfinished: dict | None = None):
    """The replica's run, found again by its tags or created; its params and dataset inputs are
    completed when a driver died between creating the run and logging them."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                                      f"tags.replica = '{replica}'", max_results=1)
    if runs:
        run = runs[0]
    else:
        from pipeline.data.sampling import get_strategy

        note = (f"Replica {replica} of ensemble `{cfg.ensemble.name}`: sampling strategy `{strategy}` "
                f"({get_strategy(strategy, cfg.data.input_size, cfg.ensemble.custom_strategies).cite}), data-order seed {seed}. Model metrics: "
                "per-epoch validation (`val/*`, step = epoch) and training every "
                f"{cfg.tracking.log_every} steps (`train/step_*`, step = global step); System metrics: CPU, memory, "
                "GPU. Artifacts: the Polyak-averaged weights.")
        run = client.create_run(exp_id, run_name=f"replica-{replica}-{strategy}",
                                tags={"mlflow.parentRunId": parent_id, "ensemble": cfg.ensemble.name,
                                      "kind": "replica", "replica": str(replica), "strategy": strategy,
                                      "mlflow.note.content": note, **source_tags("jobs/train_ensemble.py")})
    if unfinished is not None and run.data.tags.get("completed") != "true":
        unfinished[run.info.run_id] = replica  # queued or training: ended KILLED/FAILED with the job from here on
    if "strategy" not in run.data.params:
        from pipeline.data.sampling import get_strategy

        sampled = asdict(get_strategy(strategy, cfg.data.input_size, cfg.ensemble.custom_strategies))
        client.log_batch(run.info.run_id, params=_params({**cfg.flat(), **cfg.derived(), "replica": replica, "strategy": strategy,
                                                           "seed": seed, **{f"strategy.{k}": v for k, v in sampled.items()
                                                                            if k not in ("name", "cite")}}))
    if splits and not (run.inputs and run.inputs.dataset_inputs):
        log_datasets(client, run.info.run_id, list(splits))
    # (the versions come from the replica's rank 0, on the node that trains it)
    log_run_settings(client, run.info.run_id, {**cfg.to_dict(), "replica": {"index": replica, "strategy": strategy,
                                                                             "seed": seed}}, env={})
    return client.get_run(run.info.run_id)


def _params(d: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in d.items()]


def fit_replica(cfg_dict: dict, replica: int, strategy: str, seed: int, mlflow_uri: str, run_id: str,
                parent_id: str, exclude: list[str] | None = None, settings_sha256: str | None = None,
                settings_accepted: tuple = (), memory: int | None = None) -> dict:
    """Train one replica with Ray Train (runs inside a Ray task), then log its final model to MLflow."""
    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    from pipeline.shards.storage import objstore
    from pipeline.train.loop import build_model, config_from_dict, latest_state, save_state, train_replica
    from pipeline.train.netbind import NodeBoundTorchConfig

    cfg = config_from_dict(cfg_dict)
    e = cfg.ensemble
    use_gpu = e.gpus_per_worker > 0
    resources = worker_resources(e, memory)
    backend = "nccl" if use_gpu else "gloo"  # (Ray Train's own choice, made explicit for NodeBoundTorchConfig)
    if use_gpu and not ray.get(ray.remote(num_cpus=0, num_gpus=e.gpus_per_worker)(_cuda_on_gpu_workers).remote()):
        # GPUs that Ray counts but CUDA does not see (logical GPUs, a driver missing on the node):
        # the workers still get their GPU resources, and train on the CPU with gloo
        print(f"replica {replica}: the cluster's GPU nodes have no usable CUDA: training on the CPU (gloo)", flush=True)
        backend = "gloo"
    run_dir = objstore.join(e.storage_path, f"{e.name}-replica-{replica}")
    trainer = TorchTrainer(
        train_replica,
        train_loop_config={"train": cfg_dict, "replica": replica, "strategy": strategy, "seed": seed,
                           "init_seed": init_seed(cfg.ensemble, replica), "exclude": exclude or [],
                           "mlflow_uri": mlflow_uri, "mlflow_run_id": run_id, "log_every": cfg.tracking.log_every,
                           "settings_sha256": settings_sha256, "settings_accepted": list(settings_accepted),
                           # resume also scans the run's folder (a path or, on object storage, a prefix)
                           "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=e.workers_per_replica, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=NodeBoundTorchConfig(backend=backend),  # (listening on the node's address only)
        run_config=ray.train.RunConfig(name=f"{e.name}-replica-{replica}", storage_path=e.storage_path,
                                       failure_config=ray.train.FailureConfig(max_failures=e.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    # The final weights are the final epoch's: Ray's controller may register the last checkpoint after
    # fit() returns, so take the most advanced one, as resume does.
    state = latest_state(result.checkpoint, run_dir)
    if state is None:
        raise EnsembleError(f"replica {replica}: training ended without a checkpoint")
    if state["epoch"] != cfg.schedule.epochs:
        raise EnsembleError(f"replica {replica}: training ended at epoch {state['epoch']} of {cfg.schedule.epochs} "
                            f"(newest checkpoint in {run_dir}); not marked completed, resubmit to resume")
    model = build_model(cfg, state["num_classes"])
    model.load_state_dict(state["ema"]["state"])
    model.eval()
    # Every tracking call from here waits out a server that is down, as the training's own logging does.
    client = PatientClient(mlflow_uri, who=f"replica {replica}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "polyak_state_dict.pt"
        save_state(model.state_dict(), path)  # (a full temp disk: an OSError naming the cause)
        client.log_artifact(run_id, str(path), artifact_path="weights")
    name = cfg.tracking.register_model
    if name:  # (not registered: no MLflow model either, its export costs ~6 s of CPU; the weights are logged)
        # (a batch of 2: torch.export would fix a batch of 1 into the program, and it would answer one image only)
        example = torch.zeros(2, 3, cfg.data.input_size, cfg.data.input_size).numpy()
        version = wait_for_tracking(register_replica, client.raw, mlflow_uri, run_id, name, model, example,
                                    {"ensemble_run_id": parent_id, "replica": str(replica), "strategy": strategy},
                                    uri=mlflow_uri, who=f"replica {replica}")
        client.set_tag(run_id, "registered_version", version)
    last = state["history"][-1] if state["history"] else {}
    client.set_tag(run_id, "completed", "true")
    client.set_tag(run_id, "final_epoch", str(state["epoch"]))
    return {"replica": replica, "strategy": strategy, "epochs": state["epoch"], "seconds": time.perf_counter() - t0,
            "val/top1_err": last.get("val/top1_err"), "val/top5_err": last.get("val/top5_err"), "run_id": run_id,
            "time/data_wait_frac": last.get("time/data_wait_frac")}


def register_replica(client, uri: str, run_id: str, name: str, model, example, tags: dict) -> str:
    """Log the replica's model and register it as a version of `name`, once: a driver stopped after
    registering and before tagging the run `completed` (or a call retried after a tracking outage) finds
    the version it registered instead of adding another. The model is logged to the run by its id, never
    by making the run active here: starting and ending it would set its status, which is the driver's
    (a stop meanwhile ends it KILLED)."""
    import mlflow

    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return min(existing, key=lambda v: int(v.version)).version
    mlflow.set_tracking_uri(uri)
    # (a torch.export program: loading it needs torch, predicting numpy; MLflow adds itself)
    info = mlflow.pytorch.log_model(model, name="model", input_example=example, run_id=run_id,
                                    pip_requirements=pinned_requirements("torch", "numpy"))
    return mlflow.register_model(info.model_uri, name, tags=tags).version


def run_ensemble(cfg: TrainConfig, log=print, dry_run: bool = False) -> dict:
    """Train the ensemble; returns {"parent_run_id", "replicas": [per-replica summary]}. With `dry_run`,
    every check a real run makes before training (MLflow reachable, shards, checkpoints, placement), the
    resolved settings and the placement plan printed, and nothing written to MLflow, no Ray task run."""
    import ray

    from pipeline.shards.splits import open_split

    started = time.perf_counter()
    cfg.validate()  # (local paths made absolute: workers may run elsewhere)
    uri = resolve_uri(cfg.tracking.uri)
    if not uri:
        raise TrackingError("no MLflow tracking server: set MLFLOW_TRACKING_URI or tracking.uri "
                            "(make up starts one at http://127.0.0.1:5000)")
    require_server(uri)
    from pipeline.shards.cache import split_location  # s3://: a verified node-local copy (open_split)

    train = open_split(split_location(cfg.data.shards, cfg.data.train_split))
    val = open_split(split_location(cfg.data.shards, cfg.data.val_split))
    if not ray.is_initialized():
        ray.init(log_to_driver=True, configure_logging=False)
    # One driver per ensemble: a second one would train the same replicas into the same runs and folders.
    from pipeline.train import driverlock

    if dry_run:
        holder = driverlock.held_by(cfg.ensemble.name)
        if holder:
            raise driverlock.EnsembleBusy(f"ensemble '{cfg.ensemble.name}' is being trained by another driver: "
                                          f"{driverlock.describe(holder)}")
        return _run_ensemble(cfg, log, dry_run, started, uri, train, val)
    lock = driverlock.acquire(cfg.ensemble.name, log)
    try:
        return _run_ensemble(cfg, log, dry_run, started, uri, train, val)
    finally:
        driverlock.release(lock, cfg.ensemble.name)


def _run_ensemble(cfg: TrainConfig, log, dry_run: bool, started: float, uri: str, train, val) -> dict:
    import mlflow
    import ray

    placement, memory, e = None, None, cfg.ensemble
    if e.check_resources or dry_run or e.budget_minutes or e.max_concurrent == "auto" or e.memory_per_worker is not None:
        try:
            placement = plan_placement(e, ray.nodes())
        except EnsembleError as err:
            if e.check_resources:
                raise
            log(f"placement: not on the nodes up now ({err}); waits for the autoscaler"
                + ("; memory not reserved (no node to measure on)" if e.memory_per_worker == "auto" else ""))
        if placement is not None or (e.memory_per_worker not in (None, "auto")):
            from pipeline.data.scan import corrupt_images

            # (as many threads as the widest worker the plan may give: one node's CPUs)
            widest = int(e.cpus_per_worker * max(placement["cpu_fit"])) if placement and widens(e) else None
            memory = worker_memory(cfg, train, log, dry_run, lambda: corrupt_images(
                train, scan_cache_dir(e.storage_path), log=log), threads=widest)
        if memory and placement is not None:
            try:
                placement = plan_placement(e, ray.nodes(), memory, ray.get_runtime_context().get_node_id())
            except EnsembleError as err:
                if e.check_resources:
                    raise
                log(f"placement: not on the nodes up now ({err}); waits for the autoscaler")
                placement = None
    budget = fit_budget(cfg, train, val, placement, PatientClient(uri, who="the driver"), started, log, dry_run,
                        scan_cache_dir(cfg.ensemble.storage_path)) if cfg.ensemble.budget_minutes else None
    settings = run_settings(cfg, train.manifest, val.manifest)
    digest = settings_digest(settings)
    log(f"ensemble {cfg.ensemble.name}: recipe {cfg.recipe}, {cfg.ensemble.replicas} replicas x "
        f"{cfg.ensemble.workers_per_replica} workers, {train.num_samples} train images, {len(train.classes)} classes")
    for k, v in cfg.flat().items():
        log(f"  {k} = {v}")
    log("  replica strategies = " + ", ".join(f"{i}: {n}" for i, n in enumerate(cfg.strategy_names())))
    log(f"  global batch = {cfg.global_batch} ({cfg.data.batch_size} x {cfg.ensemble.workers_per_replica} workers); "
        f"effective lr = {cfg.effective_lr():g}" + (f" (optim.lr {cfg.optim.lr:g} x {cfg.global_batch} / reference "
                                                   f"batch {cfg.optim.reference_batch})"
                                                   if cfg.optim.reference_batch else " (optim.lr, no reference batch)"))
    log(f"  settings digest = {digest} (data, model, optim, schedule, ensemble seed/init/replicas/workers, shards)")
    if placement:
        full_w, tail_w = round_widths(e.replicas, placement["replicas_at_once"], placement["cpu_fit"],
                                      placement["memory_fit"], widens(e))
        wide = f"; each on {e.cpus_per_worker * full_w:g} CPUs (threads: no CPU left idle)" if full_w > 1 else ""
        log(f"placement: {e.replicas} replica(s) x {e.workers_per_replica} worker(s) x "
            f"{_fmt(placement['worker'])}; {placement['replicas_at_once']} replica(s) at once on this cluster "
            f"({placement['workers_fit']} worker(s) fit its nodes" + (f"; bound by {placement['bound']}" if
                                                                      placement["bound"] != "every replica" else "")
            + f"){wide}")
    if dry_run:
        check_resubmission(mlflow.MlflowClient(uri), cfg, settings)  # (read-only: what the run would refuse)
        log(f"dry run: MLflow {uri} and the shards checked; nothing written to MLflow, no Ray task started")
        return {"dry_run": True, "settings": cfg.to_dict(), "placement": placement}

    mlflow.set_tracking_uri(uri)
    # Every tracking call of the driver waits out a server that is down (INCEPTION_TRACKING_WAIT_S), as the
    # replicas' do: an outage ends no job that its checkpoints would let go on.
    client = PatientClient(uri, who="the driver")
    exp_id = setup_experiment(client, cfg.tracking.experiment)
    with stop_on_signals():
        parent = _parent_run(client, exp_id, cfg, settings)
        log(f"MLflow parent run: {uri.rstrip('/')}/#/experiments/{exp_id}/runs/{parent}")
        unfinished: dict[str, int] = {}  # MLflow runs of the replicas not finished (training or queued) -> replica
        try:
            log_run_settings(client, parent, cfg.to_dict())  # (each submission: its non-result settings may differ)
            if budget and budget.get("measured"):
                log_budget(client, parent, budget)
            result = _train_replicas(cfg, client, uri, exp_id, parent, train, val, digest, unfinished, log, memory)
            if budget and budget.get("measured"):
                took = time.perf_counter() - started
                log(f"budget: trained in {took / 60:.1f} min of {budget['minutes']:g} (estimated "
                    f"{budget['estimate_s'] / 60:.1f})")
                client.log_batch(parent, metrics=_metrics({"budget/actual_s": took}))
            return result
        except BaseException as e:
            # Every run ends in a true state: stopped (SIGTERM, Ctrl-C) -> KILLED, an error -> FAILED.
            status = end_runs(client, [parent, *unfinished], e)
            stop = stop_of(e)
            if stop is not None:
                log(f"ensemble {cfg.ensemble.name}: stopped; parent run and {len(unfinished)} unfinished replica "
                    f"run(s) marked {status}. Resubmit the same command to resume from the checkpoints.")
                if stop is not e:  # (wrapped by a C extension on the way)
                    raise stop from None
            raise


def check_resubmission(client, cfg: TrainConfig, settings: dict) -> None:
    """What `_parent_run` refuses, checked without writing: another ensemble's settings under this name,
    in MLflow or (no run there) in its checkpoints."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.ensemble = '{cfg.ensemble.name}' and tags.kind = 'ensemble'",
                              max_results=1, order_by=["attributes.start_time DESC"]) if exp else []
    if runs:
        check_same_settings(runs[0], settings, cfg.ensemble.name)
        check_same_storage(runs[0], cfg)
    else:
        check_checkpoints(cfg, settings_digest(settings))


def check_checkpoints(cfg: TrainConfig, digest: str) -> None:
    """Refuse, before any work, checkpoints under this ensemble's name written with other settings (an
    MLflow server other than the one that holds its runs, or runs deleted there)."""
    from pipeline.shards.storage import objstore
    from pipeline.train.loop import checkpoint_markers

    e = cfg.ensemble
    for i in range(e.replicas):
        run_dir = objstore.join(e.storage_path, f"{e.name}-replica-{i}")
        if "://" not in run_dir and not os.path.isdir(run_dir):
            continue
        for folder, marker in checkpoint_markers(run_dir)[:1]:
            if marker.get("settings_sha256") not in (None, digest):
                raise ConfigError(f"{folder} holds epoch {marker.get('epoch')} of replica {i} trained with other "
                                  f"settings (digest {marker['settings_sha256']}, now {digest}); set another "
                                  "ensemble.name to start a new ensemble")


def _train_replicas(cfg: TrainConfig, client, uri: str, exp_id: str, parent: str, train, val, digest: str,
                    unfinished: dict, log, memory: int | None = None) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.data.scan import corrupt_images

    # The parent's recorded settings passed check_same_settings: checkpoints under its digest (an earlier
    # version's fingerprint of the same settings) are this ensemble's too.
    tags = client.get_run(parent).data.tags
    known = [d for d in [tags.get("settings_sha256"), *tags.get("settings_sha256_seen", "").split(",")] if d]
    accepted = tuple(dict.fromkeys(d for d in known if d != digest))
    if digest not in known:  # (checkpoints from now on carry this one: a later version accepts it too)
        client.set_tag(parent, "settings_sha256_seen", ",".join(dict.fromkeys([*known, digest])))

    # Every rank of every replica must leave out the same corrupt images, known before training starts.
    exclude = corrupt_images(train, scan_cache_dir(cfg.ensemble.storage_path), log=log)
    if exclude:
        client.set_tag(parent, "corrupt_train_images", str(len(exclude)))
    # Each replica's supervising task (and with it Ray Train's controller, which Ray Train places on the
    # node of the code calling fit()) stays on the driver's node: a worker node lost with its workers
    # then costs the replica a restart of its worker group, not the replica.
    remote_fit = ray.remote(num_cpus=0, max_retries=0)(fit_replica)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    cfg_dict = asdict(cfg)
    todo, done = [], []
    names = cfg.strategy_names()
    for i in range(cfg.ensemble.replicas):
        strategy = names[i]
        seed = replica_seed(cfg.ensemble.seed, i)
        child = _child_run(client, exp_id, parent, cfg, i, strategy, seed,
                           [(dataset_source(cfg.data.shards, cfg.data.train_split, train), train.manifest, "training"),
                            (dataset_source(cfg.data.shards, cfg.data.val_split, val), val.manifest, "validation")],
                           unfinished)
        if child.data.tags.get("completed") == "true":
            if child.info.status != "FINISHED":  # (a stop between its `completed` tag and its end)
                client.set_terminated(child.info.run_id, status="FINISHED")
                with contextlib.suppress(Exception):  # (no error tag)
                    client.delete_tag(child.info.run_id, "error")
            log(f"replica {i} ({strategy}): already completed in run {child.info.run_id}; not retrained")
            done.append({"replica": i, "strategy": strategy, "run_id": child.info.run_id, "skipped": True,
                         "val/top1_err": child.data.metrics.get("val/top1_err")})
            continue
        todo.append((i, strategy, seed, child.info.run_id, child.info.status))
    e = cfg.ensemble
    # Replicas at once: a number (at most), auto (what the cluster's CPUs, GPUs and memory hold, planned now:
    # nodes may have come or gone since the plan printed), None (all submitted; Ray starts each as resources
    # free up, never more than fit: every request, memory included, is one Ray holds to).
    # With memory reserved the driver always paces by the plan: replicas' supervising tasks submitted all at
    # once could hold the memory their own workers wait for.
    limit = e.max_concurrent if isinstance(e.max_concurrent, int) else len(todo) or 1
    placed = None
    if e.max_concurrent is not None or memory:
        try:
            placed = plan_placement(e, ray.nodes(), memory, ray.get_runtime_context().get_node_id())
            limit = min(limit, placed["replicas_at_once"])
        except EnsembleError:
            pass  # (nodes not up yet: Ray queues what does not fit)
    fit_opts = {}
    if memory and placed is not None:  # (paced: each running replica's overhead is held on this node)
        fit_opts["memory"] = REPLICA_OVERHEAD
    elif memory:  # (no plan: nothing reserved, as nothing can be paced)
        memory = None
    widen = widens(e) and placed is not None
    full_w, tail_w = round_widths(len(todo), limit, placed["cpu_fit"], placed["memory_fit"], widen) if widen else (1, 1)
    # No idle CPU: replicas fewer than the CPU slots (a memory-bound cluster, a last partial round) take the
    # free slots' CPUs as threads, measured faster than leaving them idle (docs/explanation/performance.md,
    # "Packing replicas on few cores").
    tail = len(todo) % limit if len(todo) > limit else 0
    widths = [full_w] * (len(todo) - tail) + [tail_w] * tail
    capacity = sum(placed["cpu_fit"]) if widen else limit  # (CPU slots; a replica takes its width)
    dicts = {w: {**cfg_dict, "ensemble": {**cfg_dict["ensemble"], "cpus_per_worker": e.cpus_per_worker * w}}
             for w in set(widths) | {1}}
    pending: dict = {}
    failures = []
    t0 = time.perf_counter()
    while todo or pending:
        while todo and len(pending) < limit and sum(p[3] for p in pending.values()) + widths[0] <= capacity:
            i, strategy, seed, run_id, status = todo.pop(0)
            w = widths.pop(0)
            if status != "RUNNING":  # stopped or failed before: it runs again
                client.update_run(run_id, status="RUNNING")
                with contextlib.suppress(Exception):  # (no error tag)
                    client.delete_tag(run_id, "error")
            log(f"replica {i} ({strategy}): starting, MLflow run {run_id}"
                + (f"; the last round, on {e.cpus_per_worker * w:g} CPUs (the {w} slots' CPUs, none left idle)"
                   if w > 1 and w != full_w else f"; on {e.cpus_per_worker * w:g} CPUs ({w} slots' CPUs each, none "
                   "left idle)" if w > 1 else ""))
            ref = remote_fit.options(scheduling_strategy=here, **fit_opts,
                                     runtime_env={"env_vars": quiet_train_env(ray.nodes())}).remote(
                dicts[w], i, strategy, seed, uri, run_id, parent, exclude, digest, accepted, memory)
            pending[ref] = (i, strategy, run_id, w)
        try:  # (a timeout, so that a stop signal is handled within a second)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        except BaseException:
            for ref in pending:  # stopped: end the replicas' trainers now, not when Ray reaps the driver
                ray.cancel(ref, force=True, recursive=True)
            raise
        for ref in ready:
            i, strategy, run_id, _ = pending.pop(ref)
            try:
                r = ray.get(ref)
            except Exception as err:  # one failed replica does not stop the others (a stop does)
                if stop_of(err) is not None:
                    raise
                end_runs(client, [run_id], err)
                unfinished.pop(run_id, None)
                failures.append((i, err))
                log(f"replica {i} ({strategy}): FAILED: {failure_reason(err)}")
                continue
            client.set_terminated(run_id, status="FINISHED")
            unfinished.pop(run_id, None)
            done.append(r)
            log(f"replica {i} ({strategy}): done, {r['epochs']} epochs in {r['seconds']:,.0f}s, "
                f"val top1 err {r['val/top1_err']:.4f}")
    done.sort(key=lambda r: r["replica"])
    for r in done:  # input-bound replicas: what to change (their last epoch's split, `time/*` in MLflow)
        advice = input_bound_advice(r["replica"], r["strategy"], r.get("time/data_wait_frac"))
        if advice:
            log(advice)
    errs = [r["val/top1_err"] for r in done if r.get("val/top1_err") is not None]
    if errs:
        client.log_batch(parent, metrics=_metrics({"ensemble/replicas_done": len(done),
                                                    "ensemble/best_single_val_top1_err": min(errs),
                                                    "ensemble/mean_single_val_top1_err": sum(errs) / len(errs),
                                                    "ensemble/train_s": time.perf_counter() - t0}))
    if failures:
        raise EnsembleError(f"{len(failures)} replica(s) failed: "
                            + "; ".join(f"replica {i}: {failure_reason(err)}" for i, err in failures))
    version = wait_for_tracking(register_ensemble, client.raw, uri, parent, cfg, train, log, uri=uri,
                                who="the driver")  # (once: it finds a version registered before)
    client.set_terminated(parent, status="FINISHED")
    log(f"ensemble {cfg.ensemble.name}: {len(done)} replicas done; MLflow parent run {parent}"
        + (f"; the ensemble as one model: models:/{cfg.tracking.register_ensemble}/{version}" if version else ""))
    return {"parent_run_id": parent, "experiment_id": exp_id, "replicas": done}


def failure_reason(error: BaseException) -> str:
    """The worker's own error behind a replica's failure, in one line: Ray wraps it (the task's
    RayTaskError, Ray Train's WorkerGroupError with a traceback per rank); the innermost error is what
    the user can act on. Its type and the first line of its message (or, for an error only known as
    Ray's text of a remote traceback, that traceback's last line); the error's full text is kept in the
    run's `error` tag."""
    try:
        seen = set()
        while id(error) not in seen:
            seen.add(id(error))
            failures = getattr(error, "worker_failures", None)
            inner = next(iter(failures.values()), None) if isinstance(failures, dict) and failures \
                else getattr(error, "cause", None)
            if not isinstance(inner, BaseException):
                break
            error = inner
        name = type(error).__name__
        lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
        if name.startswith("RayTaskError") or (lines and lines[0].startswith("ray::")):
            text = lines[-1] if lines else ""  # (a remote traceback: its last line names the error)
            name = name.removeprefix("RayTaskError(").rstrip(")")
        else:
            text = lines[0] if lines else ""
        if not text:
            return name
        return text if text.startswith(name + ":") else f"{name}: {text}"
    except Exception:
        return type(error).__name__


def register_ensemble(client, uri: str, parent_id: str, cfg: TrainConfig, train, log=print) -> str | None:
    """Log and register the finished ensemble as one pyfunc (`pipeline.serving`), once: a resubmitted
    or re-run driver finds the version by the parent run's tag, or by the registry's own tag."""
    name = cfg.tracking.register_ensemble
    if not name:
        return None
    tags = client.get_run(parent_id).data.tags
    if tags.get("ensemble_model_version"):
        return tags["ensemble_model_version"]
    existing = client.search_model_versions(f"name = '{name}' and tags.ensemble_run_id = '{parent_id}'")
    if existing:
        version = min(existing, key=lambda v: int(v.version)).version
        from pipeline.serving import move_latest_alias

        move_latest_alias(client, name, version)  # (a driver stopped between registering and the alias)
    else:
        from pipeline.evaluate.run import load_replicas
        from pipeline.serving import log_ensemble_model

        parent = client.get_run(parent_id)
        with tempfile.TemporaryDirectory() as tmp:
            replicas = load_replicas(client, parent, Path(tmp))
        classes = train.manifest.get("class_names") or train.classes
        log(f"registering the ensemble ({len(replicas)} replicas, 1/10/144 crops) as model '{name}'")
        version = log_ensemble_model(uri, parent_id, replicas, classes, cfg.data.input_size, name,
                                     tags={"ensemble_run_id": parent_id, "ensemble": cfg.ensemble.name,
                                           "replicas": str(len(replicas))},
                                     max_side=(train.manifest.get("job") or {}).get("max_side"))
    client.set_tag(parent_id, "ensemble_model_version", str(version))
    return str(version)


def _metrics(d: dict):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in d.items()]
