"""Where the DALI CPU training pipeline's time goes: the `inception` graph cut after each stage.

Writes N synthetic ImageNet-sized JPEGs (about 500x375) into shards, then measures, in interleaved
rounds and the same process, pipelines that stop after each stage of the area-sampling graph: full
decode (the decode-only ceiling of `data_loading.py`), random-crop decode, + antialiased linear resize
to the output size, the same resize without antialiasing and with nearest neighbour (what the filter
costs), + mirror and normalisation to float CHW (the whole pipeline), and the whole pipeline through
the torch iterator; and the loader as training runs it, where torch resizes the crops and normalises
them after the iterator (`pipeline.data.dali_train.resize_on_host`). Also times torch's antialiased
bilinear resize of uint8 images on one thread, the same work as DALI's resize stage, on crops of the
sizes that stage sees. Prints images/s (median
and range) and the cost of each stage in milliseconds per image per thread.

    python benchmarks/dali_stages.py [--images 1000] [--threads 2] [--size 224] [--rounds 3]
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

from benchmarks.rounds import interleaved, spread  # noqa: E402
from benchmarks.synthetic import photo_jpeg  # noqa: E402
from pipeline.shards.format import ShardSample  # noqa: E402
from pipeline.shards.splits import write_split  # noqa: E402

STAGES = {
    "decode": "full decode (the ceiling)",
    "crop": "random-crop decode",
    "resize": "+ resize, linear, antialiased",
    "resize_plain": "  resize, linear, no antialiasing",
    "resize_nn": "  resize, nearest neighbour",
    "whole": "+ mirror, normalise to float CHW",
    "iterator": "  the whole, through the torch iterator",
    "loader": "the loader as training runs it (torch resizes)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="synthetic JPEGs in the shards (default: 1000)")
    p.add_argument("--measure", type=int, default=1500, help="images per measurement (default: 1500)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="DALI threads (default: this process's CPUs)")
    p.add_argument("--size", type=int, default=224, help="output size (default: 224)")
    p.add_argument("--batch", type=int, default=64, help="default: 64")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    args = p.parse_args()

    import torch
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from pipeline.data.dali import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
    from pipeline.data.sampling import get_strategy

    s = get_strategy("inception", args.size)
    torch.set_num_threads(1)  # torch's part (the loader's resize) on one thread beside DALI's, as data_loading.py
    work = Path(tempfile.mkdtemp(prefix="dalistages-"))
    try:
        rng = np.random.default_rng(0)
        split = write_split(work / "train", (ShardSample(f"k{i:06d}", i % 1000, photo_jpeg(i, rng),
                                                         {"width": 500, "height": 375}) for i in range(args.images)),
                            [str(i) for i in range(1000)], per_shard=250)

        def build(stage: str):
            @pipeline_def(batch_size=args.batch, num_threads=args.threads, device_id=None, seed=1)
            def pipe():
                jpg, lbl = fn.readers.webdataset(
                    paths=[str(t) for t in split.tars], index_paths=[str(i) for i in split.index_files],
                    ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32], name="Reader", random_shuffle=True,
                    initial_fill=4096)
                if stage == "decode":
                    return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl
                im = fn.decoders.image_random_crop(jpg, device="cpu", output_type=types.RGB, random_area=list(s.area),
                                                   random_aspect_ratio=list(s.aspect), num_attempts=10)
                if stage == "crop":
                    return im, lbl
                interp = types.INTERP_NN if stage == "resize_nn" else types.INTERP_LINEAR
                im = fn.resize(im, size=[s.input_size] * 2, interp_type=interp, antialias=stage != "resize_plain")
                if stage.startswith("resize"):
                    return im, lbl
                im = fn.crop_mirror_normalize(im, dtype=types.FLOAT, output_layout="CHW", mean=list(IMAGENET_MEAN),
                                              std=list(IMAGENET_STD), mirror=fn.random.coin_flip(probability=0.5))
                return im, lbl

            pp = pipe()
            pp.build()
            return pp

        def rate(stage: str):
            if stage == "loader":
                ld = DALITrainLoader(split, TrainPipelineConfig(s, batch_size=args.batch, device="cpu",
                                                                num_threads=args.threads))
                batches = iter(())

                def step():
                    nonlocal batches
                    try:
                        next(batches)
                    except StopIteration:
                        batches = iter(ld)
                        next(batches)
            else:
                pp = build("whole" if stage == "iterator" else stage)
            if stage == "iterator":
                it = DALIGenericIterator([pp], ["images", "labels"], reader_name="Reader", auto_reset=True)

                def step():
                    try:
                        next(it)
                    except StopIteration:
                        next(it)
            elif stage != "loader":
                step = pp.run

            def run() -> float:
                step()
                t0, n = time.perf_counter(), 0
                while n < args.measure:
                    step()
                    n += args.batch
                return n / (time.perf_counter() - t0)
            return run

        res = interleaved({k: rate(k) for k in STAGES}, args.rounds)
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"{args.images} JPEGs 500x375, {args.threads} DALI threads, batch {args.batch}, {args.size} px")
        print(f"{'':<42}{'images/s, median [range]':>28}{'ms/image/thread':>17}")
        for k, name in STAGES.items():  # (the loader also runs torch on the main thread: one thread more)
            threads = args.threads + (k == "loader")
            print(f"{name:<42}{spread(res[k]):>28}{threads * 1e3 / med[k]:>17.2f}")
        step = {"random-crop decode vs full decode": ("crop", "decode"), "linear antialiased resize": ("resize", "crop"),
                "  of which the filter (vs nearest)": ("resize", "resize_nn"),
                "mirror + normalise": ("whole", "resize")}
        for name, (a, b) in step.items():
            print(f"  stage {name:<38} {args.threads * 1e3 * (1 / med[a] - 1 / med[b]):+.2f} ms/image/thread")
        print(f"  whole (DALI resizes) / full decode: {med['whole'] / med['decode']:.2f}; "
              f"the loader (torch resizes) / full decode: {med['loader'] / med['decode']:.2f}")

        # torch's uint8 antialiased bilinear resize on one thread, on crops of the sizes DALI resizes
        crops = []
        for _ in range(200):
            area = rng.uniform(*s.area) * 500 * 375
            aspect = np.exp(rng.uniform(np.log(s.aspect[0]), np.log(s.aspect[1])))
            w, h = min(500, round((area * aspect) ** 0.5)), min(375, round((area / aspect) ** 0.5))
            crops.append(torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)[None])
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for c in crops:
                torch.nn.functional.interpolate(c, size=(s.input_size, s.input_size), mode="bilinear", antialias=True)
            times.append((time.perf_counter() - t0) / len(crops) * 1e3)
        print(f"  torch uint8 antialiased bilinear resize, 1 thread: {statistics.median(times):.2f} ms/image "
              f"[{min(times):.2f}-{max(times):.2f}]")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
