"""`prepare()` throughput of the fashion-mnist-scenes source vs the plain fashion-mnist source, one core.

`prepare()` is what a shard task runs per image (the rest of the task, tar writing and hashing, is the
same for both sources). Times the first N images of a split in interleaved rounds (the IDX files already
loaded, as in a shard task) and prints images/s and ms per image (median and range over rounds) and the
scenes/plain ratio. Target: a scene under 1 ms per image, so the job stays bound by its tar and disk
writes, not by drawing.

    python benchmarks/scene_throughput.py [--root /usr/share/datasets/fashion-mnist] [--images 2000]
        [--rounds 5] [--split val] [--canvas 96]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.rounds import interleaved, ratio, spread  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="the four Fashion-MNIST IDX files")
    p.add_argument("--split", default="val", help="split to read (default: val)")
    p.add_argument("--images", type=int, default=2000, help="images per round and source (default: 2000)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--canvas", type=int, default=96, help="scene side in px (default: 96)")
    args = p.parse_args()

    from pipeline.shards.scenes import SceneSettings
    from pipeline.shards.sources import open_source

    plain = open_source("fashion-mnist", args.root)
    scenes = open_source("fashion-mnist-scenes", args.root, scenes=SceneSettings(canvas=args.canvas))
    items = plain.list_split(args.split).items[:args.images]
    scenes.list_split(args.split)  # (loads the IDX files, as the driver does before a shard task gets the source)

    def timed(source):
        def go() -> float:
            t0 = time.perf_counter()
            for it in items:
                source.prepare(it)
            return len(items) / (time.perf_counter() - t0)
        return go

    for source in (plain, scenes):  # warm-up: imports, caches
        for it in items[:50]:
            source.prepare(it)
    res = interleaved({"fashion-mnist": timed(plain), "fashion-mnist-scenes": timed(scenes)}, args.rounds)
    print(f"prepare() of {len(items):,} {args.split} images, {args.rounds} interleaved rounds, one core "
          f"({cpu_model()}; median [range])")
    for name, values in res.items():
        ms = [1e3 / v for v in values]
        print(f"  {name:<22} {spread(values)} img/s   {statistics.median(ms):.3f} ms/image "
              f"[{min(ms):.3f}-{max(ms):.3f}]")
    med, lo, hi = ratio(res["fashion-mnist-scenes"], res["fashion-mnist"])
    size = sum(len(scenes.prepare(it).jpg) for it in items[:200]) / min(200, len(items))
    print(f"  scenes / plain: {med:.2f} [{lo:.2f}-{hi:.2f}]; a {args.canvas}x{args.canvas} scene JPEG is "
          f"{size / 1e3:.1f} KB on average")
    verdict = "meets" if 1e3 / statistics.median(res["fashion-mnist-scenes"]) < 1 else "MISSES"
    print(f"  scenes: {verdict} the target of < 1 ms per image")


if __name__ == "__main__":
    main()
