"""The evaluation job: a trained ensemble x crop schemes -> Table 3, logged to MLflow.

Replicas' final (Polyak) weights come from the ensemble run's children (`weights_only` loads). Images
are split over Ray tasks (each a rank of the DALI eval loader: every image exactly once); each task
loads every model once and runs the largest crop scheme asked for, keeping per-crop softmax
probabilities only for the batch in hand, so the smaller schemes' rows come from the same pass.
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

from pipeline.evaluate.ensemble import PAPER_TABLE3, Table3Accumulator
from pipeline.tracking import TrackingError, require_server, resolve_uri


class EvaluationError(Exception):
    pass


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


def evaluate_rank(replicas: list[Replica], split_dir: str, rank: int, world: int, largest: int, schemes: list[int],
                  model_counts: list[int], batch_size: int, device: str, limit: int | None) -> dict:
    """One rank's share of the split through every model; returns its accumulator and timings."""
    from pipeline.data.dali import DALIEvalLoader, Normalizer, resolve_device
    from pipeline.model.googlenet import GoogLeNet

    dev_kind = resolve_device(device)
    dev = torch.device("cuda" if dev_kind == "gpu" else "cpu")
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    models = []
    for r in replicas:
        m = GoogLeNet(r.num_classes, variant=r.variant, aux_logits=False)
        m.load_state_dict({k: v for k, v in r.state_dict.items() if not k.startswith(("aux1.", "aux2."))})
        models.append(m.to(dev, memory_format=fmt).eval())
    size = replicas[0].input_size
    ranking = sorted(range(len(replicas)), key=lambda i: replicas[i].val_top1_err)
    acc = Table3Accumulator(ranking, model_counts, schemes, largest)
    normalize = Normalizer(dev)
    loader = DALIEvalLoader(split_dir, n_crops=largest, input_size=size, batch_size=batch_size, rank=rank,
                            world_size=world, device=dev_kind, limit=limit)
    t0, done, model_s = time.perf_counter(), 0, 0.0
    total = len(loader.source.range)
    for x, y in loader:
        b, k = x.shape[:2]
        x = normalize(x.reshape(b * k, 3, size, size)).contiguous(memory_format=fmt)
        t1 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            probs = torch.stack([m(x).float().softmax(-1).reshape(b, k, -1) for m in models])  # [M, B, K, C]
        model_s += time.perf_counter() - t1
        acc.add(probs.cpu(), y)
        done += b
        elapsed = time.perf_counter() - t0
        rate = done * k * len(models) / elapsed
        print(f"[evaluate rank {rank}/{world}] {done}/{total} images | {rate:,.0f} crops/s | "
              f"eta {(total - done) * k * len(models) / max(rate, 1e-9):,.0f}s", flush=True)
    return {"acc": acc, "seconds": time.perf_counter() - t0, "model_seconds": model_s,
            "crops": done * largest * len(models), "skipped": loader.skipped}


def markdown_table(rows: list[dict], singles: dict, replicas: list[Replica], split: str) -> str:
    lines = [f"# Table 3, reproduced ({split}, {rows[0]['images']} images)", "",
             "| models | crops | rule | cost | top-1 error | top-5 error | delta top-5 vs base |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['models']} | {r['crops']} | {r['rule']} | {r['cost']} | {r['top1_err']:.2%} | "
                     f"{r['top5_err']:.2%} | {r['delta_top5']:+.2%} |")
    lines += ["", "Single replicas (mean +- std over the replicas):", "",
              "| crops | top-1 error | top-5 error |", "|---:|---:|---:|"]
    for n, s in singles.items():
        lines.append(f"| {n} | {s['top1_mean']:.2%} +- {s['top1_std']:.2%} | {s['top5_mean']:.2%} +- {s['top5_std']:.2%} |")
    lines += ["", "Replicas (1-model rows use the best by single-crop val top-1 error): "
              + ", ".join(f"{r.index}:{r.strategy} ({r.val_top1_err:.2%})" for r in replicas), "",
              "## For reference: the paper's Table 3 (ImageNet 2014 validation, GoogLeNet; not comparable data)",
              "", "| models | crops | cost | top-5 error |", "|---:|---:|---:|---:|"]
    lines += [f"| {m} | {c} | {m * c} | {e:.2f}% |" for m, c, e in PAPER_TABLE3]
    return "\n".join(lines) + "\n"


