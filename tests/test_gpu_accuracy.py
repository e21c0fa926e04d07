"""The GPU accuracy runner's CPU side (benchmarks/gpu/accuracy.py): its budget arithmetic on small
inputs, clear refusals of bad arguments, and the whole device path (shard, measure, calibrate, fit the
epochs, resume, evaluate, write) run at tiny sizes on this CPU with --smoke."""

import csv
import importlib.util
import json
import math
import random
import subprocess
import sys

import pytest
from conftest import FASHION_MNIST_ROOT, REPO

RUNNER = REPO / "benchmarks" / "gpu" / "accuracy.py"


def _budget():
    spec = importlib.util.spec_from_file_location("gpu_budget", REPO / "benchmarks" / "gpu" / "budget.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


budget = _budget()


def calib(epoch=20.0, overhead=5.0, startup=10.0):
    return [{"epoch_s": epoch, "overhead_s": overhead, "startup_s": startup}]


def test_calibration_epochs_are_those_whose_rates_ignore_the_length():
    assert budget.calibration_epochs("step", 2) == 1
    assert budget.calibration_epochs("cosine", 1) == 1 and budget.calibration_epochs("cosine", 2.0) == 2
    for bad in (0, 0.3, 1.5):
        with pytest.raises(budget.BudgetError, match="whole number"):
            budget.calibration_epochs("cosine", bad)


def test_fit_epochs_one_wave_by_hand():
    # available = 400 - 50 - 60 - 20 = 270; first wave: 5 + (E - 1) * 20 <= 270 -> E = 14 (265 s), 15 needs 285 s
    plan = budget.fit_epochs(400, 50, 60, 20, calib(), replicas=7, concurrent=7, calib_epochs=1, max_epochs=40)
    assert plan["epochs"] == 14 and plan["waves"] == 1 and plan["fits"] and not plan["capped"]
    assert plan["predicted_train_s"] == pytest.approx(265) and plan["predicted_end_s"] == pytest.approx(395)


def test_fit_epochs_later_waves_and_limits():
    # 7 replicas, 3 at a time: 3 waves; E epochs cost 5 + (E - 1) 20 + 2 (10 + 5 + 20 E) = 60 E + 15
    plan = budget.fit_epochs(400, 50, 60, 20, calib(), replicas=7, concurrent=3, calib_epochs=1, max_epochs=40)
    assert plan["waves"] == 3 and plan["epochs"] == 4 and plan["predicted_train_s"] == pytest.approx(255)
    capped = budget.fit_epochs(10_000, 0, 0, 0, calib(), 7, 7, 1, max_epochs=6)
    assert capped["epochs"] == 6 and capped["capped"] and capped["fits"]
    short = budget.fit_epochs(100, 50, 60, 20, calib(), 7, 7, 1, 40)
    assert short["epochs"] == 1 and not short["fits"]  # only the calibration epoch; the deadline then rules
    with pytest.raises(budget.BudgetError, match="calibration"):
        budget.fit_epochs(400, 0, 0, 0, [], 7, 7, 1, 40)


def test_fit_epochs_is_the_longest_that_fits():
    rng = random.Random(0)
    for _ in range(500):
        c = [{"epoch_s": rng.uniform(0.5, 60), "overhead_s": rng.uniform(0, 20), "startup_s": rng.uniform(0, 20)}
             for _ in range(rng.randint(1, 7))]
        reps, conc, ce = 7, rng.randint(1, 7), rng.randint(1, 2)
        args = (rng.uniform(60, 900), rng.uniform(0, 60), rng.uniform(0, 120), rng.uniform(0, 30), c, reps, conc, ce, 40)
        plan = budget.fit_epochs(*args)
        e, waves = plan["epochs"], math.ceil(reps / conc)
        ep, oh, st = (max(x[k] for x in c) for k in ("epoch_s", "overhead_s", "startup_s"))

        def need(n, oh=oh, st=st, ep=ep, ce=ce, waves=waves):
            return (0 if n == ce else oh + (n - ce) * ep) + (waves - 1) * (st + oh + n * ep)

        assert ce <= e <= 40 and plan["predicted_train_s"] == pytest.approx(need(e))
        if e > ce:
            assert need(e) <= plan["available_train_s"] + 1e-9
        if e < 40:
            assert need(e + 1) > plan["available_train_s"]


def test_eval_estimate_recovers_startup_and_per_image_cost():
    est = budget.eval_estimate(64, 3 + 64 * 0.01, 192, 3 + 192 * 0.01, 10_000, safety=1.0)
    assert est["startup_s"] == pytest.approx(3) and est["per_image_s"] == pytest.approx(0.01)
    assert est["seconds"] == pytest.approx(103)
    noisy = budget.eval_estimate(64, 5.0, 192, 4.0, 10_000, safety=1.0)  # second pass faster: slope kept > 0
    assert noisy["per_image_s"] == pytest.approx(0.25 * 4.0 / 192)


def run(*args, timeout=120):
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.mark.parametrize("args, message", [
    (["--budget-s", "0"], "--budget-s must be positive, got 0"),
    (["--budget-s", "nan"], "--budget-s must be positive"),
    (["--concurrent", "0"], "--concurrent must be positive"),
    (["--root", "/nonexistent/fashion-mnist"], "--root /nonexistent/fashion-mnist: not a folder"),
    (["--set", "data.input_size=16"], "data.input_size: GoogLeNet needs >= 32 px"),
    (["--set", "nosuch.field=1"], "nosuch.field: unknown section"),
    (["--epochs", "1"], "leave nothing after the 1.0 warm-up epoch"),
    (["--recipe", "demo", "--max-epochs", "3"], "whole number (>= 1) of warm-up epochs"),
])
def test_bad_arguments_are_refused_with_a_message(tmp_path, args, message):
    p = run("--out", str(tmp_path / "out"), *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_root_without_the_dataset_files_names_them(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    p = run("--out", str(tmp_path / "out"), "--root", str(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "missing train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in p.stderr


def test_help_states_defaults():
    p = run("--help")
    assert p.returncode == 0 and "--budget-s" in p.stdout and "(default: 420)" in p.stdout


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="needs the Fashion-MNIST .gz files")
def test_smoke_runs_the_device_path_on_cpu(tmp_path):
    """Budget mode, as on the device: the first wave calibrates, the fit is capped at 2 epochs, the first
    wave resumes from its checkpoints, all 7 replicas are evaluated with 1/10/144 crops."""
    out = tmp_path / "out"
    p = run("--smoke", "--budget-s", "1200", "--max-epochs", "2", "--out", str(out), timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "eta" in p.stdout  # progress lines with ETA
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["smoke"]

    # the recipe recorded is the one asked for, and the plan chose the capped 2 epochs from measurements
    rec = res["recipe"]
    assert (rec["name"], rec["epochs"], rec["input_size"], rec["batch_size"]) == ("fashion-mnist-gpu", 2, 32, 16)
    assert rec["schedule"]["shape"] == "cosine" and len(rec["lr_at_epoch_start"]) == 2
    assert rec["lr_at_epoch_start"][0] < rec["lr_at_epoch_start"][1] == rec["lr"]  # warm-up, then the cosine's top
    plan = res["budget"]["plan"]
    assert plan["epochs"] == 2 and plan["capped"] and plan["fits"] and plan["epoch_s"] > 0
    assert res["budget"]["eval_estimate"]["seconds"] > 0
    for key in ("shard_s", "eval_calibration_s", "train_s", "eval_s", "total_s"):
        assert res["timings"][key] > 0

    # every replica trained the epochs asked for; the first wave in two calls (calibration, then resumed)
    reps = res["replicas"]
    assert [r["replica"] for r in reps] == list(range(7)) and all(r["status"] == "done" for r in reps)
    assert all(r["epochs_done"] == 2 and [h["epoch"] for h in r["history"]] == [1, 2] for r in reps)
    assert [c["epochs"] for c in reps[0]["calls"]] == [1, 2] and [c["epochs"] for c in reps[6]["calls"]] == [2]
    curves = read_csv(out / "curves.csv")
    assert len(curves) == 14 and {c["strategy"] for c in curves} >= {"inception", "inception-random-interp"}
    assert all((out / "logs" / f"replica-{i}.log").is_file() for i in range(7))

    # Table 3: 1 and 7 models x 1/10/144 crops, errors in [0, 1] inside their intervals
    rows = read_csv(out / "table3.csv")
    assert {(r["models"], r["crops"]) for r in rows if r["rule"] == "mean"} == \
        {(m, c) for m in ("1", "7") for c in ("1", "10", "144")}
    for r in rows:
        assert int(r["images"]) == 32
        for e in ("top1", "top5"):
            err, lo, hi = (float(r[f"{e}_err{s}"]) for s in ("", "_lo", "_hi"))
            assert 0 <= lo <= err <= hi <= 1
    comps = read_csv(out / "comparisons.csv")
    assert len(comps) == 14  # (3 model + 4 crop comparisons) x top-1/top-5
    for c in comps:
        assert 0 <= float(c["p_mcnemar"]) <= 1 and 0 <= float(c["p_holm"]) <= 1
        assert float(c["diff_lo"]) <= float(c["diff"]) <= float(c["diff_hi"])
    assert len(read_csv(out / "singles.csv")) == 21  # 7 replicas x 3 crop schemes
    report = (out / "report.md").read_text()
    assert report.startswith("# Fashion-MNIST accuracy run (SMOKE on CPU)") and "# Table 3, reproduced" in report
    assert "93.7%" in report and (out / "recipe_used.yaml").is_file() and (out / "timings.csv").is_file()
