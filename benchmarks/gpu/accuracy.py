"""Fashion-MNIST accuracy on one GPU, without Ray or MLflow: the seven replicas of a recipe sharded,
trained and evaluated (Table 3) with the project's own code, fitted to a time budget you choose; with
--smoke, the same code at tiny sizes on the CPU.

    python benchmarks/gpu/accuracy.py --root /usr/share/datasets/fashion-mnist --budget-s 1800 --out acc-results
    python benchmarks/gpu/accuracy.py --smoke --out /tmp/accuracy-smoke                  # any machine, CPU only

Stages (each timed; results.json is rewritten after each):
1. shard: the four Fashion-MNIST .gz files -> WebDataset shards, in-process, with the shard job's own
   functions (plan_splits, prepare_output, write_shard in a process pool, build_manifest, manifest last).
2. (budget mode) the evaluation's cost, measured with untrained models: a warm-up pass, then two timed
   passes of different sizes (start-up + per-image cost, `budget.eval_estimate`).
3. train (replicas.py): `pipeline.train.loop.train_replica` in one process per replica, --concurrent at
   a time on the one GPU, with the dict the ensemble driver builds (its strategy, data seed and init
   seed helpers). The first wave trains the calibration epoch(s) (the warm-up, whose learning rates do not depend on
   the run's length); their measured times set the number of epochs (`budget.fit_epochs`), and the same
   processes go on from their checkpoints, which hold the data position: the resumed run sees what one
   uninterrupted run of that length would have (the smoke run's losses match a fixed-epochs run's). A
   hard deadline (budget - evaluation estimate - reserve) stops training in time to evaluate: a stopped
   replica keeps its last finished epoch, and the output says so.
4. evaluate: the replicas' Polyak weights with 1, 10 and 144 crops on every test image through the
   evaluation job's `evaluate_rank` (Table 3 accumulator, Wilson intervals, paired McNemar tests), in 4
   parts merged as the job merges ranks; a part that would end past the budget is not started (the
   table then says how many images it covers).
5. write under --out: results.json, report.md, table3.csv, comparisons.csv, singles.csv, curves.csv,
   timings.csv, recipe_used.yaml, logs/replica-<i>.log (and table3.png where matplotlib is installed).

On a GPU machine without internet access: install the GPU kit first (`python benchmarks/gpu/run.py
--install gpu-kit --only '' --out gpu-results`, see prepare.py) and copy the four Fashion-MNIST .gz
files to it; the runner puts .gpu-site (the kit's install) on its path and its children's.
"""

import time

T0 = time.monotonic()  # the budget's clock starts with this process

import argparse  # noqa: E402  (after the clock)
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu.budget import BudgetError, calibration_epochs, eval_estimate  # noqa: E402
from benchmarks.gpu.replicas import collect, train  # noqa: E402
from benchmarks.gpu.run import SITE, install, machine  # noqa: E402

if SITE.is_dir() and str(SITE) not in sys.path:  # run.py --install's wheels (DALI, pyyaml) before anything imports them
    sys.path.insert(0, str(SITE))

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
# Tiny sizes for --smoke (CPU): 32 px is the smallest input GoogLeNet takes; 4 steps of 16 per epoch.
SMOKE_SETS = ["data.input_size=32", "data.batch_size=16", "data.limit_train=64", "data.limit_val=32",
              "data.device=cpu", "ensemble.gpus_per_worker=0"]
SMOKE_LIMIT = 128  # images per split
SMOKE_EVAL_LIMIT = 32  # test images through 7 models x 144 crops: about 20 s on 2 idle cores
EVAL_CHUNKS = 4  # the evaluation in 4 parts: a part that would end past the budget is not started
EVAL_END_RESERVE_S = 5  # seconds kept after the evaluation for writing the outputs
REFERENCE = {"published_top1_acc": 0.937, "what": "published GoogLeNet test accuracy on Fashion-MNIST "
             "(the GoogleNet row of the benchmark table in zalandoresearch/fashion-mnist's README)"}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f}s] {msg}", flush=True)


