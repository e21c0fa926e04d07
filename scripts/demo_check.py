#!/usr/bin/env python3
"""`make demo`'s check before any work: the recipe loads, and a recipe that asks for a GPU share per
worker (fashion-mnist-full) is refused on a Ray cluster without GPUs, naming the fix, rather than after
the shards are written.

    RAY_ADDRESS=127.0.0.1:6379 python scripts/demo_check.py --recipe fashion-mnist-full [--gpus-per-worker 0]

Exit status: 0 fine, 2 refused (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cluster_gpus(address: str) -> float:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        return float(ray.cluster_resources().get("GPU", 0))
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="demo", help="named recipe or YAML file (default: demo)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="ensemble.gpus_per_worker given on the command line (default: the recipe's)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "127.0.0.1:6379"),
                   help="the Ray cluster (default: $RAY_ADDRESS, else 127.0.0.1:6379)")
    args = p.parse_args(argv)
    os.environ["RAY_ADDRESS"] = args.address
    import pipeline  # noqa: F401  (loopback-only Ray defaults for this address, before ray is imported)
    from pipeline.config import ConfigError, load_recipe

    sets = [] if args.gpus_per_worker is None else [f"ensemble.gpus_per_worker={args.gpus_per_worker}"]
    try:
        cfg = load_recipe(args.recipe, sets)
    except ConfigError as e:
        print(f"make demo: error: {e}", file=sys.stderr)
        return 2
    want = cfg.ensemble.gpus_per_worker
    if want > 0 and cluster_gpus(args.address) == 0:
        given = "GPUS_PER_WORKER" if args.gpus_per_worker is not None else "the recipe's ensemble.gpus_per_worker"
        print(f"make demo: error: RECIPE={args.recipe} asks for {want:g} GPU per worker ({given}) and the Ray "
              f"cluster at {args.address} has no GPU. Train it on the CPUs with `make demo RECIPE={args.recipe} "
              "GPUS_PER_WORKER=0` (long: add DEMO_MINUTES=<minutes> to size it to a time budget), or run "
              "the CPU demo: `make demo`", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
