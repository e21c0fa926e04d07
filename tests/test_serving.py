"""The ensemble pyfunc on what users send: request images prepared exactly as the shard job prepares a
file, bounded work per request, every invalid row named, an empty frame answered; the alias set on
registration; `python -m pipeline.predict` for files without a server. A real pyfunc (two GoogLeNets,
random weights) through real DALI crops, a real MLflow server for the registry."""

import io
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, declared_size_jpeg, jpeg_bytes, png16_bytes
from PIL import Image

from pipeline.model.googlenet import GoogLeNet, without_aux
from pipeline.serving import COLUMNS, LATEST_ALIAS, EnsembleModel, log_ensemble_model, save_ensemble_model
from pipeline.shards.sources import prepare_image_bytes

CLASSES = [f"class-{i}" for i in range(10)]


def replicas(n=2):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        net = GoogLeNet(len(CLASSES), variant="bn")
        # Random weights with fresh batch-norm statistics give the same answer for every image (the
        # activations vanish): take the statistics of a batch, as training would, so answers differ.
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        with torch.no_grad():
            net.train()(torch.rand(16, 3, 32, 32))
        state = net.state_dict()
        out.append(SimpleNamespace(index=i, strategy="inception", variant="bn", state_dict=state))
    return out


def ensemble_dir(d, max_side=None):
    d.mkdir(parents=True, exist_ok=True)
    reps = replicas()
    for r in reps:
        torch.save(without_aux(r.state_dict), d / f"replica-{r.index}.pt")
    (d / "meta.json").write_text(json.dumps({
        "classes": CLASSES, "input_size": 32, "crops": [1, 10, 144], "max_side": max_side,
        "replicas": [{"index": r.index, "strategy": r.strategy, "variant": r.variant, "file": f"replica-{r.index}.pt"}
                     for r in reps]}))
    return d


def loaded(d) -> EnsembleModel:
    m = EnsembleModel()
    m.load_context(SimpleNamespace(artifacts={"ensemble": str(d)}))
    return m


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return loaded(ensemble_dir(tmp_path_factory.mktemp("ens") / "ensemble"))


