"""Training input pipeline throughput: DALI (CPU) vs the PyTorch fallback, on the same shards.

Writes N synthetic ImageNet-sized JPEGs (about 500x375) into shards, then measures in interleaved
rounds, in the same process: the decode-only rate of those JPEGs (DALI CPU decoder: the ceiling), the
DALI train loader of a strategy as training runs it (default `inception`, 224 output; on CPU its crops
are resized and normalised by torch on this process's main thread), and the fallback (webdataset +
torchvision v2 + DataLoader with the same number of workers as DALI threads). Prints images/s (median
and range over rounds), images per CPU-second (this process and its DataLoader workers), and the
median per-round ratios. Targets: DALI train >= 0.7 of the decode-only ceiling, >= 2.0x the fallback.

    python benchmarks/data_loading.py [--images 1000] [--threads 2] [--size 224] [--device cpu] [--rounds 3]
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.rounds import interleaved, ratio_line, spread  # noqa: E402
from benchmarks.synthetic import photo_jpeg  # noqa: E402
from pipeline.shards.format import ShardSample  # noqa: E402
from pipeline.shards.splits import write_split  # noqa: E402


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(name: str, batches, batch_size: int, images: int):
    """Consume `images` images from an iterator of batches (after one warm-up batch)."""
    it = iter(batches)
    next(it)
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    while n < images:
        try:
            next(it)
        except StopIteration:
            it = iter(batches)
            continue
        n += batch_size
    del it  # DataLoader workers exit and are reaped, so their CPU time is counted
    dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
    return {"name": name, "img_s": n / dt, "img_cpu_s": n / max(dc, 1e-9), "seconds": dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="synthetic JPEGs in the shards (default: 1000)")
    p.add_argument("--measure", type=int, default=1500, help="images consumed per measurement (default: 1500)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="DALI threads = DataLoader workers (default: this process's CPUs)")
    p.add_argument("--size", type=int, default=224, help="output size (default: 224)")
    p.add_argument("--batch", type=int, default=64, help="default: 64")
    p.add_argument("--strategy", default="inception", help="sampling strategy (default: inception)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="DALI device (default: cpu)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args()

    import torch
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
    from pipeline.data.fallback import torch_train_loader
    from pipeline.data.sampling import get_strategy

    work = Path(args.dir or tempfile.mkdtemp(prefix="loadbench-"))
    try:
        rng = np.random.default_rng(0)
        jpegs = [photo_jpeg(i, rng) for i in range(args.images)]
        split = write_split(work / "train", (ShardSample(f"k{i:06d}", i % 1000, j, {"width": 500, "height": 375})
                                             for i, j in enumerate(jpegs)), [str(i) for i in range(1000)], per_shard=250)
        print(f"{args.images} JPEGs, {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB mean, 500x375; "
              f"threads/workers={args.threads} batch={args.batch} size={args.size} device={args.device} "
              f"torch threads={torch.get_num_threads()}")

        @pipeline_def(batch_size=args.batch, num_threads=args.threads, device_id=0 if args.device == "gpu" else None)
        def decode_only():
            jpg, _ = fn.readers.webdataset(paths=[str(t) for t in split.tars],
                                           index_paths=[str(i) for i in split.index_files],
                                           ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32], name="Reader")
            return fn.decoders.image(jpg, device="mixed" if args.device == "gpu" else "cpu", output_type=types.RGB)

        dp = decode_only()
        dp.build()

        class Runs:
            def __iter__(self):
                while True:
                    yield dp.run()

        strategy = get_strategy(args.strategy, args.size)
        dali = DALITrainLoader(split, TrainPipelineConfig(strategy, batch_size=args.batch, device=args.device,
                                                          num_threads=args.threads))
        torch.set_num_threads(1)  # each DataLoader worker is one CPU, as each DALI thread is
        fb = torch_train_loader(split, strategy, batch_size=args.batch, num_workers=args.threads)
        names = {"decode": "decode only (DALI)", "dali": f"DALI train ({args.strategy})", "fallback": "fallback (torchvision)"}
        per_cpu = {k: [] for k in names}

        def one(key, batches):
            def run() -> float:
                r = measure(names[key], batches, args.batch, args.measure)
                per_cpu[key].append(r["img_cpu_s"])
                return r["img_s"]
            return run

        res = interleaved({"decode": one("decode", Runs()), "dali": one("dali", dali), "fallback": one("fallback", fb)},
                          args.rounds)
        print(f"{'':<30}{'images/s, median [range]':>28}{'img/CPU-s':>11}")
        for k, name in names.items():
            print(f"{name:<30}{spread(res[k]):>28}{statistics.median(per_cpu[k]):>11.1f}")
        print(ratio_line("DALI train / decode-only ceiling", res["dali"], res["decode"], 0.7))
        print(ratio_line("DALI train / fallback", res["dali"], res["fallback"], 2.0))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
