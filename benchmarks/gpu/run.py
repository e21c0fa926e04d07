"""The GPU checks in one command, on your GPU machine: DALI's GPU pipelines, the model, the training
loop and the evaluation path, measured and compared with what the CPU computes; with --smoke, the same
code at tiny sizes on the CPU (a quick rehearsal anywhere).

    python benchmarks/gpu/run.py --out gpu-results                      # online: after `pip install -e .`
    python benchmarks/gpu/run.py --install gpu-kit --out gpu-results    # offline: with the GPU kit
    python benchmarks/gpu/run.py --smoke --out /tmp/gpu-smoke           # any machine, CPU only

--install takes the folder `make gpu-kit` (prepare.py) built: it reassembles the parts, checks every
sha256 and installs the wheels with `pip --target .gpu-site` (offline; skipped when that kit is
installed already). Synthetic ImageNet-shaped data (photo-like JPEGs of 500x375, 375x500 and 400x400)
is written with the project's own shard writer, so no dataset is needed. Each check runs in its own
process under a time limit (--limit-scale stretches them on a slower GPU) and writes its figures;
results.json and results.md in --out hold them all, with the machine, driver, torch and DALI versions
and the date. A check that fails or times out is reported, not hidden; the exit status is 0 when every
check passed, 1 otherwise.

Checks: dali_train (7 strategies on the GPU, the nvJPEG decode-only ceiling, the CPU pipeline),
dali_eval (144 crops, GPU vs CPU pixels and crops/s), model (bn / paper / torchvision, bf16 +
channels_last, batch 128 and 256, eager and torch.compile, peak memory), train_loop (train_replica
in-process vs the model alone on resident tensors), eval_path (7 models x 144 crops vs the model alone).
"""

import argparse
import hashlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("GPU_SITE", REPO / ".gpu-site"))  # where --install puts the wheels (git-ignored)
CHECKS = {"dali_train": 100, "dali_eval": 45, "model": 150, "train_loop": 90, "eval_path": 75}  # seconds


# ----------------------------------------------------------------------------------------- install

