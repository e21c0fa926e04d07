"""Evaluation throughput: the full path (DALI multi-crop + model) vs the model alone on ready tensors.

Writes a split of synthetic JPEGs (28x28 grayscale like Fashion-MNIST by default, or 500x375 with
--photo), then in one process: (a) DALI eval loader with the crop scheme + normalisation + model
forward + softmax, (b) the same model on pre-made tensors of the same shape. Prints crops/s of both
and the ratio. Target: >= 0.9.

    python benchmarks/eval_throughput.py [--crops 144] [--input-size 32] [--images 64] [--batch 8]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import gray_jpeg, photo_jpeg  # noqa: E402
from pipeline.data.shards import ShardSample, write_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crops", type=int, default=144, choices=[1, 10, 144], help="default: 144")
    p.add_argument("--input-size", type=int, default=32, help="default: 32 (the demo's)")
    p.add_argument("--images", type=int, default=64, help="default: 64")
    p.add_argument("--batch", type=int, default=8, help="images per batch (default: 8)")
    p.add_argument("--photo", action="store_true", help="500x375 photo-like JPEGs instead of 28x28 grayscale")
    p.add_argument("--variant", default="bn", choices=["bn", "paper"], help="default: bn")
    args = p.parse_args()

    import torch

    from pipeline.data.dali import DALIEvalLoader, Normalizer
    from pipeline.model.googlenet import GoogLeNet

    work = Path(tempfile.mkdtemp(prefix="evalbench-"))
    try:
        rng = np.random.default_rng(0)

        make, (w, h) = (lambda i: photo_jpeg(i, rng), (500, 375)) if args.photo else (lambda i: gray_jpeg(rng), (28, 28))
        split = write_split(work / "val", (ShardSample(f"k{i:05d}", i % 10, make(i), {"width": w, "height": h})
                                           for i in range(args.images)), [str(i) for i in range(10)], per_shard=256)
        model = GoogLeNet(10, variant=args.variant, aux_logits=False).eval()
        s, k = args.input_size, args.crops
        normalize = Normalizer()

        def forward(x):
            with torch.inference_mode():
                return model(x).softmax(-1)

        forward(torch.zeros(args.batch * k, 3, s, s))  # warm-up
        t0 = time.perf_counter()
        n = 0
        for x, _ in DALIEvalLoader(split, n_crops=k, input_size=s, batch_size=args.batch, device="cpu"):
            b = x.shape[0]
            forward(normalize(x.reshape(b * k, 3, s, s)))
            n += b * k
        full = n / (time.perf_counter() - t0)
        ready = torch.randn(args.batch * k, 3, s, s)
        t0 = time.perf_counter()
        for _ in range(args.images // args.batch):
            forward(ready)
        alone = (args.images // args.batch) * args.batch * k / (time.perf_counter() - t0)
        print(f"{args.images} images x {k} crops at {s}px, batch {args.batch}, variant {args.variant}, "
              f"{'500x375 photos' if args.photo else '28x28 grayscale'}, {len(os.sched_getaffinity(0))} CPUs")
        print(f"  model alone on ready tensors        {alone:>9,.0f} crops/s")
        print(f"  full path (DALI crops + model)      {full:>9,.0f} crops/s")
        print(f"  ratio {full / alone:.2f} (target >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
