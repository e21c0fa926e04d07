"""The accuracy runner's outputs (benchmarks/gpu/accuracy.py): results.json, report.md and CSV files.

Table 3 comes from the evaluation job's own accumulator and Markdown (`pipeline.evaluate`); this module
only lays out what the run measured: the recipe actually used, the budget's plan against what
happened, timings, and each replica's per-epoch history.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

TABLE_SPLIT = "val (Fashion-MNIST t10k, the test set)"


def write_json(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, out / "results.json")  # a reader never sees half a file


def _csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def images_note(n_eval: int, limit_val: int | None, n_val: int, single: int) -> str:
    note = f"samples [0, {n_eval}) of the split"
    trained_val = min(limit_val or n_val, n_val)
    if trained_val:
        note += (f"; training-time validation monitored samples [0, {trained_val}), which OVERLAP: nothing was "
                 f"chosen on them (the number of epochs comes from measured throughput, the 1-model row is "
                 f"replica {single}, fixed in advance)")
    return note


def add_evaluation(results: dict, ev: dict, replicas: list, selection: str, images: str, classes: list[str]) -> None:
    """Table 3, the paired comparisons and the single replicas, from `evaluate_rank`'s accumulator."""
    acc = ev["acc"]
    rows, comparisons = acc.table(), acc.comparisons()
    largest = max(acc.rows, key=lambda k: (k[0], k[1]))
    per_class = acc.rows[(largest[0], largest[1], "mean")]
    results["evaluation"] = {
        "split": TABLE_SPLIT, "images": rows[0]["images"], "images_note": images, "single_model": selection,
        "models": [r.index for r in replicas], "rows": rows, "comparisons": comparisons, "singles": acc.singles(),
        "single_summary": acc.single_summary(), "seconds": ev["seconds"], "model_seconds": ev["model_seconds"],
        "crops": ev["crops"], "forwards": ev["forwards"], "crops_per_s": ev["crops"] / max(ev["seconds"], 1e-9),
        "skipped": ev["skipped"], "images_asked": ev["images_asked"], "stopped": ev["stopped"],
        "per_class_top1_err": {classes[c]: 1 - per_class.per_class_top1[c] / n
                               for c, n in sorted(per_class.per_class_n.items())}}
    best = next(r for r in rows if r["rule"] == "mean" and (r["models"], r["crops"]) == largest[:2])
    ref_err = 1 - results["reference"]["published_top1_acc"]
    results["result"] = {"row": f"{best['models']} models x {best['crops']} crops, rule mean",
                         "top1_err": best["top1_err"], "top1_err_ci95": [best["top1_err_lo"], best["top1_err_hi"]],
                         "top1_acc": 1 - best["top1_err"],
                         "published_err_inside_ci": best["top1_err_lo"] <= ref_err <= best["top1_err_hi"]}


def curves(results: dict) -> list[dict]:
    return [{"replica": r["replica"], "strategy": r["strategy"], **m}
            for r in results["replicas"] for m in r.get("history", [])]


def timings(results: dict) -> list[dict]:
    rows = [{"stage": k[:-2], "seconds": v, "note": ""} for k, v in results["timings"].items()]
    for r in results["replicas"]:
        rows.append({"stage": f"replica-{r['replica']}", "seconds": r.get("wall_s"),
                     "note": f"{r['status']}; {r.get('epochs_done', 0)} epochs; start-up "
                             f"{r.get('startup_s') or 0:.1f}s; calls " + ", ".join(
                                 f"{c['epochs']} epochs {c['seconds']:.1f}s" for c in r.get("calls", []))})
    return rows