class RunError(Exception):
    """A stage cannot go on; the message says why."""


# ------------------------------------------------------------------------------------------- shard

_SOURCE = None  # the opened source, inherited by the forked shard writers (not pickled per task)


def _write_shard(split_dir: str, dataset: str, split: str, index: int, items, max_side, full_decode, job) -> dict:
    from pipeline.shards.storage.local import write_shard

    return write_shard(_SOURCE, split_dir, dataset, split, index, items, max_side, full_decode, job)


def shard(root: str, out: Path, limit: int | None, workers: int) -> dict:
    """Fashion-MNIST -> out/fashion-mnist/{train,val}: the shard job's steps without Ray (one process
    per shard instead of one Ray task); returns {split: manifest}."""
    global _SOURCE
    from pipeline.config import ShardConfig
    from pipeline.shards.format import dump_json
    from pipeline.shards.plan import build_manifest, plan_splits
    from pipeline.shards.sources import open_source
    from pipeline.shards.storage import local

    cfg = ShardConfig(source="fashion-mnist", root=root, out=str(out), limit=limit).validate()
    _SOURCE = source = open_source(cfg.source, cfg.root)
    plans = plan_splits(cfg, source)
    with local.guard(plans):
        for plan in plans:
            local.prepare_output(plan, cfg)
        todo = [(plan, i, items) for plan in plans for i, items in enumerate(plan.shards)]
        total = sum(len(items) for _, _, items in todo)
        log(f"shard: {total:,} images in {len(todo)} shards, {workers} processes -> {out / cfg.dataset}")
        results: dict[str, list] = {p.split: [] for p in plans}
        t0, done = time.monotonic(), 0
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            futs = {pool.submit(_write_shard, str(p.dir), cfg.dataset, p.split, i, items, cfg.max_side,
                                cfg.full_decode, p.job): p.split for p, i, items in todo}
            for fut in as_completed(futs):
                part = fut.result()
                results[futs[fut]].append(part)
                done += part["inputs"]
                rate = done / max(time.monotonic() - t0, 1e-9)
                log(f"shard: [{futs[fut]}] shard {part['shard']} {part['num_samples']} samples | {done:,}/{total:,} "
                    f"images | {rate:,.0f} img/s | eta {(total - done) / max(rate, 1e-9):,.0f}s")
        manifests = {}
        for plan in plans:
            manifests[plan.split] = build_manifest(plan, results[plan.split], cfg, source)
            local.write_manifest(plan, dump_json(manifests[plan.split]))  # last: split complete
        return manifests


class Terminated(Exception):
    """SIGTERM (e.g. `timeout` or a scheduler's time limit): stop the replicas, save what was done."""