def install(carry: Path) -> str:
    """Reassemble and verify the parts, install the wheels into .gpu-site; returns what was done."""
    manifest = json.loads((carry / "manifest.json").read_text())
    missing = [p["name"] for p in manifest["parts"] if not (carry / p["name"]).is_file()]
    if missing:
        raise SystemExit(f"install: parts missing under {carry}: {', '.join(missing)} (copy the whole kit folder)")
    marker = SITE / ".bundle_sha256"
    if marker.is_file() and marker.read_text().strip() == manifest["bundle_sha256"]:
        return f"already installed ({manifest['bundle_sha256'][:16]})"
    h = hashlib.sha256()
    work = Path(tempfile.mkdtemp(prefix="gpu-install-"))
    bundle = work / "wheels.tar"
    with open(bundle, "wb") as out:
        for p in manifest["parts"]:
            data = (carry / p["name"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise SystemExit(f"install: {p['name']} is damaged (sha256 differs from the manifest)")
            h.update(data)
            out.write(data)
    if h.hexdigest() != manifest["bundle_sha256"]:
        raise SystemExit("install: the reassembled bundle's sha256 differs from the manifest")
    with tarfile.open(bundle) as tar:
        tar.extractall(work / "wheels", filter="data")
    for w in manifest["wheels"]:
        if hashlib.sha256((work / "wheels" / w["name"]).read_bytes()).hexdigest() != w["sha256"]:
            raise SystemExit(f"install: wheel {w['name']} differs from the manifest")
    shutil.rmtree(SITE, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(SITE), *sorted(str(p) for p in (work / "wheels").glob("*.whl"))], check=True)
    marker.write_text(manifest["bundle_sha256"] + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return f"installed {len(manifest['wheels'])} wheels ({manifest['bundle_bytes'] / 2**20:,.0f} MiB)"


# ------------------------------------------------------------------------------------------ helpers

def machine() -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()), "python": sys.version.split()[0],
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpus": len(os.sched_getaffinity(0))}
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError as e:
        info["dali"] = f"not importable: {e}"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["gpu"] = q.stdout.strip() or q.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["gpu"] = f"nvidia-smi: {e}"
    return info


def make_data(root: Path, n: int, smoke: bool) -> Path:
    """ImageNet-shaped photo JPEGs written with the project's shard writer (train split)."""
    import numpy as np

    from benchmarks.synthetic import photo_jpeg
    from pipeline.shards.format import ShardSample
    from pipeline.shards.splits import write_split

    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (400, 400)]

    def sample(i):
        w, h = sizes[i % 3]
        jpg = photo_jpeg(i, rng)
        if (w, h) != (500, 375):
            import io

            from PIL import Image

            with Image.open(io.BytesIO(jpg)) as im:
                buf = io.BytesIO()
                im.resize((w, h)).save(buf, format="JPEG", quality=90)
                jpg = buf.getvalue()
        return ShardSample(f"k{i:06d}", i % 10, jpg, {"width": w, "height": h})

    for split in ("train", "val"):
        write_split(root / split, (sample(i) for i in range(n)), [str(i) for i in range(10)],
                    per_shard=max(8, n // 8), prefix=split)
    return root


def timed(fn, rounds: int, sync) -> list[float]:
    out = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def median_rate(n: int, seconds: list[float]) -> float:
    return n / statistics.median(seconds)


def train_step(model, loss_fn, batch: int, size: int, classes: int, device, compiled: bool = False):
    """One SGD step (bf16 autocast on CUDA, channels_last) on resident random tensors, as a closure."""
    import torch

    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(step_model(x), y)
        loss.backward()
        opt.step()

    return step


# ------------------------------------------------------------------------------------------- checks

def check_dali_train(data: Path, smoke: bool, dev: str) -> dict:
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
    from pipeline.data.sampling import get_strategy, list_strategies
    from pipeline.shards.splits import open_split

    split = open_split(data / "train")
    size, batch = (64, 8) if smoke else (224, 128)
    threads = 2 if smoke else 16
    res = {"input_size": size, "batch": batch, "images": split.num_samples, "strategies": {}}

    def rate(loader) -> float:
        n, t, on_gpu = 0, time.perf_counter(), False
        for images, labels in loader:
            n, on_gpu = n + len(labels), images.is_cuda
        if on_gpu:
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    for name in list_strategies():
        ld = DALITrainLoader(split, TrainPipelineConfig(get_strategy(name, size), batch_size=batch, device=dev,
                                                        num_threads=threads))
        rate(ld)  # first pass: warm-up
        res["strategies"][name] = rate(ld)

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if dev == "gpu" else None, seed=0)
    def decode_only():
        jpegs, _ = fn.readers.webdataset(paths=[str(p) for p in split.tars], index_paths=[str(p) for p in split.index_files],
                                         ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32], name="Reader")
        return fn.decoders.image(jpegs, device="mixed" if dev == "gpu" else "cpu", output_type=types.RGB)

    p = decode_only()
    p.build()
    steps = split.num_samples // batch
    for _ in range(steps):
        p.run()
    t = time.perf_counter()
    for _ in range(steps):
        p.run()
    res["decode_only_img_s"] = steps * batch / (time.perf_counter() - t)
    ld = DALITrainLoader(split, TrainPipelineConfig(get_strategy("inception", size), batch_size=batch, device="cpu",
                                                    num_threads=threads))
    rate(ld)
    res["cpu_pipeline_inception_img_s"] = rate(ld)
    res["ratio_to_decode_only"] = {k: v / res["decode_only_img_s"] for k, v in res["strategies"].items()}
    return res


def check_dali_eval(data: Path, smoke: bool, dev: str) -> dict:
    import torch

    from pipeline.data.dali_eval import DALIEvalLoader

    size = 64 if smoke else 224
    n = 6 if smoke else 48
    out = {"input_size": size, "images": n}
    got = {}
    for d in ("cpu", dev):
        ld = DALIEvalLoader(data / "val", n_crops=144, input_size=size, batch_size=3 if smoke else 8, device=d, limit=n)
        t = time.perf_counter()
        xs = [x.cpu() for x, _ in ld]
        if d == "gpu":
            torch.cuda.synchronize()
        out[f"{d}_crops_s"] = n * 144 / (time.perf_counter() - t)
        got[d] = torch.cat(xs)
    diff = (got["cpu"].int() - got[dev].int()).abs().float()
    out |= {"mean_abs_diff": float(diff.mean()), "p99_abs_diff": float(torch.quantile(diff.flatten()[:1_000_000], 0.99)),
            "max_abs_diff": float(diff.max()), "tolerance": "mean <= 0.5, p99 <= 3, max <= 12 grey levels "
            "(nvJPEG vs libjpeg-turbo decoding and GPU vs CPU resampling)"}
    out["within_tolerance"] = out["mean_abs_diff"] <= 0.5 and out["p99_abs_diff"] <= 3 and out["max_abs_diff"] <= 12
    return out