def probs(model, images, crops=10):
    out = model.predict(None, pd.DataFrame({"image": images}), {"crops": crops, "top_k": 3})
    return torch.tensor(list(out["probabilities"]))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def request_kinds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    alpha = np.zeros((48, 64), np.uint8)
    alpha[:, 32:] = 255  # the left half transparent
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    return {
        "rgba png": encoded(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
        "cmyk jpeg": encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
        "16-bit png": png16_bytes()[0],
        "palette png with transparency": encoded(Image.fromarray(rgb).quantize(16), "PNG", transparency=0),
        "exif-rotated jpeg": encoded(Image.fromarray(rgb), "JPEG", quality=90, exif=exif),
        "grayscale png": encoded(Image.fromarray(rgb[..., 0]), "PNG"),
    }


@pytest.mark.parametrize("kind", list(request_kinds()))
def test_a_request_image_gives_what_the_same_file_sharded_gives(model, kind):
    """The pyfunc prepares each image as the shard job stores the same file: identical probabilities."""
    raw = request_kinds()[kind]
    sharded = prepare_image_bytes(raw).jpg  # what the shard job stores for this file
    assert torch.equal(probs(model, [raw]), probs(model, [sharded])), kind


def test_the_shards_max_side_applies_to_request_images(tmp_path):
    model = loaded(ensemble_dir(tmp_path / "ensemble", max_side=64))
    raw = jpeg_bytes(size=(200, 100), seed=5)
    sharded = prepare_image_bytes(raw, max_side=64).jpg
    assert torch.equal(probs(model, [raw]), probs(model, [sharded]))
    assert not torch.equal(probs(model, [raw]), probs(loaded(ensemble_dir(tmp_path / "plain")), [raw]))


def test_different_images_get_different_answers(model):
    """(What the comparisons here rest on: this model's answers tell images apart, small changes too.)"""
    a = jpeg_bytes(seed=1)
    b = encoded(Image.open(io.BytesIO(a)), "JPEG", quality=80)  # the same picture, re-encoded
    pa, pb = probs(model, [a]), probs(model, [b])
    assert (pa - pb).abs().max() > 1e-4 and (pa - probs(model, [jpeg_bytes(seed=2)])).abs().max() > 1e-3


def test_a_shard_image_is_answered_as_is(model):
    """A grayscale JPEG (what the Fashion-MNIST shards hold) is not re-encoded: the bytes evaluation
    decoded are the bytes the model answers on (the answer equals evaluation's: test_mlflow_ux), where
    the shard job's own rule would have re-encoded it as an RGB JPEG, with other pixels and answers."""
    gray = jpeg_bytes((28, 28), mode="L", seed=7)
    assert prepare_image_bytes(gray, keep_gray_jpeg=True).jpg == gray
    reencoded = prepare_image_bytes(gray).jpg
    assert reencoded != gray and not torch.equal(probs(model, [gray]), probs(model, [reencoded]))


def test_an_empty_frame_gives_an_empty_result(model):
    out = model.predict(None, pd.DataFrame({"image": []}), {"crops": 144})
    assert list(out.columns) == COLUMNS and len(out) == 0


def test_invalid_rows_are_named_and_none_is_answered(model):
    good = jpeg_bytes(seed=1)
    truncated = good[: len(good) // 2]
    frame = pd.DataFrame({"image": [good, b"this is not an image", "@@not base64@@", truncated,
                                    declared_size_jpeg(12000, 12000), good]})
    with pytest.raises(ValueError) as e:
        model.predict(None, frame, {"crops": 10})
    msg = str(e.value)
    assert msg.startswith("4 of 6 image(s) refused, none answered"), msg
    assert "row 1: not a decodable image" in msg and "row 2: not base64" in msg, msg
    assert "row 3: truncated or corrupt JPEG" in msg and "row 4: 12000x12000 pixels" in msg, msg
    assert "row 0" not in msg and "row 5" not in msg


def test_a_corrupt_jpeg_or_another_format_is_refused_per_row(model):
    """A JPEG with a valid header and end marker but corrupt compressed data (which DALI decodes with only
    a printed warning, into grey blocks) and an EPS file (whose plugin would run Ghostscript on the
    client's bytes) are refused, each row named with its reason; the good rows alone are answered."""
    from test_image_inputs import corrupt_jpeg, other_formats

    good = jpeg_bytes(seed=1)
    frame = pd.DataFrame({"image": [good, corrupt_jpeg(), other_formats()["EPS"], corrupt_jpeg(progressive=True)]})
    with pytest.raises(ValueError) as e:
        model.predict(None, frame, {"crops": 1})
    msg = str(e.value)
    assert msg.startswith("3 of 4 image(s) refused, none answered"), msg
    assert "row 1: truncated or corrupt JPEG: ValueError: Corrupt JPEG data" in msg, msg
    assert "row 2: EPS images are not accepted (accepted formats: JPEG, PNG, WEBP, BMP, TIFF, GIF)" in msg, msg
    assert "row 3: truncated or corrupt JPEG" in msg and "row 0" not in msg, msg
    assert len(probs(model, [good], crops=1)) == 1


def test_a_request_over_the_image_cap_is_refused(model, monkeypatch):
    monkeypatch.setenv("INCEPTION_SERVE_MAX_IMAGES", "2")
    with pytest.raises(ValueError, match=r"3 images in one request; at most 2 \(INCEPTION_SERVE_MAX_IMAGES\)"):
        model.predict(None, pd.DataFrame({"image": [jpeg_bytes(seed=i) for i in range(3)]}), {"crops": 1})
    monkeypatch.setenv("INCEPTION_SERVE_MAX_IMAGES", "zero")
    with pytest.raises(ValueError, match="INCEPTION_SERVE_MAX_IMAGES='zero': expected a whole number"):
        model.predict(None, pd.DataFrame({"image": [jpeg_bytes()]}), {"crops": 1})


def test_crops_in_chunks_give_the_same_answer(model, monkeypatch):
    images = [jpeg_bytes(size=(64 + 8 * i, 48), seed=i) for i in range(5)]
    whole = probs(model, images, crops=10)
    monkeypatch.setenv("INCEPTION_SERVE_CROP_CHUNK", "10")  # one image at a time
    assert torch.allclose(probs(model, images, crops=10), whole, atol=1e-5)


def save_local_model(path):
    save_ensemble_model(path, replicas(), CLASSES, 32)


def predict_cmd(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.predict", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_the_model_is_logged_as_code_and_loads_with_the_code_it_carries(tmp_path, caplog):
    """Models-from-code: the pyfunc is a code file naming its class, not a CloudPickle of a Python object
    (MLflow warns about those: unpickling can run arbitrary code); another process, started elsewhere,
    loads it and answers with the code the model carries."""
    import logging

    import yaml

    mlflow_logger = logging.getLogger("mlflow")  # (MLflow's logger does not propagate to the root's)
    mlflow_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="mlflow"):
            save_local_model(tmp_path / "model")
    finally:
        mlflow_logger.removeHandler(caplog.handler)
    assert "mlflow" in caplog.text and "CloudPickle" not in caplog.text, caplog.text
    flavor = yaml.safe_load((tmp_path / "model" / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model", flavor
    assert not list((tmp_path / "model").rglob("*.pkl"))
    code = ("import sys, json, importlib.metadata as md, mlflow.pyfunc, pandas as pd, torch; "
            "before = set(sys.modules); m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(m.predict(pd.DataFrame({'image': [open(sys.argv[2], 'rb').read()]}), params={'crops': 1})"
            "['label'][0], sys.modules['pipeline'].__file__); pd_ = md.packages_distributions(); "
            "print(json.dumps({k: pd_[k] for k in {m.split('.')[0] for m in set(sys.modules) - before} if k in pd_}))")
    img = tmp_path / "a.jpg"
    img.write_bytes(jpeg_bytes(seed=3))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-P", "-c", code, str(tmp_path / "model"), str(img)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    first, imported = p.stdout.splitlines()[-2:]
    label, module = first.split()
    assert label in CLASSES and module.startswith(str(tmp_path / "model" / "code" / "pipeline")), p.stdout

    # requirements.txt: pinned, installable, and enough: every module the model's process imported to load
    # and answer (a JPEG), beyond what MLflow and torch import themselves, comes from a package named there
    # or installed with one named there
    reqs = (tmp_path / "model" / "requirements.txt").read_text().split()
    assert all("==" in r for r in reqs) and "inception-pipeline" not in "".join(reqs), reqs
    named = {r.split("==")[0] for r in reqs}
    assert {"mlflow", "torch", "pillow", "numpy", "simplejpeg"} <= named and any(n.startswith("nvidia-dali") for n in named)
    covered = with_dependencies(named)
    missing = {module: dists for module, dists in json.loads(imported).items()  # (a namespace: any one of them)
               if not {norm(d) for d in dists} & (covered | {"inception-pipeline"})}
    assert not missing, (missing, reqs)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def with_dependencies(names: set[str]) -> set[str]:
    """The distributions `names` install: themselves and their requirements, recursively, with the extras
    a requirement asks for (`cuda-toolkit[cupti]`)."""
    import importlib.metadata as md

    seen, todo = set(), [(name, ()) for name in names]
    while todo:
        name, extras = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        key = norm(dist.metadata["Name"])
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        for req in dist.requires or []:
            wanted = re.search(r"extra\s*==\s*['\"]([^'\"]+)", req)
            if wanted and wanted.group(1) not in extras:
                continue
            m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", req)
            todo.append((m.group(1), tuple(sorted(e.strip() for e in (m.group(2) or "").split(",") if e.strip()))))
    return {key for key, _ in seen}


def test_predict_command_answers_each_file(tmp_path):
    save_local_model(tmp_path / "model")
    good, bad = tmp_path / "photo.png", tmp_path / "notes.txt"
    good.write_bytes(request_kinds()["rgba png"])
    bad.write_text("not an image")
    p = predict_cmd(str(good), str(bad), str(tmp_path / "missing.jpg"), "--model", str(tmp_path / "model"),
                    "--crops", "10", "--top-k", "3")
    assert p.returncode == 1, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"{good}: class-") and len(lines) == 4, p.stdout
    assert all(ln.strip().endswith(tuple(CLASSES)) and "%" in ln for ln in lines[1:])
    assert f"{bad}: not answered: not a decodable image" in p.stderr, p.stderr
    assert f"{tmp_path / 'missing.jpg'}: not answered:" in p.stderr and "Traceback" not in p.stderr
    h = predict_cmd("--help")
    assert h.returncode == 0 and "--crops" in h.stdout and "latest-complete" in h.stdout


def test_registration_sets_the_alias_and_the_command_uses_it(mlflow_server, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment("serving-alias")
    run = client.create_run(exp)
    version = log_ensemble_model(mlflow_server, run.info.run_id, replicas(), CLASSES, 32, "serving-test")
    assert client.get_model_version_by_alias("serving-test", LATEST_ALIAS).version == version
    img = tmp_path / "a.jpg"
    img.write_bytes(jpeg_bytes(seed=3))
    p = predict_cmd(str(img), "--model", f"models:/serving-test@{LATEST_ALIAS}", "--mlflow-uri", mlflow_server,
                    "--crops", "1")
    assert p.returncode == 0 and p.stdout.startswith(f"{img}: class-"), (p.stdout, p.stderr[-2000:])
    p = predict_cmd(str(img), "--model", "models:/serving-test@no-such-alias", "--mlflow-uri", mlflow_server)
    assert p.returncode == 2 and p.stderr.startswith("error: cannot load models:/serving-test@no-such-alias")
    assert "Traceback" not in p.stderr


def test_a_resubmission_that_finds_its_version_registered_moves_the_alias(mlflow_server):
    """A driver stopped after registering its ensemble but before moving `@latest-complete`, then
    resubmitted: it finds its version by the registry's tag (no second registration) and moves the alias."""
    import mlflow

    from pipeline.config import load_recipe
    from pipeline.train.ensemble import register_ensemble

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment("serving-resubmit")
    client.create_registered_model("resubmit")
    older, run_id = (client.create_run(exp).info.run_id for _ in range(2))
    v1 = client.create_model_version("resubmit", f"runs:/{older}/ensemble", older).version
    # what the stopped driver left: its version registered (tagged with its run), the alias not moved yet
    v2 = client.create_model_version("resubmit", f"runs:/{run_id}/ensemble", run_id,
                                     tags={"ensemble_run_id": run_id}).version
    client.set_registered_model_alias("resubmit", LATEST_ALIAS, v1)
    cfg = load_recipe("demo", ["tracking.register_ensemble=resubmit"])
    assert register_ensemble(client, mlflow_server, run_id, cfg, train=None, log=lambda *_: None) == v2
    assert client.get_model_version_by_alias("resubmit", LATEST_ALIAS).version == v2
    assert client.get_run(run_id).data.tags["ensemble_model_version"] == v2
    assert len(client.search_model_versions("name = 'resubmit'")) == 2  # not registered again


@pytest.mark.slow
def test_the_serving_benchmark_answers_valid_requests_and_refuses_bad_rows_with_400(tmp_path):
    """A short run of benchmarks/serving.py: `mlflow models serve` under 3 concurrent clients (two crashed
    the server with SIGSEGV before predictions were serialised), every valid
    request answered (200), every request with a bad row refused (400), nothing else (5xx, resets)."""
    out = tmp_path / "serving.json"
    p = subprocess.run([sys.executable, "benchmarks/serving.py", "--seconds", "4", "--rounds", "1", "--clients", "3",
                        "--crops", "1,10", "--small", "--invalid-every", "2", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    full = json.loads(out.read_text())
    assert not full["server_died"]
    res = full["crops"]
    for crops in ("1", "10"):
        answers = res[crops]["answers"]
        assert res[crops]["failures"] == 0, answers
        assert answers.get("valid -> 200", 0) > 0, answers
        assert any(k.startswith("invalid: ") for k in answers), answers
        assert all(k.endswith("-> 400") for k in answers if k.startswith("invalid: ")), answers
        assert all(k.endswith("-> 200") for k in answers if k.startswith("valid")), answers
    assert "images/s" in p.stdout and "peak RSS" in p.stdout
