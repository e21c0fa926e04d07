"""The evaluation job: a trained ensemble x crop schemes -> Table 3, logged to MLflow.

Replicas' final (Polyak) weights come from the ensemble run's children (`weights_only` loads). Images
are split over Ray tasks (each a rank of the DALI eval loader: every image exactly once); each task
loads every model once and runs the largest crop scheme asked for, keeping per-crop softmax
probabilities only for the batch in hand, so the smaller schemes' rows come from the same pass. Each
image's distinct crops are computed once (a square image's 144 crops hold 42 distinct ones) and
weighted by their multiplicity: the paper's average, with fewer forward passes.

Honest rows: the "1 model" row is a model chosen without looking at the evaluated images (replica 0,
the paper's base sampling, by default; or the lowest training-time validation error, allowed only when
those validation images are disjoint from the evaluated ones), and the evaluated images start after the
training-time validation subset by default. Every row carries a 95% Wilson interval, and the paper's
comparisons (all vs 1 model, 10 and 144 vs 1 crop) carry paired tests on the same images
(`pipeline.evaluate.stats`).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.cli import settings_yaml
from pipeline.evaluate.ensemble import PAPER_TABLE3, Table3Accumulator
from pipeline.evaluate.stats import Z95
from pipeline.tracking import (
    ENSEMBLE_MODEL,
    PatientClient,
    TrackingError,
    end_runs,
    log_datasets,
    log_run_settings,
    manifest_digest,
    require_server,
    resolve_uri,
    source_tags,
    stop_of,
    stop_on_signals,
)


class EvaluationError(Exception):
    pass


# The fewest images a budgeted evaluation scores (--budget-minutes): at the demo's measured effect (7 vs 1
# models: about 2 points of top-1 error, with 3-6% of images discordant), exact McNemar tests reach the
# Holm-adjusted 0.05 over Table 3's 14 comparisons with about 80% power from about 2,000 images; below
# that a real ensemble gain is more often reported as "not significant" than not.
EVAL_FLOOR = 2000
EVAL_PROBE = 24  # images per worker in the budget's warm-up (three batches of 8)
EVAL_END_S = 20.0  # after the images: tables, chart and artifacts logged to MLflow


def fit_images(budget_s: float, elapsed_s: float, fixed_s: float, rate: float, asked: int, floor: int) -> tuple[int, bool]:
    """How many images (whole hundreds) an evaluation scores in what is left of its budget at `rate`
    images/s (all workers), after `fixed_s` of start-up; never more than asked nor fewer than the floor.
    Returns (images, whether the floor fit)."""
    floor = min(floor, asked)
    left = budget_s - elapsed_s - fixed_s - EVAL_END_S
    fit = int(max(0.0, left) * rate) // 100 * 100
    return max(floor, min(asked, fit)), fit >= floor


@dataclass
class Replica:
    index: int
    strategy: str
    run_id: str
    variant: str
    input_size: int
    num_classes: int
    val_top1_err: float
    state_dict: dict


def resolve_ensemble(client, experiment: str, ref: str):
    if ref == "latest":
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], "tags.kind = 'ensemble'", max_results=1,
                                  order_by=["attributes.start_time DESC"]) if exp else []
        if not runs:
            raise EvaluationError(f"no ensemble run in experiment '{experiment}'")
        return runs[0]
    exp = client.get_experiment_by_name(experiment)
    if exp:  # an ensemble name (e.g. ensemble-demo): its parent run
        named = client.search_runs([exp.experiment_id], f"tags.kind = 'ensemble' and tags.ensemble = '{ref}'",
                                   max_results=1, order_by=["attributes.start_time DESC"])
        if named:
            return named[0]
    try:
        run = client.get_run(ref)
    except Exception:
        raise EvaluationError(f"no MLflow run with id or ensemble name '{ref}'") from None
    if run.data.tags.get("kind") != "ensemble":
        raise EvaluationError(f"run {ref} is not an ensemble run (tag kind={run.data.tags.get('kind')!r})")
    return run


def load_replicas(client, parent, workdir: Path) -> list[Replica]:
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.kind = 'replica'")
    done = [c for c in children if c.data.tags.get("completed") == "true"]
    if not done:
        raise EvaluationError(f"ensemble run {parent.info.run_id} has no finished replicas "
                              f"({len(children)} replica runs, none completed)")
    out = []
    for c in sorted(done, key=lambda c: int(c.data.tags["replica"])):
        path = client.download_artifacts(c.info.run_id, "weights/polyak_state_dict.pt", str(workdir / c.info.run_id))
        sd = torch.load(path, map_location="cpu", weights_only=True)
        out.append(Replica(int(c.data.tags["replica"]), c.data.tags["strategy"], c.info.run_id,
                           c.data.params["model.variant"], int(c.data.params["data.input_size"]),
                           sd["fc.weight"].shape[0], c.data.metrics.get("val/top1_err", float("inf")), sd))
    return out


def forward_probs(models: list, x: torch.Tensor, inverse: torch.Tensor | None, b: int, k: int,
                  dev: torch.device, fmt) -> torch.Tensor:
    """Softmax probabilities [M, B, K, C] of every model on every crop: `x` holds B x K crops, or with
    `inverse` only the distinct crops, expanded back to the K of each image (same average as the K)."""
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        probs = torch.stack([m(x).float().softmax(-1) for m in models])  # [M, N, C]
    if inverse is None:
        return probs.reshape(len(models), b, k, -1)
    return probs[:, inverse.to(probs.device)]  # [M, B, K, C]


def unpack_eval_batch(batch: tuple, size: int) -> tuple:
    """A DALIEvalLoader batch, plain or deduplicated, as (crops [N, 3, S, S], labels [B], inverse or
    None, B, K): the input of `forward_probs`."""
    if len(batch) == 3:  # dedup: distinct crops and, per image, the position of each of its K crops
        x, y, inverse = batch
        return x, y, inverse, *inverse.shape
    x, y = batch
    b, k = x.shape[:2]
    return x.reshape(b * k, 3, size, size), y, None, b, k


def evaluate_rank(replicas: list[Replica], split_dir: str, rank: int, world: int, largest: int, schemes: list[int],
                  model_counts: list[int], batch_size: int, device: str, limit: int | None, ranking: list[int],
                  offset: int = 0, dedup: bool = True, channels_last: bool | None = None) -> dict:
    """One rank's share of the split through every model; returns its accumulator and timings."""
    from pipeline.data.dali import Normalizer, resolve_device
    from pipeline.data.dali_eval import DALIEvalLoader
    from pipeline.model.googlenet import inference_model

    dev_kind = resolve_device(device)
    if dev_kind == "gpu":
        from pipeline.data.dali import worker_gpu

        dev = torch.device("cuda", worker_gpu())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if channels_last is None:  # faster on GPUs, and measured faster on CPU too (x1.7 at 32 px, one thread)
        channels_last = True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [inference_model(r.state_dict, r.num_classes, r.variant).to(dev, memory_format=fmt) for r in replicas]
    size = replicas[0].input_size
    acc = Table3Accumulator(ranking, model_counts, schemes, largest)
    normalize = Normalizer(dev)
    loader = DALIEvalLoader(split_dir, n_crops=largest, input_size=size, batch_size=batch_size, rank=rank,
                            world_size=world, device=dev_kind, limit=limit, offset=offset, dedup=dedup,
                            device_id=dev.index if dev.type == "cuda" else None)
    t0, done, model_s, forwards = time.perf_counter(), 0, 0.0, 0
    total = len(loader.source.range)
    last_print = 0.0
    for batch in loader:
        x, y, inverse, b, k = unpack_eval_batch(batch, size)
        x = normalize(x).contiguous(memory_format=fmt)
        t1 = time.perf_counter()
        probs = forward_probs(models, x, inverse, b, k, dev, fmt)
        model_s += time.perf_counter() - t1
        forwards += x.shape[0] * len(models)
        acc.add(probs, y)
        done += b
        elapsed = time.perf_counter() - t0
        if elapsed - last_print >= 5 or done == total:
            last_print = elapsed
            rate = done / elapsed
            print(f"[evaluate rank {rank}/{world}] {done}/{total} images | {rate * k * len(models):,.0f} crops/s "
                  f"({forwards / elapsed:,.0f} forwards/s) | eta {(total - done) / max(rate, 1e-9):,.0f}s", flush=True)
    import resource

    return {"acc": acc, "seconds": time.perf_counter() - t0, "model_seconds": model_s,
            "crops": done * largest * len(models), "forwards": forwards, "skipped": loader.skipped,
            "keys": loader.keys, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def plan_workers(args: tuple, n_eval: int, batch_size: int, device: str, info, log=print) -> tuple[int, int]:
    """`--workers auto`: as many evaluation tasks as the cluster's CPUs (GPUs with --device gpu) and memory
    hold, the rule training's replicas follow (pipeline.train.memory): one task's peak memory, measured on
    one batch in a fresh worker process (cached per machine, keyed by what sets it), plus MARGIN, reserved
    per task; never more tasks than batches. `args`: evaluate_rank's after (replicas, split_dir). Returns
    (workers, bytes reserved per worker)."""
    import hashlib
    import json

    import nvidia.dali
    import ray

    from pipeline.shards.splits import image_profile
    from pipeline.train.memory import FRESH_PROCESS, GIB, MARGIN, cached_peak, store_peak

    replicas, largest, schemes, model_counts = args[0], args[4], args[5], args[6]
    key = "eval-" + hashlib.sha256(json.dumps(
        {"models": len(replicas), "variant": replicas[0].variant, "input_size": replicas[0].input_size,
         "classes": replicas[0].num_classes, "largest": largest, "schemes": schemes, "counts": model_counts,
         "batch": batch_size, "device": device, "dedup": args[12], "channels_last": args[13],
         "images": image_profile(info), "torch": torch.__version__, "dali": nvidia.dali.__version__},
        sort_keys=True, default=str).encode()).hexdigest()[:16]
    gpu = device == "gpu"
    peak, how = cached_peak(key), "measured before on this machine"
    if peak is None:
        probe = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_calls=1,
                           runtime_env=FRESH_PROCESS)(evaluate_rank)
        t0 = time.perf_counter()
        got = ray.get(probe.remote(args[0], args[1], 0, 1, *args[4:9], min(batch_size, n_eval), *args[10:]))
        peak = int(got["peak_rss"])
        store_peak(key, peak)
        how = f"measured now on one batch in {time.perf_counter() - t0:.0f} s"
    need = int(peak * (1 + MARGIN))
    per_node, by_cpu = [], 0
    for n in ray.nodes():
        if not n.get("Alive", True):
            continue
        have = n.get("Resources", {})
        units = int(have.get("GPU" if gpu else "CPU", 0) + 1e-9)
        by_cpu += units
        per_node.append(min(units, int(have.get("memory", 0) / need + 1e-9)))
    if not sum(per_node):
        raise EvaluationError(f"--workers auto: no node of the cluster holds one evaluation task ({'1 GPU' if gpu else '1 CPU'}"
                              f" and {need / GIB:.2f} GiB of Ray memory, its measured peak + {MARGIN:.0%}); "
                              "give --workers a number to evaluate without reserving memory")
    batches = max(1, -(-n_eval // batch_size))
    workers = min(sum(per_node), batches)
    bound = ("the images' batches" if workers == batches else "memory" if sum(per_node) < by_cpu
             else "GPUs" if gpu else "CPUs")
    log(f"evaluate: workers: {workers} at once (bound by {bound}); each reserves {need / GIB:.2f} GiB (a task peaks "
        f"at {peak / GIB:.2f} GiB, {how}; +{MARGIN:.0%})")
    return workers, need


def _pct_ci(r: dict, e: str) -> str:
    return f"{r[f'{e}_err']:.2%} [{r[f'{e}_err_lo']:.1%}, {r[f'{e}_err_hi']:.1%}]"


def markdown_table(rows: list[dict], singles: list[dict], comparisons: list[dict], replicas: list[Replica],
                   split: str, selection: str, images: str) -> str:
    """Table 3 as Markdown: rows with 95% intervals, single replicas, the paired comparisons."""
    lines = [f"# Table 3, reproduced ({split}, {rows[0]['images']} images: {images})", "",
             f"1 model = {selection}. Errors with 95% Wilson intervals over images.", "",
             "| models | crops | rule | cost | top-1 error [95% CI] | top-5 error [95% CI] | delta top-5 vs base |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['models']} | {r['crops']} | {r['rule']} | {r['cost']} | {_pct_ci(r, 'top1')} | "
                     f"{_pct_ci(r, 'top5')} | {r['delta_top5']:+.2%} |")
    if not comparisons:
        lines += ["", "No paired comparisons: one model count and one crop scheme were evaluated (ask for "
                  "--models 1 7 or --crops 1 10 144 to compare)."]
    else:
        lines += ["", "Paired comparisons on the same images (rule mean): difference in error (A - B) with a "
                  "paired-bootstrap 95% interval, exact McNemar p-value, Holm-adjusted over all the comparisons "
                  "below (top-1 and top-5 together); significant = adjusted p < 0.05.", "",
                  "| metric | A | B | A - B [95% CI] | only A wrong | only B wrong | p | p (Holm) | significant |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in comparisons:
        lines.append(f"| {c['metric']} | {c['a']} | {c['b']} | {c['diff']:+.2%} [{c['diff_lo']:+.1%}, "
                     f"{c['diff_hi']:+.1%}] | {c['only_a_wrong']} | {c['only_b_wrong']} | {c['p_mcnemar']:.2g} | "
                     f"{c['p_holm']:.2g} | {'yes' if c['significant'] else 'no'} |")
    lines += ["", "Single replicas (the same images):", "",
              "| replica | strategy | training val top-1 | crops | top-1 error [95% CI] | top-5 error [95% CI] |",
              "|---:|---|---:|---:|---:|---:|"]
    for sg in singles:
        r = replicas[sg["model"]]  # (a position in `replicas`, which may lack any replica index)
        lines.append(f"| {r.index} | {r.strategy} | {r.val_top1_err:.2%} | {sg['crops']} | {_pct_ci(sg, 'top1')} | "
                     f"{_pct_ci(sg, 'top5')} |")
    lines += ["", "## For reference: the paper's Table 3 (ImageNet 2014 validation, GoogLeNet; not comparable data)",
              "", "| models | crops | cost | top-5 error |", "|---:|---:|---:|---:|"]
    lines += [f"| {m} | {c} | {m * c} | {e:.2f}% |" for m, c, e in PAPER_TABLE3]
    return "\n".join(lines) + "\n"


def chart_png(rows: list[dict], path: Path) -> None:
    """Top-1 and top-5 error vs cost, one line per model count (rule mean solid, max dotted), with
    95% intervals; the paper's ImageNet top-5 points beside ours, labelled as such."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, e in zip(axes, ("top1", "top5"), strict=True):
        for j, m in enumerate(sorted({r["models"] for r in rows})):
            for rule, style in (("mean", "-o"), ("max", ":x")):
                pts = sorted((r["cost"], r[f"{e}_err"] * 100, r[f"{e}_err_lo"] * 100, r[f"{e}_err_hi"] * 100)
                             for r in rows if r["models"] == m and r["rule"] == rule)
                x = [p[0] for p in pts]
                y = [p[1] for p in pts]
                err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                ax.errorbar(x, y, yerr=err, fmt=style, color=colors[j % len(colors)], capsize=3,
                            label=f"{m} model{'s' if m > 1 else ''}, {rule} rule",
                            alpha=1.0 if rule == "mean" else 0.6)
        if e == "top5":
            for m, style in ((1, "s--"), (7, "D--")):
                pts = [(mm * c, err) for mm, c, err in PAPER_TABLE3 if mm == m]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color="grey",
                        label=f"paper, ImageNet: {m} model{'s' if m > 1 else ''}")
        ax.set_xscale("log")
        ax.set_xlabel("cost (forward passes per image)")
        ax.set_ylabel(f"{'top-1' if e == 'top1' else 'top-5'} error (%)")
        ax.set_title(f"{'Top-1' if e == 'top1' else 'Top-5'} error vs cost (95% CI)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def choose_single(replicas: list[Replica], single_model: str, disjoint: bool) -> tuple[list[int], str]:
    """The evaluation order of the replicas (the 1-model row's model first, then the others: by
    training-time validation error when those validation images are disjoint from the evaluated ones,
    else in replica order, so that no row is chosen on the images it is scored on) and a sentence saying
    how the single model was chosen. Reads only the replicas' training metrics, never the evaluated images."""
    if disjoint:
        by_val = sorted(range(len(replicas)), key=lambda i: (replicas[i].val_top1_err, replicas[i].index))
    else:
        by_val = sorted(range(len(replicas)), key=lambda i: replicas[i].index)
    if single_model == "best-val":
        if not disjoint:
            raise EvaluationError("--single-model best-val picks by training-time validation error, but those "
                                  "validation images overlap the evaluated ones; choose a replica index, or "
                                  "evaluate images disjoint from data.limit_val (--offset)")
        first = by_val[0]
        how = (f"replica {replicas[first].index} ({replicas[first].strategy}), the lowest training-time "
               f"validation top-1 error ({replicas[first].val_top1_err:.2%}), on images disjoint from the evaluated ones")
    else:
        try:
            want = int(single_model)
        except ValueError:
            raise EvaluationError(f"--single-model: expected a replica index or best-val, got {single_model!r}") from None
        idx = [i for i, r in enumerate(replicas) if r.index == want]
        if not idx:
            raise EvaluationError(f"--single-model {want}: no finished replica {want} "
                                  f"(finished: {[r.index for r in replicas]})")
        first = idx[0]
        how = f"replica {want} ({replicas[first].strategy}), fixed in advance (not chosen on any images)"
    return [first] + [i for i in by_val if i != first], how


def link_ensemble_model(client, parent, run_id: str) -> str | None:
    """Tag the evaluation run with the registered `googlenet-ensemble` version made from this ensemble
    (and log it as the run's model input), so the UI links the numbers to the model they describe."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"tags.ensemble_run_id = '{parent.info.run_id}'")
    except MlflowException:
        return None
    versions = [v for v in versions if v.name == ENSEMBLE_MODEL]
    if not versions:
        return None
    v = max(versions, key=lambda v: int(v.version))
    ref = f"models:/{v.name}/{v.version}"
    client.set_tag(run_id, "ensemble_model", ref)
    model_id = getattr(v, "model_id", None) or (v.source.split("/")[1] if v.source.startswith("models:/m-") else None)
    if model_id:
        from mlflow.entities import LoggedModelInput

        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    return ref


def training_val_digest(client, parent) -> str | None:
    """The digest of the validation split the ensemble trained with: its recorded settings, or (older
    runs) the `validation` dataset input of its replica runs."""
    import json

    settings = parent.data.tags.get("settings")
    if settings:
        return json.loads(settings).get("data.val_digest")
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.kind = 'replica'")
    for c in children:
        for d in (c.inputs.dataset_inputs if c.inputs else []):
            if any(t.key == "mlflow.data.context" and t.value == "validation" for t in d.tags):
                return d.dataset.digest
    return None


def check_validation_digest(client, parent, manifest: dict, where: str, allow: bool, log=print) -> bool:
    """Refuse (or with `allow`, warn loudly) to score an ensemble's validation split when its shards are
    not the ones training validated on (regenerated with another seed or source): "the images after the
    first data.limit_val" would then be other images, and may overlap those chosen on. Returns whether
    they differ."""
    want = training_val_digest(client, parent)
    have = manifest_digest(manifest)
    if want is None or want == have:
        return False
    msg = (f"the validation shards at {where} (digest {have}) are not those ensemble "
           f"'{parent.data.tags.get('ensemble', parent.info.run_id)}' validated on during training (digest {want})")
    if not allow:
        raise EvaluationError(msg + "; point --shards at those, or pass --allow-other-shards to score these anyway")
    log(f"evaluate: WARNING: {msg}; --allow-other-shards: scoring them anyway, and the 'disjoint from "
        "training-time validation' rule no longer holds")
    return True


def _param_int(params: dict, key: str) -> int | None:
    v = params.get(key)
    return int(v) if v not in (None, "", "None") else None


def run_evaluation(ensemble: str = "latest", split: str = "val", crops: list[int] | None = None,
                   models: list[int] | None = None, limit: int | None = None, batch_size: int = 8,
                   workers: int | str = 1, device: str = "auto", shards: str | None = None, mlflow_uri: str | None = None,
                   experiment: str = "inception-pipeline", log=print, single_model: str = "0",
                   offset: int | None = None, dedup: bool = True, channels_last: bool | None = None,
                   allow_other_shards: bool = False, dry_run: bool = False, budget_minutes: float | None = None,
                   budget_min_images: int = EVAL_FLOOR) -> dict:
    import mlflow
    import ray

    started = time.perf_counter()

    from pipeline.shards.format import ShardError
    from pipeline.shards.splits import open_split

    crops = sorted(set(crops or [1, 10, 144]))
    uri = resolve_uri(mlflow_uri)
    if not uri:
        raise TrackingError("no MLflow tracking server: set MLFLOW_TRACKING_URI or --mlflow-uri")
    require_server(uri)
    for n in crops:
        if n not in (1, 10, 144):
            raise EvaluationError(f"--crops: {n} is not a crop scheme; use 1, 10 and/or 144")
    if workers != "auto" and (not isinstance(workers, int) or workers < 1):
        raise EvaluationError(f"--workers: a positive number or auto, got {workers!r}")
    if batch_size < 1 or (limit is not None and limit < 1) or (offset is not None and offset < 0):
        raise EvaluationError("--batch-size and --limit must be positive, --offset not negative")
    if budget_minutes is not None and budget_minutes <= 0:
        raise EvaluationError(f"--budget-minutes: must be positive, got {budget_minutes:g}")
    if budget_min_images < 1:
        raise EvaluationError(f"--budget-min-images: must be positive, got {budget_min_images}")
    client = PatientClient(uri, who="the evaluation")  # (waits out a tracking server that is down)
    parent = resolve_ensemble(client, experiment, ensemble)
    with tempfile.TemporaryDirectory() as tmp:
        replicas = load_replicas(client, parent, Path(tmp))
    model_counts = sorted(set(models or [1, len(replicas)]))
    if model_counts[-1] > len(replicas) or model_counts[0] < 1:
        raise EvaluationError(f"--models {model_counts}: the ensemble has {len(replicas)} finished replicas")
    from pipeline.shards.cache import split_location

    shards_dir = shards or parent.data.params.get("data.shards", "")
    split_loc = split_location(shards_dir, split)  # s3://: each rank's node reads a verified local copy
    try:
        info = open_split(split_loc)
    except ShardError as e:
        raise EvaluationError(f"split '{split}': {e}") from None
    for r in replicas:
        if r.num_classes != len(info.classes):
            raise EvaluationError(f"replica {r.index} predicts {r.num_classes} classes but {info.dir} has "
                                  f"{len(info.classes)}")
    if len({(r.variant, r.input_size) for r in replicas}) != 1:
        raise EvaluationError("replicas differ in variant or input size; evaluate them separately")

    # Which images: by default those after the training-time validation subset (the first data.limit_val
    # samples of the validation split), so that nothing chosen on validation images is scored on them.
    params = parent.data.params
    n_split = info.num_samples
    if split == params.get("data.val_split", "val"):
        trained_val = min(_param_int(params, "data.limit_val") or n_split, n_split)
        # The offset above counts on these being the images training validated on: the same shards.
        other_shards = check_validation_digest(client, parent, info.manifest, split_loc, allow_other_shards, log)
    else:
        trained_val, other_shards = 0, False
    if offset is None:
        offset = trained_val if trained_val < n_split else 0
    if offset >= n_split:
        raise EvaluationError(f"--offset {offset}: split '{split}' has {n_split} images")
    n_eval = min(limit or n_split, n_split - offset)
    disjoint = offset >= trained_val and not other_shards

    def describe(n: int) -> str:
        text = f"samples [{offset}, {offset + n}) of the split"
        if other_shards:
            text += "; NOT the shards training validated on"
        elif trained_val:
            text += (f"; training validated on samples [0, {trained_val})" + ("" if disjoint else ", which OVERLAP"))
        return text

    images = describe(n_eval)
    ranking, selection = choose_single(replicas, single_model, disjoint)
    if not disjoint and not other_shards:
        log(f"evaluate: warning: the evaluated images overlap the {trained_val} training-time validation images")

    largest = max(crops)
    log(f"evaluate: ensemble {parent.info.run_name} ({parent.info.run_id}), {len(replicas)} replicas, split {split} "
        f"({n_eval} images: {images}), crops {crops}, models {model_counts}, "
        + ("workers: auto (as many as the cluster's CPUs and memory hold)" if workers == "auto" else f"{workers} workers"))
    log(f"evaluate: 1 model = {selection}")
    settings = {"evaluation": {"ensemble_run": parent.info.run_id, "ensemble": parent.data.tags.get("ensemble", ""),
                               "split": split, "shards": shards_dir, "crops": crops, "models": model_counts,
                               "offset": offset, "images": n_eval, "single_model": selection,
                               "batch_size": batch_size, "workers": workers, "device": device, "dedup": dedup,
                               "channels_last": channels_last, "allow_other_shards": allow_other_shards}}
    if budget_minutes:
        settings["evaluation"]["budget_minutes"] = budget_minutes
        log(f"evaluate: budget {budget_minutes:g} min: a warm-up of {EVAL_PROBE} images per worker measures this "
            f"cluster, then as many of the {n_eval:,} images as fit are scored (at least {min(budget_min_images, n_eval):,})")
    if dry_run:
        log(f"dry run: nothing written to MLflow, no Ray task started. Settings:\n{settings_yaml(settings)}")
        return {"dry_run": True, "settings": settings}
    if not ray.is_initialized():
        ray.init(log_to_driver=True, configure_logging=False)
    if device == "auto":  # decided by the cluster, not by this driver's machine
        device = "gpu" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    split_arg = split_loc if "://" in split_loc else str(info.dir)
    reserve = {}
    if workers == "auto":
        workers, need = plan_workers((replicas, split_arg, 0, 1, largest, crops, model_counts, batch_size, device,
                                      None, ranking, offset, dedup, channels_last), n_eval, batch_size, device, info, log)
        reserve = {"memory": need}
        settings["evaluation"]["workers"] = workers
    budget = None
    if budget_minutes:
        probe = ray.remote(num_cpus=1, num_gpus=1 if device == "gpu" else 0, max_calls=1, **reserve)(evaluate_rank)
        t0 = time.perf_counter()
        got = ray.get([probe.remote(replicas, split_arg, r, workers, largest, crops, model_counts, batch_size, device,
                                    min(n_eval, EVAL_PROBE * workers), ranking, offset, dedup, channels_last)
                       for r in range(workers)])
        loop_s = max(max(g["seconds"] for g in got), 1e-6)
        rate = max(sum(len(g["keys"]) for g in got) / loop_s, 1e-6)  # (every probe image skipped: the floor)
        fixed = max(0.0, time.perf_counter() - t0 - loop_s)
        asked = n_eval
        n_eval, fits = fit_images(budget_minutes * 60, time.perf_counter() - started, fixed, rate, asked,
                                   budget_min_images)
        est = (time.perf_counter() - started) + fixed + n_eval / rate + EVAL_END_S
        if fits:
            reason = (f"{n_eval:,} of the {asked:,} images fit {budget_minutes:g} min at {rate:,.2f} images/s "
                      f"({workers} worker(s); {fixed:.0f} s to start)")
        else:
            why = "what a 7-vs-1 comparison needs" if budget_min_images == EVAL_FLOOR else "--budget-min-images"
            reason = (f"TOO SLOW for a meaningful result in {budget_minutes:g} min: at {rate:,.2f} images/s the floor of "
                      f"{n_eval:,} images ({why}) takes about {est / 60:.1f} min; "
                      "scoring the floor anyway")
        log(f"evaluate: budget: {reason}; about {est / 60:.1f} min in all")
        images = describe(n_eval)
        settings["evaluation"]["images"] = n_eval
        if workers > -(-n_eval // batch_size):  # (fewer images than the warm-up's workers have batches for)
            workers = settings["evaluation"]["workers"] = -(-n_eval // batch_size)
        budget = {"rate": rate, "fixed_s": fixed, "estimate_s": est, "fits": fits, "reason": reason, "asked": asked}
    with stop_on_signals():  # SIGTERM (`ray job stop`): JobStopped; a created run is marked KILLED
        note = (f"Table 3 of ensemble `{parent.data.tags.get('ensemble', '')}` on `{split}` {images}: "
                f"{', '.join(map(str, model_counts))} models x {', '.join(map(str, crops))} crops, with 95% Wilson intervals "
                "and paired McNemar tests (Holm-corrected). The 1 model: " + selection + ". Artifacts: `table3.md` (the "
                "table), `table3.png` (top-1 and top-5 error vs cost), `table3.json` (an MLflow table), `comparisons.csv`.")
        run = client.create_run(parent.info.experiment_id, run_name=f"evaluate-{split}-{'-'.join(map(str, crops))}",
                                tags={"mlflow.parentRunId": parent.info.run_id, "kind": "evaluation",
                                      "ensemble": parent.data.tags.get("ensemble", ""), "single_model": selection,
                                      **({"other_shards": "true"} if other_shards else {}),
                                      "mlflow.note.content": note, **source_tags("jobs/evaluate_ensemble.py")})
        rid = run.info.run_id
        try:  # the run (RUNNING while it computes) ends FINISHED, or FAILED with the error as a tag, KILLED if stopped
            log_run_settings(client, rid, settings)
            if budget:
                client.set_tag(rid, "budget_reason", budget["reason"])
            task = ray.remote(num_cpus=1, num_gpus=1 if device == "gpu" else 0, **reserve)(evaluate_rank)
            reps_ref = ray.put(replicas)
            t0 = time.perf_counter()
            refs = [task.remote(reps_ref, split_arg, r, workers, largest, crops, model_counts, batch_size, device, n_eval,
                                ranking, offset, dedup, channels_last)
                    for r in range(workers)]
            while len(ray.wait(refs, num_returns=len(refs), timeout=1.0)[0]) < len(refs):
                pass  # (waits of a second: a stop signal is handled between them)
            results = ray.get(refs)
            wall = time.perf_counter() - t0
            acc = results[0]["acc"]
            for r in results[1:]:
                acc.merge(r["acc"])
            rows = acc.table()
            singles = acc.singles()
            summary = acc.single_summary()
            comparisons = acc.comparisons()
            crops_done = sum(r["crops"] for r in results)
            forwards = sum(r["forwards"] for r in results)
            skipped = [s for r in results for s in r["skipped"]]
            keys = [k for r in results for k in r["keys"]]
            log(f"{'models':>6} {'crops':>5} {'rule':>5} {'cost':>5} {'top-1 err [95% CI]':>24} {'top-5 err [95% CI]':>24} "
                f"{'delta top-5':>12}")
            for r in rows:
                log(f"{r['models']:>6} {r['crops']:>5} {r['rule']:>5} {r['cost']:>5} {_pct_ci(r, 'top1'):>24} "
                    f"{_pct_ci(r, 'top5'):>24} {r['delta_top5']:>+12.2%}")
            for c in comparisons:
                log(f"{c['metric']}: {c['a']} vs {c['b']}: {c['diff']:+.2%} [{c['diff_lo']:+.1%}, {c['diff_hi']:+.1%}] "
                    f"McNemar p={c['p_mcnemar']:.2g} (Holm {c['p_holm']:.2g}) {'significant' if c['significant'] else 'not significant'}")
            for n, sm in summary.items():
                log(f"single replicas, {n} crops: top-1 err {sm['top1_mean']:.2%} +- {sm['top1_std']:.2%} "
                    f"(best {sm['top1_min']:.2%}, worst {sm['top1_max']:.2%})")
            log(f"{crops_done:,} crops ({forwards:,} distinct forward passes) in {wall:,.1f}s "
                f"({crops_done / wall:,.0f} crops/s)")

            log_datasets(client, rid, [(split_loc if "://" in split_loc else info.dir.resolve(), info.manifest, "evaluation")])
            model_ref = link_ensemble_model(client, parent, rid)
            if model_ref:
                log(f"evaluate: the ensemble as one model: {model_ref}")
            from mlflow.entities import Metric, Param

            now = int(time.time() * 1000)
            # MLflow metric names may not contain "=": eval/top1_err/models_7/crops_144 (rule max: .../max),
            # intervals .../ci_lo and .../ci_hi; comparisons eval/compare/top1/7x144_vs_1x144/{diff,p,p_holm}.
            metrics = []
            for r in rows:
                for e in ("top1", "top5"):
                    name = f"eval/{e}_err/models_{r['models']}/crops_{r['crops']}" + ("" if r["rule"] == "mean" else "/max")
                    metrics += [Metric(name, r[f"{e}_err"], now, 0), Metric(name + "/ci_lo", r[f"{e}_err_lo"], now, 0),
                                Metric(name + "/ci_hi", r[f"{e}_err_hi"], now, 0)]
            for c in comparisons:
                name = f"eval/compare/{c['metric']}/{c['a_models']}x{c['a_crops']}_vs_{c['b_models']}x{c['b_crops']}"
                metrics += [Metric(f"{name}/diff", c["diff"], now, 0), Metric(f"{name}/p", c["p_mcnemar"], now, 0),
                            Metric(f"{name}/p_holm", c["p_holm"], now, 0)]
            metrics += [Metric("eval/crops_per_s", crops_done / wall, now, 0), Metric("eval/skipped_images", len(skipped), now, 0),
                        Metric("eval/images", rows[0]["images"], now, 0)]
            if budget:
                metrics += [Metric("eval/budget_minutes", budget_minutes, now, 0),
                            Metric("eval/budget_images_per_s", budget["rate"], now, 0),
                            Metric("eval/budget_estimate_s", budget["estimate_s"], now, 0),
                            Metric("eval/budget_actual_s", time.perf_counter() - started, now, 0)]
            client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in {
                "split": split, "crops": crops, "models": model_counts, "limit": limit, "offset": offset,
                "images": n_eval, "batch_size": batch_size, "workers": workers, "device": device, "shards": str(shards_dir),
                "single_model": single_model, "dedup": dedup, "ranking": [replicas[i].index for i in ranking]}.items()])
            md = markdown_table(rows, singles, comparisons, replicas, split, selection, images)
            per_class = acc.rows[(model_counts[-1], largest, "mean")]
            result_json = {"split": split, "images": images, "single_model": selection, "z": Z95, "rows": rows,
                           "comparisons": comparisons, "keys": keys,
                           "singles": [{"replica": replicas[sg["model"]].index} | sg for sg in singles],
                           "replicas": [{"index": r.index, "strategy": r.strategy, "run_id": r.run_id,
                                         "val_top1_err": r.val_top1_err} for r in replicas]}
            with tempfile.TemporaryDirectory() as tmp:
                t = Path(tmp)
                (t / "table3.md").write_text(md)
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
                (t / "table3.csv").write_text(buf.getvalue())
                if comparisons:  # (none with one model count and one crop scheme)
                    buf = io.StringIO()
                    w = csv.DictWriter(buf, fieldnames=list(comparisons[0]))
                    w.writeheader()
                    w.writerows(comparisons)
                    (t / "comparisons.csv").write_text(buf.getvalue())
                (t / "evaluation.json").write_text(json.dumps(result_json, indent=1))
                (t / "per_class_top1_err.json").write_text(json.dumps(
                    {info.classes[c]: 1 - per_class.per_class_top1[c] / n for c, n in sorted(per_class.per_class_n.items())},
                    indent=1))
                chart_png(rows, t / "table3.png")
                for f in ("table3.md", "table3.csv", "comparisons.csv", "evaluation.json", "per_class_top1_err.json",
                          "table3.png"):
                    if (t / f).exists():
                        client.log_artifact(rid, str(t / f))
            mlflow.set_tracking_uri(uri)
            with mlflow.start_run(run_id=rid):
                mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "table3.json")
            # the headline numbers on the ensemble's run too: comparing ensembles is one column in the runs table
            headline = [Metric(f"table3/{e}_err/models_{r['models']}/crops_{r['crops']}", r[f"{e}_err"], now, 0)
                        for r in rows if r["rule"] == "mean" for e in ("top1", "top5")]
            client.log_batch(parent.info.run_id, metrics=headline)
            client.set_tag(parent.info.run_id, "table3_run_id", rid)
            client.set_terminated(rid, "FINISHED")  # (last: nothing after it can fail the finished run)
            url = f"{uri.rstrip('/')}/#/experiments/{parent.info.experiment_id}/runs/{rid}"
            log(md)
            log(f"MLflow evaluation run: {url}")
            if budget:
                log(f"evaluate: budget: done in {(time.perf_counter() - started) / 60:.1f} min of {budget_minutes:g} "
                    f"(estimated {budget['estimate_s'] / 60:.1f})")
        except BaseException as e:
            end_runs(client, [rid], e)
            stop = stop_of(e)
            if stop is not None and stop is not e:  # (wrapped by a C extension on the way)
                raise stop from None
            raise
        return {"run_id": rid, "rows": rows, "singles": singles, "summary": summary, "comparisons": comparisons,
                "url": url, "crops_per_s": crops_done / wall, "markdown": md, "skipped": skipped, "keys": keys,
                "offset": offset, "ranking": ranking, "selection": selection}
