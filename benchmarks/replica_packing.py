"""How to run seven replicas on a few cores: which packing trains the most images per wall-clock second.

Each replica is a process running the training step (GoogLeNet-bn at the demo's 32 px, batch 64,
channels_last, SGD, Polyak update) on in-memory tensors, with as many torch threads as it holds cores.
Measured in interleaved rounds, all processes of a configuration at once for --seconds: K replicas of
one thread each (K = the cores: one per core), all of them at once with a share of the cores (one
thread each), and one replica on every core (threads). From the medians, the wall-clock time of a whole
ensemble of equal replicas under three plans: one per core in rounds, the last partial round's
replicas idle-free on the free cores (`ensemble.widen_tail`, the default); the same with the free cores
left idle; all at once.

    python benchmarks/replica_packing.py [--replicas 7] [--seconds 20] [--rounds 3]
"""

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.rounds import spread  # noqa: E402


def _worker(threads: int, seconds: float, out, start) -> None:
    from benchmarks.train_throughput import make_step

    step = make_step("bn", 10, 32, 64, threads)
    for _ in range(3):
        step()
    start.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        n += 64
    out.put(n / (time.perf_counter() - t0))


def together(count: int, threads: int, seconds: float) -> list[float]:
    """images/s of each of `count` replica processes of `threads` threads, all running at once."""
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(count + 1)
    procs = [ctx.Process(target=_worker, args=(threads, seconds, out, start)) for _ in range(count)]
    for p in procs:
        p.start()
    start.wait()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=7, help="replicas of the ensemble (default: 7)")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="default: this process's CPUs")
    p.add_argument("--seconds", type=float, default=20, help="timed seconds per configuration (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    args = p.parse_args()
    c, r = args.cores, args.replicas
    res = {"per_core": [], "all_at_once": [], "one_wide": []}
    for i in range(args.rounds):
        res["per_core"].append(statistics.mean(together(c, 1, args.seconds)))  # per replica
        res["all_at_once"].append(statistics.mean(together(r, 1, args.seconds)))  # per replica
        res["one_wide"].append(together(1, c, args.seconds)[0])
        print(f"  round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:,.1f}" for k, v in res.items()), flush=True)
    per_core, all_at_once, wide = (statistics.median(res[k]) for k in ("per_core", "all_at_once", "one_wide"))
    work = 1.0  # images of one replica (any unit: the plans are compared)
    full, tail = divmod(r, c)
    width = c // tail if tail else 1
    plans = {
        "one per core, last round widened": full * work / per_core + (work / wide if tail and width == c else
                                                                     (work / per_core if tail else 0)),
        "one per core, free cores idle": math.ceil(r / c) * work / per_core,
        "all at once, a share of the cores each": work / all_at_once,
    }
    print(f"{r} replicas on {c} cores, {args.rounds} interleaved rounds of {args.seconds:g} s (median [range], "
          "images/s per replica)")
    print(f"  one per core ({c} at once, 1 thread)      {spread(res['per_core'])}")
    print(f"  all {r} at once (1 thread each)            {spread(res['all_at_once'])}")
    print(f"  one replica on all {c} cores ({c} threads)  {spread(res['one_wide'])}")
    best = min(plans.values())
    for name, t in plans.items():
        print(f"  {name:<42} {r * work / t:>8,.1f} images/s for the ensemble ({t / best:.3f}x the best time)")


if __name__ == "__main__":
    main()
