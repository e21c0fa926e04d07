"""Shard job throughput vs plain `tar -cf` over the same ImageNet-layout tree, on the same disk.

Generates N JPEGs of ImageNet-like size (about 500x375, ~110 KB: smooth gradients plus noise), then
times in interleaved rounds, with a warm page cache: `tar -cf` of the train folder; the same followed
by `sync` of the tar (on disk, as the shard job's output is: it fsyncs every shard before naming it
complete); the shard job with --workers W; and with one worker (Ray tasks, no re-encoding). Prints
images/s (median and range over rounds), the median per-round ratios, and the scaling from 1 to W
workers. Target: shard job >= 0.8 of tar at an amortised size (the default: at a
few thousand images the job's fixed costs, Ray task start and the manifest, dominate).

    python benchmarks/shard_throughput.py [--images 12000] [--workers 2] [--rounds 3] [--dir /tmp/x]
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
from benchmarks.rounds import interleaved, ratio, ratio_line, spread  # noqa: E402
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=12000, help="JPEGs to generate (default: 12000, 1.3 GB)")
    p.add_argument("--workers", type=int, default=2, help="shard job workers (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--samples-per-shard", type=int, default=250, help="default: 250")
    p.add_argument("--dir", default=None, help="work folder, kept: the images generated in <dir>/imagenet are "
                   "reused by the next run with the same --images (default: a temporary one, removed)")
    args = p.parse_args()

    import ray

    from pipeline.config import ShardConfig
    from pipeline.shards.job import run

    work = Path(args.dir or tempfile.mkdtemp(prefix="shardbench-"))
    root = work / "imagenet"
    try:
        t0 = time.perf_counter()
        done = root / f".generated-{args.images}"  # (a kept --dir: the same tree is not generated again)
        if done.is_file():
            nbytes = int(done.read_text())
            print(f"reusing {args.images} JPEGs under {root}")
        else:
            if root.exists():  # (generated for another --images, or not by this benchmark: not ours to delete)
                sys.exit(f"{root} exists and does not hold this benchmark's {args.images} images; "
                         "choose another --dir or remove it")
            nbytes = make_tree(root, args.images)
            done.write_text(str(nbytes))
            print(f"generated {args.images} JPEGs, {nbytes / args.images / 1e3:.0f} KB mean, "
                  f"{nbytes / 1e6:.0f} MB in {time.perf_counter() - t0:.0f}s under {root}")
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)

        def tar(durable: bool):
            def run_tar() -> float:
                (work / "shardbench-plain.tar").unlink(missing_ok=True)
                subprocess.run(["sync"], check=True)
                t0 = time.perf_counter()
                subprocess.run(["tar", "-cf", str(work / "shardbench-plain.tar"), "-C", str(root), "train"], check=True)
                if durable:
                    subprocess.run(["sync", "-d", str(work / "shardbench-plain.tar")], check=True)
                return args.images / (time.perf_counter() - t0)
            return run_tar

        def shard(workers: int):
            def run_job() -> float:
                out = work / "shardbench-out"
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)  # (the removal's writes do not land in the next timing)
                t0 = time.perf_counter()
                run(ShardConfig(source="imagenet", root=str(root), out=str(out), splits=["train"],
                                samples_per_shard=args.samples_per_shard, workers=workers), log=lambda *_: None)
                return args.images / (time.perf_counter() - t0)
            return run_job

        tar(False)()  # warm the page cache for all
        candidates = {"tar": tar(False), "tar_sync": tar(True), "shard": shard(args.workers)}
        if args.workers > 1:
            candidates["shard1"] = shard(1)
        res = interleaved(candidates, args.rounds)
        print(f"{args.images:,} images, {nbytes / 1e6:,.0f} MB, {args.rounds} interleaved rounds (median [range])")
        print(f"  tar -cf                          {spread(res['tar'])} img/s")
        print(f"  tar -cf, then sync               {spread(res['tar_sync'])} img/s")
        print(f"  shard job, {args.workers} workers            {spread(res['shard'])} img/s")
        if "shard1" in res:
            print(f"  shard job, 1 worker              {spread(res['shard1'])} img/s")
        print("  " + ratio_line(f"shard job ({args.workers} workers) / tar", res["shard"], res["tar"], 0.8))
        print("  " + ratio_line(f"shard job ({args.workers} workers) / tar + sync", res["shard"], res["tar_sync"], 0.8))
        if "shard1" in res:
            med, lo, hi = ratio(res["shard"], res["shard1"])
            print(f"  scaling 1 -> {args.workers} workers: x{med:.2f} [{lo:.2f}-{hi:.2f}], efficiency "
                  f"{med / args.workers:.0%} per worker")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