def _on_sigterm(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


# --------------------------------------------------------------------------------------- evaluate

def evaluate(replicas: list, val_dir: Path, device: str, batch: int, n: int, channels_last: bool,
             ranking: list[int], chunks: int = 1, deadline: float | None = None) -> dict:
    """Table 3 for 1 and all models x 1/10/144 crops on test images [0, n), through the evaluation job's
    rank function (`ranking`: positions in `replicas`, the 1-model row's first), in `chunks` consecutive
    parts merged as the job merges its ranks. With a `deadline`, a part that the measured pace says would
    end after it is not started: the table then covers fewer images, and `stopped` says so."""
    from pipeline.evaluate.run import evaluate_rank

    counts, size = sorted({1, len(replicas)}), math.ceil(n / chunks)
    total, done, t0, stopped = None, 0, time.monotonic(), None
    for start in range(0, n, size):
        m = min(size, n - start)
        if deadline is not None and done and time.monotonic() + (time.monotonic() - t0) / done * m > deadline:
            stopped = f"stopped at the budget after {done:,} of {n:,} images"
            log(f"evaluate: {stopped}")
            break
        r = evaluate_rank(replicas=replicas, split_dir=str(val_dir), rank=0, world=1, largest=144,
                          schemes=[1, 10, 144], model_counts=counts, batch_size=batch, device=device, limit=m,
                          ranking=ranking, offset=start, dedup=True, channels_last=channels_last)
        if total is None:
            total = r
        else:
            total["acc"].merge(r["acc"])
            for k in ("seconds", "model_seconds", "crops", "forwards", "skipped", "keys"):
                total[k] += r[k]
        done += m
        if chunks > 1:
            rate = done / (time.monotonic() - t0)
            log(f"evaluate: {done:,}/{n:,} images | {rate:,.1f} img/s | eta {(n - done) / rate:,.0f}s")
    return total | {"stopped": stopped, "images_asked": n, "wall_s": time.monotonic() - t0}


def measure_eval(cfg, val_dir: Path, device: str, batch: int, n_total: int, num_classes: int) -> dict:
    """The evaluation's cost, from untrained models: a warm-up pass (first-call costs: DALI plugins,
    CUDA kernels), then two timed passes of `batch` and 3 x `batch` images."""
    import torch

    from pipeline.evaluate.run import Replica
    from pipeline.model.googlenet import GoogLeNet

    torch.manual_seed(0)
    sd = GoogLeNet(num_classes, variant=cfg.model.variant, aux_logits=False).state_dict()
    reps = [Replica(i, "untrained", "calibration", cfg.model.variant, cfg.data.input_size, num_classes, 0.0, sd)
            for i in range(cfg.ensemble.replicas)]
    n1, n2 = min(batch, max(1, n_total // 3)), min(3 * batch, n_total)
    times = []
    for n in (n1, n1, n2):
        t = time.monotonic()
        evaluate(reps, val_dir, device, batch, n, cfg.model.channels_last, list(range(len(reps))))
        times.append(time.monotonic() - t)
    if device == "gpu":
        torch.cuda.empty_cache()
    passes = {"passes": [[n1, times[0], "warm-up"], [n1, times[1]], [n2, times[2]]]}
    if n2 <= n1:  # too few images to fit a slope: the larger pass's time per image, start-up included
        return {"startup_s": 0.0, "per_image_s": times[2] / n2, "images": n_total, "safety": 1.15,
                "seconds": 1.15 * times[2] / n2 * n_total} | passes
    return eval_estimate(n1, times[1], n2, times[2], n_total) | passes


# ------------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Stages and outputs: see the top of "
                                "benchmarks/gpu/accuracy.py.")
    p.add_argument("--out", required=True, help="output folder for the results files; required")
    p.add_argument("--root", default=DEFAULT_ROOT, help="folder holding the four Fashion-MNIST .gz files "
                   f"(default: {DEFAULT_ROOT})")
    p.add_argument("--recipe", default="fashion-mnist-gpu", help="named recipe or YAML file (default: "
                   "fashion-mnist-gpu)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="recipe override, repeatable, e.g. --set data.input_size=32 (default: none)")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run from this process's "
                   "start (install, shard, train, evaluate, write); sets the number of epochs (default: 420)")
    p.add_argument("--epochs", type=int, default=None, help="train exactly this many epochs instead: no budget "
                   "fitting, no deadline (default: fit to --budget-s)")
    p.add_argument("--max-epochs", type=int, default=None, help="most epochs the budget may choose (default: the "
                   "recipe's schedule.epochs)")
    p.add_argument("--concurrent", type=int, default=None, help="replicas trained at once on the one GPU, one "
                   "process each (default: the recipe's ensemble.max_concurrent; --smoke: 2)")
    p.add_argument("--eval-batch", type=int, default=None, help="images per evaluation batch, x up to 144 crops "
                   "(default: 64; --smoke: 4)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N test images (default: all; "
                   f"--smoke: {SMOKE_EVAL_LIMIT})")
    p.add_argument("--limit", type=int, default=None, help=f"shard only N images per split (default: all; --smoke: "
                   f"{SMOKE_LIMIT})")
    p.add_argument("--shard-workers", type=int, default=min(16, os.cpu_count() or 1), help="shard writer processes "
                   "(default: the CPUs, at most 16)")
    p.add_argument("--log-every", type=int, default=0, help="a progress line every N training steps in each "
                   "replica's log (default: 0, one line per epoch)")
    p.add_argument("--work", default=None, help="folder for shards and checkpoints, kept (default: a new "
                   "temporary folder, removed at the end)")
    p.add_argument("--install", default=None, help="first install the wheels from prepare.py's parts in this "
                   "folder into .gpu-site, as run.py --install (default: no install)")
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes on the CPU: {SMOKE_LIMIT} images per split, "
                   "32 px, 4 steps per epoch, 2 replicas at a time (default: off)")
    args = p.parse_args(argv)
    for name in ("budget_s", "epochs", "max_epochs", "concurrent", "eval_batch", "eval_limit", "limit",
                 "shard_workers"):
        v = getattr(args, name)
        if v is not None and (not math.isfinite(v) or v <= 0):
            p.error(f"--{name.replace('_', '-')} must be positive, got {v:g}")
    if args.log_every < 0:
        p.error(f"--log-every must be >= 0, got {args.log_every}")
    from pipeline.shards.sources import FASHION_MNIST_FILES

    root = Path(args.root)
    missing = [n for pair in FASHION_MNIST_FILES.values() for n in pair if not (root / n).is_file()]
    if not root.is_dir() or missing:
        p.error(f"--root {root}: " + ("not a folder" if not root.is_dir() else f"missing {', '.join(missing)}")
                + " (the four Fashion-MNIST .gz files: copy them there from a machine that has them)")
    args.error = p.error
    return args


def configure(args) -> None:
    """The recipe with the runner's settings (after --install: loading YAML needs pyyaml from .gpu-site)."""
    from pipeline.config import ConfigError, load_recipe

    sets = [*(SMOKE_SETS if args.smoke else []), *args.set]
    try:
        args.cfg = load_recipe(args.recipe, sets)
    except ConfigError as e:
        args.error(f"--recipe/--set: {e}")
    cfg = args.cfg
    cfg.tracking.log_every = args.log_every
    args.max_epochs = args.max_epochs or cfg.schedule.epochs
    args.concurrent = args.concurrent or (2 if args.smoke else cfg.ensemble.max_concurrent or cfg.ensemble.replicas)
    args.eval_batch = args.eval_batch or (4 if args.smoke else 64)
    args.limit = args.limit or (SMOKE_LIMIT if args.smoke else None)
    args.eval_limit = args.eval_limit or (SMOKE_EVAL_LIMIT if args.smoke else None)
    if args.epochs is None:
        try:
            c = calibration_epochs(cfg.schedule.shape, cfg.schedule.warmup_epochs)
        except BudgetError as e:
            args.error(str(e))
        if args.max_epochs < c:
            args.error(f"--max-epochs {args.max_epochs} is below the {c} calibration epoch(s) of the schedule")
        cfg.schedule.epochs = args.max_epochs
    else:
        cfg.schedule.epochs = args.epochs
    if cfg.schedule.shape == "cosine" and cfg.schedule.warmup_epochs >= cfg.schedule.epochs:
        args.error(f"schedule: {cfg.schedule.epochs} epoch(s) leave nothing after the {cfg.schedule.warmup_epochs} "
                "warm-up epoch(s); ask for more epochs")


def recipe_summary(cfg, args) -> dict:
    """What the run trains with; `epochs` is filled in once chosen."""
    s = cfg.schedule
    return {"name": cfg.recipe, "epochs": None, "max_epochs": args.max_epochs, "input_size": cfg.data.input_size,
            "batch_size": cfg.data.batch_size, "lr": cfg.effective_lr(), "momentum": cfg.optim.momentum,
            "weight_decay": cfg.optim.weight_decay,
            "schedule": {"shape": s.shape, "warmup_epochs": s.warmup_epochs, "lr_decay": s.lr_decay,
                         "decay_every": s.decay_every},
            "ema_decay": s.ema_decay, "label_smoothing": s.label_smoothing, "aux_weight": s.aux_weight,
            "variant": cfg.model.variant, "replicas": cfg.ensemble.replicas, "concurrent": args.concurrent,
            "limit_train": cfg.data.limit_train, "limit_val": cfg.data.limit_val, "data_device": cfg.data.device,
            "sets": [*(SMOKE_SETS if args.smoke else []), *args.set]}


def lr_per_epoch(cfg, epochs: int) -> list[float]:
    """The learning rate at the start of each epoch of a run of `epochs` epochs."""
    from pipeline.train.schedule import lr_at

    s = cfg.schedule
    return [lr_at(e, cfg.effective_lr(), s.lr_decay, s.decay_every, s.warmup_epochs, s.shape, epochs) for e in range(epochs)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    t = time.monotonic()
    installed = install(Path(args.install)) if args.install else "not asked"
    install_s = time.monotonic() - t
    if SITE.is_dir() and str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))
        import importlib

        importlib.invalidate_caches()
    print(f"install: {installed}", flush=True)
    configure(args)
    cfg = args.cfg
    from pipeline.config import ConfigError
    from pipeline.evaluate.run import EvaluationError
    from pipeline.shards.plan import ShardJobError
    from pipeline.shards.sources import SourceError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.gpu import accuracy_report as report

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"smoke": args.smoke, "status": "running", "command": [sys.executable, *sys.argv],
               "recipe": recipe_summary(cfg, args), "budget": {"budget_s": None if args.epochs else args.budget_s,
                                            "mode": "fixed epochs" if args.epochs else "budget"},
               "timings": {}, "replicas": [], "reference": REFERENCE}

    def save(status: str | None = None) -> None:
        if status:
            results["status"] = status
        results["timings"]["total_s"] = time.monotonic() - T0
        report.write_json(out, results)

    try:
        results["install"], results["timings"]["install_s"] = installed, install_s
        t = time.monotonic()
        manifests = shard(args.root, work / "shards", args.limit, args.shard_workers)
        results["timings"]["shard_s"] = time.monotonic() - t
        results["data"] = {"root": str(Path(args.root).resolve()), "limit": args.limit,
                           **{f"{s}_images": m["num_samples"] for s, m in manifests.items()},
                           "shards": sum(len(m["shards"]) for m in manifests.values())}
        results["machine"] = machine()
        log("machine: " + json.dumps(results["machine"]))
        import torch

        cuda = torch.cuda.is_available() and not args.smoke
        if not cuda and not args.smoke:
            log("WARNING: no CUDA device: training and evaluation run on the CPU")
        if not cuda:
            cfg.data.device, cfg.ensemble.gpus_per_worker = "cpu", 0.0
        device = "gpu" if cuda else "cpu"
        cfg.data.shards = str(work / "shards" / "fashion-mnist")
        val_dir = Path(cfg.data.shards) / cfg.data.val_split
        n_val = manifests[cfg.data.val_split]["num_samples"]
        n_eval = min(args.eval_limit or n_val, n_val)
        save()

        deadline, eval_s, reserve = None, 0.0, 10 + 0.03 * args.budget_s
        if args.epochs is None:
            t = time.monotonic()
            est = measure_eval(cfg, val_dir, device, args.eval_batch, n_eval, len(manifests["train"]["classes"]))
            results["timings"]["eval_calibration_s"] = time.monotonic() - t
            eval_s = est["seconds"]
            deadline = T0 + args.budget_s - eval_s - reserve
            results["budget"] |= {"eval_estimate": est, "reserve_s": reserve, "train_deadline_s": deadline - T0}
            log(f"budget: evaluation of {n_eval:,} images x 144 crops x {cfg.ensemble.replicas} models estimated at "
                f"{eval_s:,.0f}s; training must end by {deadline - T0:,.0f}s of {args.budget_s:,.0f}s")
            if deadline <= time.monotonic():
                raise RunError(f"--budget-s {args.budget_s:g} leaves no time to train: the evaluation alone is "
                               f"estimated at {eval_s:,.0f}s after {time.monotonic() - T0:,.0f}s spent; raise "
                               "--budget-s or lower --eval-limit / data.input_size")
        save()

        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // min(args.concurrent, cfg.ensemble.replicas))),
               "PYTHONPATH": os.pathsep.join([*([str(SITE)] if SITE.is_dir() else []), str(REPO),
                                              *filter(None, [os.environ.get("PYTHONPATH")])])}
        train(cfg, args, work, out, env, deadline, eval_s, reserve, results, T0, log)
        cfg.schedule.epochs = results["recipe"]["epochs"]
        results["recipe"]["lr_at_epoch_start"] = lr_per_epoch(cfg, cfg.schedule.epochs)
        replicas = collect(cfg, work, results)
        save()
        if not replicas:
            raise RunError("no replica finished an epoch: nothing to evaluate (see logs/replica-*.log)")

        from pipeline.evaluate.run import choose_single, markdown_table

        # The 1-model row: the lowest-index trained replica (replica 0 unless it failed), fixed in advance.
        ranking, selection = choose_single(replicas, str(replicas[0].index), disjoint=False)
        log(f"evaluate: {len(replicas)} replicas x 1/10/144 crops on {n_eval:,} test images ({device}); "
            f"1 model = {selection}")
        t = time.monotonic()
        ev = evaluate(replicas, val_dir, device, args.eval_batch, n_eval, cfg.model.channels_last, ranking,
                      EVAL_CHUNKS, None if args.epochs else T0 + args.budget_s - EVAL_END_RESERVE_S)
        results["timings"]["eval_s"] = time.monotonic() - t
        images = report.images_note(ev["acc"].rows[(1, 1, "mean")].n, cfg.data.limit_val, n_val, replicas[0].index)
        if ev["stopped"]:
            images += f" (evaluation {ev['stopped']})"
        report.add_evaluation(results, ev, replicas, selection, images, manifests[cfg.data.val_split]["classes"])
        e = results["evaluation"]
        table_md = markdown_table(e["rows"], e["singles"], e["comparisons"], replicas, report.TABLE_SPLIT, selection,
                                  images)
        t = time.monotonic()
        report.write_all(out, results, replicas, table_md, cfg.to_dict())
        results["timings"]["write_s"] = time.monotonic() - t
        failed = [r["replica"] for r in results["replicas"] if r["status"] != "done"]
        notes = ([f"replicas {failed} did not finish (see replicas[].status)"] if failed else []) \
            + ([f"evaluation {ev['stopped']}"] if ev["stopped"] else [])
        save("complete" + (f"; {'; '.join(notes)}" if notes else ""))
        report.write_all(out, results, replicas, table_md, cfg.to_dict())  # again, with the final timings
        log(f"done in {time.monotonic() - T0:,.0f}s; outputs in {out}")
        print(report.summary_lines(results), flush=True)
        return 0 if not failed else 1
    except (RunError, BudgetError, SourceError, ShardJobError, ConfigError, EvaluationError) as e:
        save(f"failed: {e}")
        print(f"accuracy: error: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        save(f"failed: {e}; results.json holds the stages finished before")
        print(f"accuracy: {e}; partial results in {out / 'results.json'}", file=sys.stderr)
        return 143
    except Exception as e:
        save(f"failed: {type(e).__name__}: {e}")
        raise
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
