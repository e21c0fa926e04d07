"""Memory of one prediction of the googlenet-ensemble pyfunc, per input size and crop count.

For each model size (`demo`: 32 px, BN variant, 10 classes; `paper`: 224 px, paper variant, 1000 classes)
one process loads the pyfunc (`EnsembleModel`, random weights: the same tensors as trained ones) and
answers a warm-up request. Then, in interleaved rounds (crops 1, 10, 144; 1 and `--images` images a
request), it resets the kernel's peak-RSS mark (`/proc/self/clear_refs`), sends one request of 500x375
JPEGs (a typical ImageNet photo) and reads the peak (`VmHWM`): the request's memory is the peak over the
RSS before it. Prints the medians over rounds (and their range) of that figure for 1 image, for
`--images` images, the growth per extra image, and the weights' memory per replica. The default crop
chunk (`INCEPTION_SERVE_CROP_CHUNK`, 144 crops a forward pass) applies unless set. The models of an
ensemble run one after another, so a request's peak does not grow with the number of replicas (only the
weights do, by the figure printed per replica). Linux only (`/proc`).

    python benchmarks/serving_memory.py [--sizes demo,paper] [--crops 1,10,144] [--images 4] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {"demo": (32, "bn", 10), "paper": (224, "paper", 1000)}
MIB = 2**20


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(size: str, crops: list[int], n_images: int, rounds: int) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from benchmarks.synthetic import photo_jpeg
    from pipeline.model.googlenet import GoogLeNet, without_aux
    from pipeline.serving import EnsembleModel

    input_size, variant, n_classes = SIZES[size]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        state = without_aux(GoogLeNet(n_classes, variant=variant).state_dict())
        torch.save(state, d / "replica-0.pt")
        (d / "meta.json").write_text(json.dumps({
            "classes": [f"c{i}" for i in range(n_classes)], "input_size": input_size, "crops": [1, 10, 144],
            "max_side": None, "replicas": [{"index": 0, "strategy": "inception", "variant": variant,
                                            "file": "replica-0.pt"}]}))
        before_load = status_kib("VmRSS")
        model = EnsembleModel()
        model.load_context(type("Ctx", (), {"artifacts": {"ensemble": str(d)}})())
        weights_mib = sum(t.numel() * t.element_size() for t in state.values()) / MIB
        rng = np.random.default_rng(0)
        images = [photo_jpeg(i, rng) for i in range(n_images)]
        model.predict(None, pd.DataFrame({"image": images[:1]}), {"crops": 1})  # warm-up: DALI, allocator
        loaded = status_kib("VmRSS")
        out = {"weights_mib_per_replica": weights_mib, "rss_loaded_mib": loaded / 1024,
               "load_mib": (loaded - before_load) / 1024, "rounds": []}
        for _ in range(rounds):
            row = {}
            for c in crops:
                for n in (1, n_images):
                    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                    rss = status_kib("VmRSS")
                    model.predict(None, pd.DataFrame({"image": images[:n]}), {"crops": c})
                    row[f"{c}x{n}"] = (status_kib("VmHWM") - rss) / 1024
            out["rounds"].append(row)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="demo,paper", help="model sizes to measure: demo (32 px), paper (224 px)")
    p.add_argument("--crops", default="1,10,144", help="crop counts, comma-separated")
    p.add_argument("--images", type=int, default=4, help="images in the larger request (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default: %(default)s)")
    p.add_argument("--json", help="also write the raw figures to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    crops = [int(c) for c in a.crops.split(",")]
    if a.child:
        print(json.dumps(child(a.child, crops, a.images, a.rounds)))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        print("error: needs Linux /proc (clear_refs, VmHWM)", file=sys.stderr)
        return 2
    results = {}
    for size in a.sizes.split(","):
        if size not in SIZES:
            print(f"error: unknown size {size!r}; choose from {sorted(SIZES)}", file=sys.stderr)
            return 2
        print(f"{size}: {SIZES[size][0]} px, {SIZES[size][1]} variant, {SIZES[size][2]} classes ...", flush=True)
        r = subprocess.run([sys.executable, __file__, "--child", size, "--crops", a.crops, "--images", str(a.images),
                            "--rounds", str(a.rounds)], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        res = results[size] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  weights {res['weights_mib_per_replica']:.0f} MiB per replica; process RSS after load and a "
              f"warm-up request {res['rss_loaded_mib']:.0f} MiB")
        print(f"  {'crops':>5} | {'1 image, MiB':>18} | {f'{a.images} images, MiB':>18} | growth per extra image, MiB")
        for c in crops:
            one = [rd[f"{c}x1"] for rd in res["rounds"]]
            many = [rd[f"{c}x{a.images}"] for rd in res["rounds"]]
            m1, mn = statistics.median(one), statistics.median(many)
            r1, rn = f"{m1:.0f} ({min(one):.0f}-{max(one):.0f})", f"{mn:.0f} ({min(many):.0f}-{max(many):.0f})"
            print(f"  {c:>5} | {r1:>18} | {rn:>18} | {(mn - m1) / max(1, a.images - 1):6.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"(peak RSS of one request over the RSS before it; medians (range) of {a.rounds} interleaved rounds; "
          f"crop chunk {os.environ.get('INCEPTION_SERVE_CROP_CHUNK', '144')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