def chart_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for rule, marker in (("mean", "o"), ("max", "x")):
        for m in sorted({r["models"] for r in rows}):
            pts = sorted((r["cost"], r["top5_err"] * 100) for r in rows if r["models"] == m and r["rule"] == rule)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{m} model(s), {rule}")
    ax.set_xscale("log")
    ax.set_xlabel("cost (forward passes per image)")
    ax.set_ylabel("top-5 error (%)")
    ax.set_title("Error vs cost (Table 3)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_evaluation(ensemble: str = "latest", split: str = "val", crops: list[int] | None = None,
                   models: list[int] | None = None, limit: int | None = None, batch_size: int = 8,
                   workers: int = 1, device: str = "auto", shards: str | None = None, mlflow_uri: str | None = None,
                   experiment: str = "inception-pipeline", log=print) -> dict:
    import mlflow
    import ray

    from pipeline.data.shards import ShardError, open_split

    crops = sorted(set(crops or [1, 10, 144]))
    uri = resolve_uri(mlflow_uri)
    if not uri:
        raise TrackingError("no MLflow tracking server: set MLFLOW_TRACKING_URI or --mlflow-uri")
    require_server(uri)
    for n in crops:
        if n not in (1, 10, 144):
            raise EvaluationError(f"--crops: {n} is not a crop scheme; use 1, 10 and/or 144")
    if batch_size < 1 or workers < 1 or (limit is not None and limit < 1):
        raise EvaluationError("--batch-size, --workers and --limit must be positive")
    client = mlflow.MlflowClient(uri)
    parent = resolve_ensemble(client, experiment, ensemble)
    with tempfile.TemporaryDirectory() as tmp:
        replicas = load_replicas(client, parent, Path(tmp))
    model_counts = sorted(set(models or [1, len(replicas)]))
    if model_counts[-1] > len(replicas) or model_counts[0] < 1:
        raise EvaluationError(f"--models {model_counts}: the ensemble has {len(replicas)} finished replicas")
    shards_dir = Path(shards or parent.data.params.get("data.shards", ""))
    try:
        info = open_split(shards_dir / split)
    except ShardError as e:
        raise EvaluationError(f"split '{split}': {e}") from None
    for r in replicas:
        if r.num_classes != len(info.classes):
            raise EvaluationError(f"replica {r.index} predicts {r.num_classes} classes but {info.dir} has "
                                  f"{len(info.classes)}")
    if len({(r.variant, r.input_size) for r in replicas}) != 1:
        raise EvaluationError("replicas differ in variant or input size; evaluate them separately")

    largest = max(crops)
    log(f"evaluate: ensemble {parent.info.run_name} ({parent.info.run_id}), {len(replicas)} replicas, split {split} "
        f"({limit or info.num_samples} images), crops {crops}, models {model_counts}, {workers} workers")
    if not ray.is_initialized():
        ray.init(log_to_driver=True, configure_logging=False)
    if device == "auto":  # decided by the cluster, not by this driver's machine
        device = "gpu" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    task = ray.remote(num_cpus=1, num_gpus=1 if device == "gpu" else 0)(evaluate_rank)
    reps_ref = ray.put(replicas)
    t0 = time.perf_counter()
    results = ray.get([task.remote(reps_ref, str(info.dir), r, workers, largest, crops, model_counts, batch_size,
                                   device, limit) for r in range(workers)])
    wall = time.perf_counter() - t0
    acc = results[0]["acc"]
    for r in results[1:]:
        acc.merge(r["acc"])
    rows = acc.table()
    singles = acc.single_summary()
    crops_done = sum(r["crops"] for r in results)
    skipped = [s for r in results for s in r["skipped"]]
    ranked = [replicas[i] for i in acc.ranking]
    log(f"{'models':>6} {'crops':>5} {'rule':>5} {'cost':>5} {'top-1 err':>10} {'top-5 err':>10} {'delta top-5':>12}")
    for r in rows:
        log(f"{r['models']:>6} {r['crops']:>5} {r['rule']:>5} {r['cost']:>5} {r['top1_err']:>10.2%} "
            f"{r['top5_err']:>10.2%} {r['delta_top5']:>+12.2%}")
    for n, s in singles.items():
        log(f"single replicas, {n} crops: top-1 err {s['top1_mean']:.2%} +- {s['top1_std']:.2%}")
    log(f"{crops_done:,} crops in {wall:,.1f}s ({crops_done / wall:,.0f} crops/s)")

    run = client.create_run(parent.info.experiment_id, run_name=f"evaluate-{split}-{'-'.join(map(str, crops))}",
                            tags={"mlflow.parentRunId": parent.info.run_id, "kind": "evaluation",
                                  "ensemble": parent.data.tags.get("ensemble", "")})
    rid = run.info.run_id
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    # MLflow metric names may not contain "=": eval/top1_err/models_7/crops_144 (rule max: .../max)
    metrics = [Metric(f"eval/{e}_err/models_{r['models']}/crops_{r['crops']}" + ("" if r["rule"] == "mean" else "/max"),
                      r[f"{e}_err"], now, 0) for r in rows for e in ("top1", "top5")]
    metrics += [Metric("eval/crops_per_s", crops_done / wall, now, 0), Metric("eval/skipped_images", len(skipped), now, 0)]
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in {
        "split": split, "crops": crops, "models": model_counts, "limit": limit, "batch_size": batch_size,
        "workers": workers, "device": device, "shards": str(shards_dir), "ranking": [r.index for r in ranked]}.items()])
    md = markdown_table(rows, singles, ranked, split)
    per_class = acc.rows[(model_counts[-1], largest, "mean")]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "table3.md").write_text(md)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        (t / "table3.csv").write_text(buf.getvalue())
        (t / "per_class_top1_err.json").write_text(json.dumps(
            {info.classes[c]: 1 - per_class.per_class_top1[c] / n for c, n in sorted(per_class.per_class_n.items())},
            indent=1))
        chart_png(rows, t / "table3.png")
        for f in ("table3.md", "table3.csv", "per_class_top1_err.json", "table3.png"):
            client.log_artifact(rid, str(t / f))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=rid):
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "table3.json")
    client.set_terminated(rid, "FINISHED")
    url = f"{uri.rstrip('/')}/#/experiments/{parent.info.experiment_id}/runs/{rid}"
    log(f"MLflow evaluation run: {url}")
    return {"run_id": rid, "rows": rows, "singles": singles, "url": url, "crops_per_s": crops_done / wall,
            "markdown": md, "skipped": skipped}
