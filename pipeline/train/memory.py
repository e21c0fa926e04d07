"""The memory a replica's worker needs, so that no node is given more workers than its memory holds.

`ensemble.memory_per_worker: auto` measures it: the replica's real training step (its DALI pipeline at
the recipe's input size and batch, the model, loss, SGD step and Polyak update) runs for `PROBE_STEPS`
steps in a fresh Ray worker process, on a node where the replica's workers would run, and that process's
peak resident memory, plus `MARGIN` and `WORKER_EXTRA`, is what each worker reserves: Ray's `memory`
resource, which the placement plan counts per node beside CPUs and GPUs and which Ray's scheduler then
holds to. The figure is cached in this user's cache folder, keyed by what sets it (model, input size, batch, threads, device,
the classes and the images' size and colour, the torch and DALI versions), so a machine measures a recipe
once. A number is the
user's own figure, in GiB.

Measured for the demo recipe (2 replicas at once on a 2-core, 24 GiB machine, every Ray process's peak
resident memory sampled): the probe peaked at 1.14 GiB, a Ray Train worker at 1.51 GiB (it also holds Ray
Train's own state, the validation pipeline and a checkpoint being written); each replica's supervising
task (which exports the final model) at 1.10 GiB, its Ray Train controller at 0.66 GiB and synchronisation
actor at 0.19 GiB. Those three run on the driver's node; each replica running reserves `REPLICA_OVERHEAD`
there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

GIB = 2**30
MARGIN = 0.2  # of the measured peak: threads, the allocator and DALI's buffers vary from step to step
WORKER_EXTRA = int(0.25 * GIB)  # what a Ray Train worker holds beyond the training step (see above)
PROBE_STEPS = 4  # training steps of the probe: the first ones reach the steady state's peak
REPLICA_OVERHEAD = 2 * GIB  # a replica's supervising task, Ray Train controller and actor, on the driver's node
PROBE_VERSION = 1


def memory_key(cfg, train, threads: int) -> str:
    """What the peak depends on, as a short digest."""
    import nvidia.dali
    import torch

    from pipeline.shards.splits import image_profile

    e, d, m = cfg.ensemble, cfg.data, cfg.model
    side, channels = image_profile(train)  # (what the decoded images take: their size, not which they are)
    parts = {"v": PROBE_VERSION, "variant": m.variant, "aux": m.aux_logits, "channels_last": m.channels_last,
             "input_size": d.input_size, "batch": d.batch_size, "threads": threads, "dali_threads": d.num_threads,
             "device": d.device, "gpus": e.gpus_per_worker, "classes": len(train.classes),
             "side": 2 ** max(0, round(math.log2(max(side, 1)))), "channels": channels,
             "torch": torch.__version__, "dali": nvidia.dali.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_file():
    from pipeline.shards.cachedir import CacheDirError, private_dir, user_cache_root

    try:
        return private_dir(user_cache_root() / "memory") / "peaks.json"
    except CacheDirError:
        return None


def cached_peak(key: str) -> int | None:
    f = _cache_file()
    if f is None or not f.is_file():
        return None
    try:
        value = json.loads(f.read_text()).get(key, {}).get("peak_rss")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int | float) and value > 0 else None


def store_peak(key: str, peak: int) -> None:
    f = _cache_file()
    if f is None:
        return
    try:
        data = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"peak_rss": int(peak), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, f)
    except OSError:
        tmp.unlink(missing_ok=True)


# An environment of its own: Ray starts a new worker process for the probe rather than reuse an idle one
# (whose own peak, e.g. from decoding images for the corrupt-image scan, would be counted).
FRESH_PROCESS = {"env_vars": {"INCEPTION_MEMORY_PROBE": "1"}}


def probe_peak(cfg, exclude: list[str], threads: int) -> int:
    """The peak resident memory of a fresh worker process training `PROBE_STEPS` steps of replica 0 on
    `threads` threads."""
    from dataclasses import asdict

    import ray

    from pipeline.train.budget import warmup_rate

    e = cfg.ensemble
    task = ray.remote(max_retries=0, max_calls=1)(warmup_rate)
    got = ray.get(task.options(num_cpus=max(e.cpus_per_worker, threads if e.gpus_per_worker == 0 else 0),
                               num_gpus=e.gpus_per_worker, runtime_env=FRESH_PROCESS).remote(
        asdict(cfg), 0, threads, 0.0, exclude, PROBE_STEPS))
    return int(got["peak_rss"])


def worker_memory(cfg, train, log=print, dry_run: bool = False, exclude=None, threads: int | None = None) -> int | None:
    """Bytes of memory each worker reserves (`ensemble.memory_per_worker`), or None: not reserved (the
    setting is null, or `auto` in a dry run on a machine that has not measured this recipe yet).
    `exclude`: a callable giving the training split's corrupt images (the probe's pipeline leaves them out).
    `threads`: the most threads a worker may run with (a widened replica's): the probe runs with that
    many, so that no worker, however wide, needs more than it reserves."""
    setting = cfg.ensemble.memory_per_worker
    if setting is None:
        return None
    if setting != "auto":
        need = int(float(setting) * GIB)
        log(f"memory: each worker reserves {need / GIB:.2f} GiB (ensemble.memory_per_worker)")
        return need
    threads = threads or max(1, int(cfg.ensemble.cpus_per_worker))
    key = memory_key(cfg, train, threads)
    peak = cached_peak(key)
    how = f"on {threads} thread(s), measured before on this machine"
    if peak is None:
        if dry_run:
            log("memory: a run first measures a worker's peak memory (a few training steps); a dry run plans by "
                "CPUs and GPUs only")
            return None
        t0 = time.perf_counter()
        peak = probe_peak(cfg, exclude() if exclude else [], threads)
        store_peak(key, peak)
        how = f"measured now, {PROBE_STEPS} training steps on {threads} thread(s) in {time.perf_counter() - t0:.0f} s"
    need = int(peak * (1 + MARGIN)) + WORKER_EXTRA
    log(f"memory: a training step peaks at {peak / GIB:.2f} GiB ({how}); each worker reserves {need / GIB:.2f} GiB "
        f"(+{MARGIN:.0%} + {WORKER_EXTRA / GIB:.2f} GiB), each replica {REPLICA_OVERHEAD / GIB:.2f} GiB more on the "
        "driver's node")
    return need
