"""Shard job throughput vs plain `tar -cf` over the same ImageNet-layout tree, on the same disk.

Generates N JPEGs of ImageNet-like size (about 500x375, ~110 KB: smooth gradients plus noise), then
times, best of R runs each with a warm page cache: `tar -cf` of the train folder, and the shard job
(Ray tasks, --workers W, no re-encoding). Prints images/s of both and their ratio. Target: >= 0.6.

    python benchmarks/shard_throughput.py [--images 3000] [--workers 2] [--repeats 2] [--dir /tmp/x]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401
from benchmarks.synthetic import photo_jpeg  # noqa: E402


def make_tree(root: Path, n: int, classes: int = 20) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        wnid = f"n{1000000 + i % classes:08d}"
        d = root / "train" / wnid
        d.mkdir(parents=True, exist_ok=True)
        data = photo_jpeg(i, rng)
        (d / f"{wnid}_{i}.JPEG").write_bytes(data)
        total += len(data)
    return total


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000, help="JPEGs to generate (default: 3000)")
    p.add_argument("--workers", type=int, default=2, help="shard job workers (default: 2)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each, best kept (default: 2)")
    p.add_argument("--samples-per-shard", type=int, default=250, help="default: 250")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args()

    import ray

    from pipeline.config import ShardConfig
    from pipeline.shards.job import run

    work = Path(args.dir or tempfile.mkdtemp(prefix="shardbench-"))
    root = work / "imagenet"
    try:
        t0 = time.perf_counter()
        nbytes = make_tree(root, args.images)
        print(f"generated {args.images} JPEGs, {nbytes / args.images / 1e3:.0f} KB mean, "
              f"{nbytes / 1e6:.0f} MB in {time.perf_counter() - t0:.0f}s under {root}")
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)

        def tar():
            subprocess.run(["tar", "-cf", str(work / "plain.tar"), "-C", str(root), "train"], check=True)

        def shard():
            out = work / "shards"
            shutil.rmtree(out, ignore_errors=True)
            run(ShardConfig(source="imagenet", root=str(root), out=str(out), splits=["train"],
                            samples_per_shard=args.samples_per_shard, workers=args.workers), log=lambda *_: None)

        tar()  # warm the page cache for both
        t_tar = best_of(args.repeats, tar)
        t_shard = best_of(args.repeats, shard)
        r_tar, r_shard = args.images / t_tar, args.images / t_shard
        print(f"{'':<28}{'seconds':>10}{'images/s':>12}{'MB/s':>10}")
        print(f"{'tar -cf':<28}{t_tar:>10.2f}{r_tar:>12,.0f}{nbytes / t_tar / 1e6:>10,.0f}")
        print(f"{f'shard job ({args.workers} workers)':<28}{t_shard:>10.2f}{r_shard:>12,.0f}{nbytes / t_shard / 1e6:>10,.0f}")
        print(f"ratio shard/tar: {r_shard / r_tar:.2f} (target >= 0.60)")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
