"""Fit an ensemble's training into a wall-clock budget (`ensemble.budget_minutes`).

A warm-up measures what this cluster trains: one Ray task per replica that runs at once, each running
the real training step (the recipe's DALI pipeline for its replica's strategy, the model, SGD, the
Polyak update) on the recipe's batch for `WARMUP_S` seconds, all at the same time, as the replicas
will, each as wide as those replicas (`round_widths`: CPU slots that would idle go to the replicas that
run, as threads); and, when the ensemble's last round is wider, its replicas the same way. From
the measured images/s, `plan_epoch` sizes `data.limit_train` (the images of one epoch, whole batches)
so that every replica, the per-epoch validation and the fixed costs fit the budget:

    rounds x (REPLICA_S + epochs x (limit_train + limit_val x VAL_COST) / slot rate)
    (+ the widened tail at its own rate) + ENSEMBLE_S + the warm-up  <=  budget

The recipe's `data.limit_train` (or the whole split) is the most an epoch takes: a fast machine
finishes early rather than training past the recipe. `ensemble.budget_min_images` is the least a
replica sees: a budget too short for it on this machine is said so, and the floor is trained anyway
(a result that means something, late, rather than one that does not, on time).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

WARMUP_S = 10.0  # timed seconds of training per warm-up task (after two untimed steps)
REPLICA_S = 45.0  # per replica: worker start, pipeline build, checkpoints, model export and registration (measured: 45-55 s on 2-core machines)
ENSEMBLE_S = 60.0  # once: registering the ensemble as one model (1/10/144 crops)
VAL_COST = 1 / 3  # a validation image (forward only) against a training image (forward, backward, update)


def warmup_rate(cfg_dict: dict, replica: int, threads: int, seconds: float = WARMUP_S,
                exclude: list[str] | None = None, max_steps: int | None = None) -> dict:
    """Images per second of one worker running the replica's real training step (in a Ray task of
    `threads` CPUs): DALI train pipeline of its strategy, model, loss, SGD step, Polyak update; and the
    process's peak resident memory (`peak_rss`, bytes: the task runs in a fresh worker process). With
    `max_steps`, it stops after that many steps (what the memory probe needs) instead of after `seconds`."""
    import resource

    import torch

    from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
    from pipeline.data.sampling import get_strategy
    from pipeline.model.googlenet import googlenet_loss
    from pipeline.shards.cache import split_location
    from pipeline.shards.splits import image_profile, open_split
    from pipeline.train.loop import PolyakAverage, build_model, build_optimizer, config_from_dict, devices

    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(max(1, threads))
    device, dali_gpu = devices(cfg)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    split = open_split(split_location(cfg.data.shards, cfg.data.train_split))
    name = cfg.strategy_names()[replica]
    strategy = get_strategy(name, cfg.data.input_size, cfg.ensemble.custom_strategies).for_source(*image_profile(split))
    loader = DALITrainLoader(split, TrainPipelineConfig(strategy, batch_size=cfg.data.batch_size, seed=replica,
                                                        device=cfg.data.device, device_id=dali_gpu,
                                                        num_threads=cfg.data.num_threads or max(1, threads)),
                             exclude=exclude or [])
    torch.manual_seed(0)
    model = build_model(cfg, len(split.classes)).to(device, memory_format=fmt).train()
    ema = PolyakAverage(model, cfg.schedule.ema_decay)
    opt = build_optimizer(model, cfg)
    cuda = device.type == "cuda"
    steps, images, t0 = 0, 0, None
    while True:
        before = steps
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = googlenet_loss(model(x), y, cfg.schedule.aux_weight, cfg.schedule.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            if cuda:
                torch.cuda.synchronize()
            steps += 1
            if steps == 2:  # (the first steps warm the allocator and DALI's prefetch)
                t0 = time.perf_counter()
            elif t0 is not None:
                images += len(y)
            if (max_steps and steps >= max_steps) or (t0 is not None and images and
                                                        time.perf_counter() - t0 >= seconds):
                took = time.perf_counter() - t0 if t0 is not None else 0.0
                return {"replica": replica, "threads": threads, "images_per_s": images / took if images else None,
                        "steps": max(0, steps - 2),
                        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # (KiB on Linux)
        if steps == before:
            raise RuntimeError(f"the budget's warm-up: the training split gave no batch of {cfg.data.batch_size}")


@dataclass
class EpochPlan:
    limit_train: int  # images per epoch per replica (whole global batches, or the recipe's value as written)
    cap: int  # the most an epoch takes: the recipe's limit_train or the whole split
    floor: int  # images per epoch that give ensemble.budget_min_images
    estimate_s: float  # the whole training's estimated wall-clock seconds at limit_train (warm-up included)
    fits: bool  # False: even the floor does not fit the budget
    reason: str  # one line: what was chosen and why
    at_cap: bool = False  # the recipe's epoch fits whole


def widens(e) -> bool:
    """Whether replicas take free CPU slots as threads: driver-paced rounds (`max_concurrent` a number or
    auto), CPU-only replicas of one worker, `widen_tail` on. (Without max_concurrent every replica is
    submitted at once and Ray runs them as CPUs free up: there is no round to widen.)"""
    return bool(e.widen_tail and e.max_concurrent and e.gpus_per_worker == 0 and e.workers_per_replica == 1)


def round_width(k: int, cpu_fit: list[int], memory_fit: list[int] | None = None) -> int:
    """CPU slots (threads) each of `k` replicas running at once takes: the most `w` such that the nodes
    hold `k` workers of `w` slots each (a node of `c` slots holds `c // w`, and no more than its memory
    holds: `memory_fit`). 1: no widening."""
    if k <= 0:
        return 1
    mem = memory_fit or [k] * len(cpu_fit)
    w = sum(cpu_fit) // k
    while w > 1 and sum(min(c // w, m) for c, m in zip(cpu_fit, mem, strict=True)) < k:
        w -= 1
    return max(1, w)


def round_widths(replicas: int, slots: int, cpu_fit: list[int], memory_fit: list[int] | None,
                 widen: bool) -> tuple[int, int]:
    """(width of a full round's replicas, width of the last, partial round's): with fewer replicas at once
    than the cluster's CPU slots (memory bounds them, or fewer replicas than slots, or the last round of
    7 replicas 2 at a time), the free slots' CPUs go to the replicas that run, as threads, where a node
    holds that wide a worker (docs/explanation/performance.md, "Packing replicas on few cores")."""
    if not widen or slots < 1:
        return 1, 1
    full = round_width(min(slots, replicas), cpu_fit, memory_fit)
    tail = replicas % slots if replicas > slots else 0
    return full, (round_width(tail, cpu_fit, memory_fit) if tail else full)


def plan_epoch(*, budget_s: float, elapsed_s: float, replicas: int, slots: int, width: int, slot_rate: float,
               tail_rate: float | None, epochs: int, limit_val: int, batch: int, cap: int, min_images: int) -> EpochPlan:
    """Size one epoch (see the module's docstring). Rates are images/s of one replica: `slot_rate` while
    `slots` replicas run at once, `tail_rate` for a widened last-round replica."""
    full_rounds, tail = divmod(replicas, slots)
    if tail and width <= 1:
        full_rounds, tail = full_rounds + 1, 0  # a partial round as long as a full one
    # seconds = fixed + per_image x limit_train
    per_epoch_image = full_rounds * epochs / slot_rate + (tail and epochs / (tail_rate or slot_rate))
    rounds = full_rounds + (1 if tail else 0)
    fixed = elapsed_s + ENSEMBLE_S + rounds * REPLICA_S + per_epoch_image * limit_val * VAL_COST
    floor = max(batch, math.ceil(min_images / epochs / batch) * batch)
    whole = max(batch, cap // batch * batch)  # (an epoch trains whole batches: 6,000 at 64 is 93 steps)
    floor = min(floor, whole)
    fit = int((budget_s - fixed) / per_epoch_image) // batch * batch if budget_s > fixed else 0
    # the recipe's value as written when it fits: the same settings (and digest) as a run without a budget
    chosen = cap if fit >= whole else max(floor, fit)

    def est(n: int) -> float:
        return fixed + per_epoch_image * n

    rates = f"{slot_rate:,.0f} img/s per replica with {slots} at once" + (
        f", {tail_rate:,.0f} img/s for the last {tail} ({width} CPU slots each)" if tail else "")
    if fit >= whole:
        reason = (f"the recipe's {cap:,} images per epoch fit the budget ({rates}): about {est(cap) / 60:.1f} min "
                  f"of {budget_s / 60:.1f}")
    elif fit >= floor:
        reason = f"{chosen:,} images per epoch (of the recipe's {cap:,}) fit {budget_s / 60:.1f} min at {rates}"
    else:
        reason = (f"TOO SLOW for a meaningful result in {budget_s / 60:.1f} min: at {rates}, the floor of "
                  f"{floor * epochs:,} images per replica ({floor:,} per epoch, ensemble.budget_min_images) takes "
                  f"about {est(floor) / 60:.1f} min; training the floor anyway")
    return EpochPlan(chosen, cap, floor, est(min(chosen, whole)), fit >= floor, reason, fit >= whole)


def recorded_limit(client, cfg) -> tuple[int | None, str] | None:
    """(data.limit_train, run id) of this ensemble's parent run, if it was started before: a resubmission
    keeps what its first submission chose (the epoch size is a setting that changes results)."""
    import json

    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.ensemble = '{cfg.ensemble.name}' and tags.kind = 'ensemble'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    run = runs[0]
    settings = json.loads(run.data.tags.get("settings", "{}"))
    if "data.limit_train" in settings:
        value = settings["data.limit_train"]
    elif "data.limit_train" in run.data.params:
        value = run.data.params["data.limit_train"]
    else:
        return None  # (a run that never recorded its settings: nothing to keep)
    value = None if value in (None, "None") else int(value)
    return value, run.info.run_id


def fit_budget(cfg, train, val, placement: dict | None, client, started: float, log=print, dry_run: bool = False,
               scan_dir: str | None = None) -> dict:
    """Size `cfg.data.limit_train` to `ensemble.budget_minutes` (in place); returns what was measured and
    chosen, for the parent run. A dry run measures nothing and keeps the recipe's value."""
    from dataclasses import asdict

    import ray

    from pipeline.config import ConfigError

    e = cfg.ensemble
    budget_s = e.budget_minutes * 60
    cap = min(cfg.data.limit_train or train.num_samples, train.num_samples)
    log(f"budget: {e.budget_minutes:g} min to train the ensemble (ensemble.budget_minutes)")
    prior = recorded_limit(client, cfg)
    if prior is not None:
        if prior[0] != cfg.data.limit_train and prior[0] is not None and prior[0] > cap:
            log(f"budget: warning: the recorded data.limit_train {prior[0]:,} is above this submission's "
                f"{cap:,}; the ensemble's own value is kept (set another ensemble.name for a new one)")
        cfg.data.limit_train = prior[0]
        log(f"budget: ensemble {e.name} was started before (MLflow run {prior[1]}): it keeps data.limit_train = "
            f"{prior[0] if prior[0] is None else format(prior[0], ',')}, chosen then; nothing is measured again")
        return {"measured": False, "limit_train": prior[0]}
    if placement is None:
        raise ConfigError("ensemble.budget_minutes: the cluster's nodes must be up to measure them "
                          "(set data.limit_train instead on an autoscaling cluster)")
    slots = placement["replicas_at_once"]
    full_w, tail_w = round_widths(e.replicas, slots, placement["cpu_fit"], placement["memory_fit"], widens(e))
    tail = e.replicas % slots if e.replicas > slots else 0
    width = tail_w if tail and tail_w > full_w else 1  # (a last round as wide as the others: a full round's time)
    on = f" on {full_w} CPU slots each" if full_w > 1 else ""
    if dry_run:
        log(f"budget: a run first trains {slots} replica(s) at once{on} for about {WARMUP_S:.0f} s to measure this "
            f"cluster, then sizes data.limit_train (at most the recipe's {cap:,}); a dry run measures nothing")
        return {"measured": False}
    log(f"budget: warm-up: {slots} replica(s) train at once{on} for {WARMUP_S:.0f} s"
        + (f", then {'one' if tail == 1 else f'{tail} at once'} on {width} slots' CPUs (the last round's width)"
           if width > 1 else ""))
    exclude = []
    if scan_dir:  # (the scan training needs anyway, cached: a corrupt image would stop the warm-up's pipeline)
        from pipeline.data.scan import corrupt_images

        exclude = corrupt_images(train, scan_dir, log=log)
    cfg_dict = asdict(cfg)
    # (one task per process: a worker that imported torch and DALI does not linger, holding their memory)
    task = ray.remote(max_retries=0, max_calls=1)(warmup_rate)
    memory = placement["worker"].get("memory")

    def measure(count: int, w: int, first: int) -> list[dict]:
        """`count` tasks at once, each as wide as the replicas it stands for (`w` CPU slots)."""
        opts = {"num_cpus": e.cpus_per_worker * w, "num_gpus": e.gpus_per_worker, **({"memory": memory} if memory else {})}
        return ray.get([task.options(**opts).remote(cfg_dict, (first + k) % e.replicas, max(1, int(e.cpus_per_worker * w)),
                                                    WARMUP_S, exclude) for k in range(count)])

    got = measure(slots, full_w, 0)
    slot_rate = sum(g["images_per_s"] for g in got) / len(got)
    tail_rate = None
    if width > 1:
        tail_got = measure(tail, width, e.replicas - tail)
        tail_rate = sum(g["images_per_s"] for g in tail_got) / len(tail_got)
    elapsed = time.perf_counter() - started
    plan = plan_epoch(budget_s=budget_s, elapsed_s=elapsed, replicas=e.replicas, slots=slots, width=width,
                      slot_rate=slot_rate, tail_rate=tail_rate, epochs=cfg.schedule.epochs,
                      limit_val=min(cfg.data.limit_val or val.num_samples, val.num_samples), batch=cfg.global_batch,
                      cap=cap, min_images=e.budget_min_images)
    if not plan.at_cap:  # (at the cap: the recipe's value as written, None included: the same settings)
        cfg.data.limit_train = plan.limit_train
    rates = ", ".join(f"{g['images_per_s']:,.0f}" for g in got)
    log(f"budget: measured {rates} img/s ({slots} at once)"
        + (f", {tail_rate:,.0f} img/s on {width} slots' CPUs" if tail_rate else "") + f"; warm-up took {elapsed:.0f} s")
    log(f"budget: {plan.reason}")
    as_written = "" if cfg.data.limit_train == plan.limit_train else \
        f" (the recipe's {cfg.data.limit_train or 'whole split'}, as written)"
    log(f"budget: data.limit_train = {plan.limit_train:,} images per epoch{as_written} x {cfg.schedule.epochs} epochs = "
        f"{plan.limit_train * cfg.schedule.epochs:,} per replica; about {plan.estimate_s / 60:.1f} min of "
        f"{e.budget_minutes:g} with the warm-up")
    return {"measured": True, "minutes": e.budget_minutes, "limit_train": cfg.data.limit_train, "cap": plan.cap,
            "floor": plan.floor, "fits": plan.fits, "estimate_s": plan.estimate_s, "warmup_s": elapsed,
            "slot_rate": slot_rate, "tail_rate": tail_rate, "slots": slots, "tail_width": width, "round_width": full_w,
            "reason": plan.reason}


def log_budget(client, run_id: str, budget: dict) -> None:
    """What the budget measured and chose, on the ensemble's parent run (tags and metrics)."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = {"budget/minutes": budget["minutes"], "budget/warmup_images_per_s": budget["slot_rate"],
               "budget/limit_train": budget["limit_train"], "budget/estimate_s": budget["estimate_s"],
               "budget/warmup_s": budget["warmup_s"]}
    if budget.get("tail_rate"):
        metrics["budget/tail_images_per_s"] = budget["tail_rate"]
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag("budget_reason", budget["reason"][:5000]), RunTag("budget_fits", str(budget["fits"]).lower()),
                           RunTag("budget_limit_train", str(budget["limit_train"]))])