def markdown(results: dict, table_md: str) -> str:
    m, rec, b, t = results.get("machine", {}), results["recipe"], results["budget"], results["timings"]
    title = "SMOKE on CPU" if results["smoke"] else m.get("gpu", "?")
    lines = [f"# Fashion-MNIST accuracy run ({title})", "",
             f"{m.get('date', '?')}; torch {m.get('torch')} (CUDA {m.get('cuda')}), DALI {m.get('dali')}, Python "
             f"{m.get('python')}, {m.get('cpus')} CPUs. Status: {results['status']}.", ""]
    res, ref = results.get("result"), results["reference"]
    if res:
        lo, hi = res["top1_err_ci95"]
        lines += ["## Result", "",
                  f"{res['row']}: top-1 error {res['top1_err']:.2%} [95% CI {lo:.2%}, {hi:.2%}], i.e. "
                  f"{res['top1_acc']:.2%} accuracy on {results['evaluation']['images']:,} test images. For "
                  f"comparison, the {ref['what']}: {ref['published_top1_acc']:.1%} accuracy "
                  f"({1 - ref['published_top1_acc']:.1%} error), "
                  + ("inside" if res["published_err_inside_ci"] else "outside") + " this run's interval.", ""]
    lrs = rec.get("lr_at_epoch_start") or []
    lines += ["## Recipe used", "", "| setting | value |", "|---|---|"]
    for k in ("name", "epochs", "max_epochs", "input_size", "batch_size", "lr", "momentum", "weight_decay", "schedule",
              "ema_decay", "label_smoothing", "variant", "replicas", "concurrent", "limit_train", "limit_val",
              "data_device", "sets"):
        lines.append(f"| {k} | {rec.get(k)} |")
    lines.append(f"| lr at each epoch's start | {', '.join(f'{x:.4g}' for x in lrs)} |")
    lines += ["", f"## Budget (mode: {b['mode']})", ""]
    if b["mode"] == "budget":
        est, plan = b.get("eval_estimate", {}), b.get("plan", {})
        passes = ", ".join(f"{p[0]} images in {p[1]:.1f}s" + (f" ({p[2]})" if len(p) > 2 else "")
                           for p in est.get("passes", []))
        lines += [f"- budget {b['budget_s']:,.0f}s from process start; reserve {b.get('reserve_s', 0):,.0f}s; "
                  f"training deadline at {b.get('train_deadline_s', 0):,.0f}s",
                  f"- evaluation estimated at {est.get('seconds', 0):,.0f}s (passes: {passes}), took "
                  f"{t.get('eval_s', 0):,.0f}s",
                  f"- measured per epoch {plan.get('epoch_s', 0):,.1f}s, overhead {plan.get('overhead_s', 0):,.1f}s, "
                  f"start-up {plan.get('startup_s', 0):,.1f}s, {plan.get('waves')} wave(s) -> {plan.get('epochs')} "
                  f"epochs; training predicted {plan.get('predicted_train_s', 0):,.0f}s after calibration "
                  f"(all training took {t.get('train_s', 0):,.0f}s); fits: {plan.get('fits')}", ""]
    lines += ["## Timings", "", "| stage | seconds | note |", "|---|---:|---|"]
    for r in timings(results):
        secs = "" if r["seconds"] is None else f"{r['seconds']:,.1f}"
        lines.append(f"| {r['stage']} | {secs} | {r['note']} |")
    lines += ["", "## Replicas (last epoch)", "",
              "| replica | strategy | status | epochs | train loss | train top-1 err | training-time val top-1 err "
              "| images/s |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in results["replicas"]:
        h = (r.get("history") or [{}])[-1]
        cells = [h.get(k) for k in ("train/loss", "train/top1_err", "val/top1_err", "data/images_per_s")]
        cells = ["" if c is None else f"{c:,.4g}" for c in cells]
        lines.append(f"| {r['replica']} | {r['strategy']} | {r['status']} | {r.get('epochs_done', 0)} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Per-epoch curves: curves.csv (and results.json, replicas[].history).", "", table_md]
    return "\n".join(lines) + "\n"


def write_all(out: Path, results: dict, replicas: list, table_md: str, cfg_dict: dict) -> None:
    import yaml

    ev = results["evaluation"]
    _csv(out / "table3.csv", ev["rows"])
    _csv(out / "comparisons.csv", ev["comparisons"])
    _csv(out / "singles.csv", ev["singles"])
    _csv(out / "curves.csv", curves(results))
    _csv(out / "timings.csv", timings(results))
    sections = {k: v for k, v in cfg_dict.items() if k != "recipe"}
    (out / "recipe_used.yaml").write_text(f"# The recipe this run trained ({cfg_dict.get('recipe')} with the runner's "
                                          "settings); loadable with pipeline.config.load_recipe.\n"
                                          + yaml.safe_dump(sections, sort_keys=False))
    try:
        from pipeline.evaluate.run import chart_png

        chart_png(ev["rows"], out / "table3.png")
        results["chart"] = "table3.png"
    except ImportError as e:  # a machine without matplotlib
        results["chart"] = f"not drawn: {e}"
    (out / "report.md").write_text(markdown(results, table_md))
    write_json(out, results)


def summary_lines(results: dict) -> str:
    ev = results["evaluation"]
    lines = [f"{'models':>6} {'crops':>5} {'rule':>5} {'top-1 err [95% CI]':>26} {'top-5 err [95% CI]':>26}"]
    for r in ev["rows"]:
        lines.append(f"{r['models']:>6} {r['crops']:>5} {r['rule']:>5} "
                     f"{r['top1_err']:>9.2%} [{r['top1_err_lo']:.2%}, {r['top1_err_hi']:.2%}] "
                     f"{r['top5_err']:>9.2%} [{r['top5_err_lo']:.2%}, {r['top5_err_hi']:.2%}]")
    for c in ev["comparisons"]:
        lines.append(f"{c['metric']}: {c['a']} vs {c['b']}: {c['diff']:+.2%} [{c['diff_lo']:+.2%}, {c['diff_hi']:+.2%}] "
                     f"McNemar p={c['p_mcnemar']:.2g} (Holm {c['p_holm']:.2g})")
    return "\n".join(lines)
