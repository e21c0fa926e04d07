"""One replica's training throughput through the full stack vs a bare PyTorch loop.

Full stack: a Ray Train worker (TorchTrainer, 1 worker of --cpus CPUs) running our training loop
(DALI CPU train pipeline of the `inception` strategy, GoogLeNet with aux heads, SGD, Polyak update,
validation excluded), measured on its second epoch. Bare loop: the same step (model in the same
memory format, loss with aux heads, SGD, Polyak update) on tensors already in memory, in a Ray task
with the same CPUs. The two alternate for --rounds rounds; prints each one's images/s (median and
range) and the median of the per-round ratios. Target: >= 0.9 (the pipeline costs <= 10%).

    python benchmarks/train_throughput.py [--shards .run/shards/fashion-mnist] [--input-size 32] [--steps 40] [--rounds 3]
"""

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401
from benchmarks.rounds import interleaved, ratio_line, spread  # noqa: E402


def make_step(variant: str, num_classes: int, size: int, batch: int, threads: int):
    """The training step on tensors already in memory, as our loop runs it (model in channels_last, loss
    with the aux heads, SGD, Polyak update), with `threads` torch threads: a callable."""
    import torch

    torch.set_num_threads(threads)  # what a Ray Train worker of `threads` CPUs runs with
    from pipeline.model.googlenet import GoogLeNet, googlenet_loss
    from pipeline.train.schedule import PolyakAverage

    torch.manual_seed(0)
    fmt = torch.channels_last  # (the training loop's default, model.channels_last)
    model = GoogLeNet(num_classes, variant=variant).train().to(memory_format=fmt)
    ema = PolyakAverage(model, 0.995)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        googlenet_loss(model(x), y).backward()
        opt.step()
        ema.update(model)

    return step


def bare_loop(variant: str, num_classes: int, size: int, batch: int, steps: int, threads: int) -> tuple[float, int]:
    import torch

    step = make_step(variant, num_classes, size, batch, threads)
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0), torch.get_num_threads()


def synthetic_split(root: Path, n: int = 3000) -> Path:
    import numpy as np

    from benchmarks.synthetic import gray_jpeg
    from pipeline.shards.format import ShardSample
    from pipeline.shards.splits import write_split

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 256)):
        write_split(root / split, (ShardSample(f"k{i:06d}", i % 10, gray_jpeg(rng), {"width": 28, "height": 28})
                                   for i in range(count)), [str(i) for i in range(10)], per_shard=1000)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=".run/shards/fashion-mnist",
                   help="shard folder with train/ and val/ (default: the demo's; synthetic 28x28 if missing)")
    p.add_argument("--input-size", type=int, default=32, help="default: 32 (the demo recipe's)")
    p.add_argument("--batch", type=int, default=64, help="default: 64")
    p.add_argument("--steps", type=int, default=40, help="steps per measured epoch (default: 40)")
    p.add_argument("--cpus", type=int, default=1, help="CPUs of the one worker (default: 1, a demo replica's)")
    p.add_argument("--variant", default="bn", choices=["bn", "paper"], help="default: bn")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    args = p.parse_args()

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.config import load_recipe
    from pipeline.train.loop import train_replica

    tmp = Path(tempfile.mkdtemp(prefix="trainbench-"))
    try:
        shards = Path(args.shards)
        if not (shards / "train" / "manifest.json").is_file():
            print(f"{shards} has no shards: using 3,000 synthetic 28x28 JPEGs")
            shards = synthetic_split(tmp / "synthetic")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        cfg = load_recipe("demo", [f"data.shards={shards.resolve()}", f"data.input_size={args.input_size}",
                                   f"data.batch_size={args.batch}", f"data.limit_train={args.steps * args.batch}",
                                   "data.limit_val=64", "schedule.epochs=2", f"model.variant={args.variant}",
                                   f"data.num_threads={args.cpus}"])
        threads = []

        def bare() -> float:
            rate, n = ray.get(ray.remote(num_cpus=args.cpus, max_calls=1)(bare_loop).remote(
                args.variant, 10, args.input_size, args.batch, args.steps, args.cpus))
            threads.append(n)
            return rate

        def full() -> float:
            run = f"bench-{len(threads)}-{time.monotonic_ns()}"
            trainer = TorchTrainer(
                train_replica,
                train_loop_config={"train": asdict(cfg), "replica": 0, "strategy": "inception", "seed": 0, "log_every": 0},
                scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.cpus}),
                run_config=ray.train.RunConfig(name=run, storage_path=str(tmp / "ray")))
            return trainer.fit().metrics["data/images_per_s"]  # (the second epoch's)

        res = interleaved({"bare": bare, "full": full}, args.rounds)
        print(f"one replica, {args.cpus} CPUs, batch {args.batch}, input {args.input_size}, variant {args.variant}, "
              f"torch threads {threads[0]}, {args.rounds} interleaved rounds (median [range])")
        print(f"  bare loop (in-memory tensors)             {spread(res['bare'])} img/s")
        print(f"  full stack (Ray Train + DALI CPU + loop)  {spread(res['full'])} img/s")
        print("  " + ratio_line("full stack / bare loop", res["full"], res["bare"], 0.9))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
