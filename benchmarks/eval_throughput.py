"""Evaluation throughput: the full path (DALI multi-crop + models) vs the models alone on ready tensors.

Writes a split of synthetic JPEGs (28x28 grayscale like Fashion-MNIST by default, or 500x375 with
--photo), then in one process, in interleaved rounds (A, B, C, D, A, B, ...):
(a) plain: DALI eval loader with all the scheme's crops + normalisation + the --models models' forward
    + softmax, as the evaluation job runs an ensemble;
(b) the model alone on ready tensors of the same shape;
(c) dedup: the loader's distinct crops only (`dedup=True`), forward, expanded back to every crop;
(d) the model alone on ready tensors holding as many crops as (c) computes.
Prints the median crops/s (crops of the scheme, duplicates counted, so plain and dedup compare
directly) and the ratios full/alone of each path, medians over rounds with their range. Target: >= 0.95.

    python benchmarks/eval_throughput.py [--crops 144] [--input-size 32] [--images 64] [--models 7] [--batch 8] [--rounds 3]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.rounds import ratio_line, spread  # noqa: E402
from benchmarks.synthetic import gray_jpeg, photo_jpeg  # noqa: E402
from pipeline.shards.format import ShardSample  # noqa: E402
from pipeline.shards.splits import write_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crops", type=int, default=144, choices=[1, 10, 144], help="default: 144")
    p.add_argument("--input-size", type=int, default=32, help="default: 32 (the demo's)")
    p.add_argument("--images", type=int, default=64,
                   help="default: 64 (the job builds its pipeline once per worker for thousands of images: with "
                        "fewer models, give more images, or the build weighs more than it does in the job)")
    p.add_argument("--batch", type=int, default=8, help="images per batch (default: 8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed (default: 3)")
    p.add_argument("--photo", action="store_true", help="500x375 photo-like JPEGs instead of 28x28 grayscale")
    p.add_argument("--variant", default="bn", choices=["bn", "paper"], help="default: bn")
    p.add_argument("--models", type=int, default=7,
                   help="models per crop, as the ensemble's evaluation runs them (default: 7)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="contiguous NCHW model and inputs (default: channels_last, as the evaluation job)")
    args = p.parse_args()

    import torch

    from pipeline.data.dali import Normalizer
    from pipeline.data.dali_eval import DALIEvalLoader
    from pipeline.evaluate.run import forward_probs, unpack_eval_batch
    from pipeline.model.googlenet import GoogLeNet

    work = Path(tempfile.mkdtemp(prefix="evalbench-"))
    try:
        rng = np.random.default_rng(0)

        make, (w, h) = (lambda i: photo_jpeg(i, rng), (500, 375)) if args.photo else (lambda i: gray_jpeg(rng), (28, 28))
        split = write_split(work / "val", (ShardSample(f"k{i:05d}", i % 10, make(i), {"width": w, "height": h})
                                           for i in range(args.images)), [str(i) for i in range(10)], per_shard=256)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        dev = torch.device("cpu")
        models = [GoogLeNet(10, variant=args.variant, aux_logits=False).eval().to(memory_format=fmt)
                  for _ in range(args.models)]
        s, k = args.input_size, args.crops
        normalize = Normalizer()

        def full(dedup: bool) -> tuple[float, int]:
            t0, n, forwards = time.perf_counter(), 0, 0
            for batch in DALIEvalLoader(split, n_crops=k, input_size=s, batch_size=args.batch, device="cpu",
                                        dedup=dedup):
                x, _, inverse, b, _ = unpack_eval_batch(batch, s)
                forward_probs(models, normalize(x).contiguous(memory_format=fmt), inverse, b, k, dev, fmt)
                n, forwards = n + b, forwards + x.shape[0]
            return n * k / (time.perf_counter() - t0), forwards

        def alone(per_batch: int, crops_per_batch: int) -> float:
            ready = torch.randn(per_batch, 3, s, s).contiguous(memory_format=fmt)
            batches = args.images // args.batch
            t0 = time.perf_counter()
            for _ in range(batches):
                forward_probs(models, ready, None, 1, per_batch, dev, fmt)
            return batches * crops_per_batch / (time.perf_counter() - t0)

        _, distinct = full(True)  # warm-up, and the number of distinct crops
        per_batch_distinct = round(distinct / (args.images / args.batch))
        res = {name: [] for name in ("plain", "alone", "dedup", "alone_dedup")}
        for _ in range(args.rounds):
            res["plain"].append(full(False)[0])
            res["alone"].append(alone(args.batch * k, args.batch * k))
            res["dedup"].append(full(True)[0])
            res["alone_dedup"].append(alone(per_batch_distinct, args.batch * k))
        med = {name: statistics.median(v) for name, v in res.items()}
        print(f"{args.images} images x {k} crops x {args.models} models at {s}px, batch {args.batch}, variant {args.variant}, "
              f"{'500x375 photos' if args.photo else '28x28 grayscale'}, {len(os.sched_getaffinity(0))} CPUs, "
              f"{'channels_last' if args.channels_last else 'NCHW'}, median of {args.rounds} interleaved rounds")
        print(f"  distinct crops per image: {distinct / args.images:.1f} of {k}")
        print(f"  model alone, every crop                {spread(res['alone'])} crops/s")
        print(f"  full path, every crop (DALI + model)   {spread(res['plain'])} crops/s")
        print(f"  model alone, distinct crops            {spread(res['alone_dedup'])} crops/s")
        print(f"  full path, distinct crops (dedup)      {spread(res['dedup'])} crops/s")
        print("  " + ratio_line("every crop, full / model alone", res["plain"], res["alone"], 0.95))
        print("  " + ratio_line("distinct crops, full / model alone", res["dedup"], res["alone_dedup"], 0.95))
        print(f"  dedup speed-up over every crop: x{med['dedup'] / med['plain']:.2f}")
        for name, v in res.items():
            print(f"  rounds {name}: " + ", ".join(f"{x:,.0f}" for x in v))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