def check_model(data: Path, smoke: bool, dev: str) -> dict:
    import torch
    import torchvision

    from pipeline.model.googlenet import GoogLeNet, googlenet_loss

    device = torch.device("cuda" if dev == "gpu" else "cpu")
    size, batches = (32, [8]) if smoke else (224, [128, 256])
    compile_modes = [False] if smoke else [False, True]
    ce = torch.nn.functional.cross_entropy

    def tv_loss(o, y):
        return ce(o.logits, y) + 0.3 * (ce(o.aux_logits1, y) + ce(o.aux_logits2, y))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    res = {"input_size": size, "amp": "bf16" if device.type == "cuda" else "off", "channels_last": True, "runs": []}
    makers = {"torchvision": (lambda: torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True),
                              tv_loss),
              "bn": (lambda: GoogLeNet(1000, variant="bn"), googlenet_loss),
              "paper": (lambda: GoogLeNet(1000, variant="paper"), googlenet_loss)}
    for compiled in compile_modes:
        for batch in batches:
            for name, (make, loss_fn) in makers.items():
                torch.manual_seed(0)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                step = train_step(make().to(device, memory_format=torch.channels_last).train(), loss_fn, batch, size,
                                  1000, device, compiled)
                for _ in range(3):
                    step()
                secs = timed(lambda: [step() for _ in range(5)], 3, sync)  # noqa: B023 (called in this iteration)
                run = {"model": name, "batch": batch, "compile": compiled, "img_s": median_rate(5 * batch, secs)}
                if device.type == "cuda":
                    run["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                res["runs"].append(run)
    return res


def check_train_loop(data: Path, smoke: bool, dev: str) -> dict:
    import torch

    from pipeline.config import load_recipe
    from pipeline.model.googlenet import GoogLeNet, googlenet_loss
    from pipeline.train.loop import train_replica

    size, batch, steps = (32, 8, 6) if smoke else (224, 128, 60)
    gpus = 0 if dev == "cpu" else 1
    cfg = load_recipe("demo", [f"data.shards={data}", f"data.input_size={size}", f"data.batch_size={batch}",
                               f"data.limit_train={batch * steps}", f"data.limit_val={batch}", "schedule.epochs=2",
                               f"ensemble.gpus_per_worker={gpus}", f"data.device={dev}", "model.variant=bn"])
    device = torch.device("cuda" if gpus else "cpu")
    step = train_step(GoogLeNet(10, variant="bn").to(device, memory_format=torch.channels_last).train(),
                      googlenet_loss, batch, size, 10, device)
    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    secs = timed(lambda: [step() for _ in range(steps // 3 or 1)], 3, sync)
    alone = median_rate((steps // 3 or 1) * batch, secs)
    # the model alone is measured first: a finished loop's DALI threads must not weigh on it
    import warnings

    # host syncs per training step (torch's sync debug mode warns on each one; the loop should
    # make none per step: sums stay on the device, Polyak is a foreach, no .item())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            out = train_replica({"train": cfg.to_dict(), "replica": 0, "strategy": "inception", "seed": 0,
                                 "log_every": 0, "local_dir": tempfile.mkdtemp(prefix="gpu-ckpt-")})
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]
    loop_img_s = out["history"][-1]["data/images_per_s"]  # epoch 2: warm (the sync debug mode costs a little)
    return {"input_size": size, "batch": batch, "steps_per_epoch": steps, "loop_img_s": loop_img_s,
            "model_alone_img_s": alone, "ratio": loop_img_s / alone, "target": 0.9,
            "host_syncs": len(syncs), "host_syncs_per_step": len(syncs) / (2 * steps),
            "host_sync_sites": sorted(set(syncs))[:10], "note": "host syncs counted over 2 epochs incl. validation"}


def check_eval_path(data: Path, smoke: bool, dev: str) -> dict:
    import torch

    from pipeline.data.dali import Normalizer
    from pipeline.data.dali_eval import DALIEvalLoader
    from pipeline.evaluate.run import forward_probs, unpack_eval_batch
    from pipeline.model.googlenet import GoogLeNet

    size, n, batch, n_models = (32, 6, 3, 2) if smoke else (224, 48, 8, 7)
    device = torch.device("cuda" if dev == "gpu" else "cpu")
    fmt = torch.channels_last
    models = [GoogLeNet(10, variant="bn", aux_logits=False).to(device, memory_format=fmt).eval() for _ in range(n_models)]
    norm = Normalizer(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    on_device = []

    def full():
        for batch_ in DALIEvalLoader(data / "val", n_crops=144, input_size=size, batch_size=batch, device=dev,
                                     limit=n, dedup=True):
            on_device.append(batch_[0].device.type)  # crops stay on the GPU (no host round trip)
            x, y, inverse, b, k = unpack_eval_batch(batch_, size)
            forward_probs(models, norm(x).contiguous(memory_format=fmt), inverse, b, k, device, fmt)

    ready = torch.randn(batch * 144, 3, size, size, device=device).contiguous(memory_format=fmt)
    forward_probs(models, ready, None, batch, 144, device, fmt)  # warm-up; the model alone first (see train_loop)
    alone = timed(lambda: [forward_probs(models, ready, None, batch, 144, device, fmt) for _ in range(n // batch)], 2, sync)
    full()
    secs = timed(full, 2, sync)
    crops = n * 144 * n_models
    return {"input_size": size, "images": n, "models": n_models, "full_crops_s": median_rate(crops, secs),
            "model_alone_crops_s": median_rate((n // batch) * batch * 144 * n_models, alone),
            "ratio": median_rate(crops, secs) / median_rate((n // batch) * batch * 144 * n_models, alone),
            "target": 0.9, "note": "photo-sized images have 144 distinct crops: dedup saves nothing here",
            "eval_batches_on": sorted(set(on_device))}


# -------------------------------------------------------------------------------------------- main

def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# GPU proof ({'SMOKE on CPU' if results['smoke'] else m.get('gpu', '?')})", "",
             f"{m['date']}; torch {m['torch']} (CUDA {m['cuda']}), DALI {m['dali']}, Python {m['python']}, "
             f"{m['cpus']} CPUs", ""]
    for name, r in results["checks"].items():
        lines.append(f"## {name}: {r['status']} ({r.get('seconds', 0):.0f} s)")
        lines.append("")
        lines.append("```")
        lines.append(json.dumps(r.get("result", r.get("error")), indent=1)[:4000])
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--install", default=None, help="first install the GPU kit in this folder (make gpu-kit), offline")
    p.add_argument("--limit-scale", type=float, default=1.0,
                   help="multiply every check's time limit (default: 1, sized for a current data-center GPU)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: try everything here first")
    p.add_argument("--only", default=None, help="comma-separated checks (default: all: " + ",".join(CHECKS) + ")")
    p.add_argument("--check", default=None, help=argparse.SUPPRESS)  # internal: run one check in this process
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(SITE), str(REPO)] if SITE.is_dir() else [str(REPO)]
    dev = "cpu" if args.smoke else "gpu"
    if args.check:  # child process: one check, its figures as JSON on the last line of stdout
        result = globals()[f"check_{args.check}"](Path(args.data), args.smoke, dev)
        print("RESULT " + json.dumps(result))
        return 0
    names = [n for n in args.only.split(",") if n] if args.only is not None else list(CHECKS)
    unknown = set(names) - set(CHECKS)
    if unknown:
        raise SystemExit(f"--only: unknown check(s) {sorted(unknown)}; valid: {', '.join(CHECKS)}")
    installed = install(Path(args.install)) if args.install else "not asked"
    print(f"install: {installed}", flush=True)
    if SITE.is_dir() and str(SITE) not in sys.path:  # installed just now: this process imports from it too
        sys.path.insert(0, str(SITE))
        importlib.invalidate_caches()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO)] if SITE.is_dir() else [str(REPO)]),
           "PYTHONUNBUFFERED": "1"}
    results = {"smoke": args.smoke, "install": installed, "machine": machine(), "checks": {}}
    print(json.dumps(results["machine"]), flush=True)
    if not names:
        return 0  # --only "": install (and report the machine) only
    data = make_data(Path(tempfile.mkdtemp(prefix="gpu-data-")), 24 if args.smoke else 1536, args.smoke)
    for name in names:
        limit = CHECKS[name] * (4 if args.smoke else 1) * args.limit_scale
        t = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--check", name, "--data", str(data)]
        cmd += ["--smoke"] if args.smoke else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=REPO)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and lines:
                r = {"status": "ok", "result": json.loads(lines[-1][7:])}
            else:
                r = {"status": f"failed (exit {proc.returncode})", "error": (proc.stderr or proc.stdout)[-3000:]}
        except subprocess.TimeoutExpired:
            r = {"status": f"timed out after {limit} s", "error": "time limit"}
        r["seconds"] = time.perf_counter() - t
        results["checks"][name] = r
        print(f"{name}: {r['status']} in {r['seconds']:.0f}s", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")  # after every check
    (out / "results.md").write_text(markdown(results))
    print(markdown(results)[-6000:])
    return 0 if all(r["status"] == "ok" for r in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
