"""The trained ensemble as one MLflow model: `googlenet-ensemble`, a pyfunc holding the replicas'
Polyak weights and the paper's crop scheme (sec. 7), logged as code (`serving_model.py`, MLflow's
models-from-code: nothing pickled) with the weights as artifacts.

    model = mlflow.pyfunc.load_model("models:/googlenet-ensemble@latest-complete")
    model.predict(pd.DataFrame({"image": [open("cat.jpg", "rb").read()]}), params={"crops": 144, "top_k": 5})

Over HTTP, `make serve` runs `mlflow models serve` on this model at 127.0.0.1:5001 (SERVE_PORT), beside the
local MLflow server on 5000 (MLFLOW_PORT).

Input: a DataFrame with a binary column `image` (encoded JPEG, PNG, WebP, BMP, TIFF or GIF bytes:
`pipeline.shards.sources.IMAGE_FORMATS`, the shard job's list; over HTTP, base64 strings in
`dataframe_split`). Params: `crops` (1, 10 or 144; default 144), `top_k` (default 5). Output, one row
per image: `label` (the top class), `top_k_labels`, `top_k_probs`, `probabilities` (every class, in
`classes` order); an empty frame gives an empty result.

Each image is first prepared as the shard job prepares a file (`prepare_image_bytes`: CMYK, palette,
16-bit and transparent images made RGB the same way, EXIF orientation applied, the shards' `max_side`),
so a request image and the same file sharded give the same crops. One exception: a grayscale JPEG is
kept as it is (DALI decodes it to RGB), as the Fashion-MNIST shards hold them and the answer on a shard
image must be what evaluation scored; the ImageNet shard job re-encodes such a file as an RGB JPEG
(quality 95), so its pixels there differ by that re-encoding (a few levels). The crops are cut by the
evaluation job's own DALI pipeline (`crop_plan`, `build_eval_pipeline`, `assemble_crops`) and the
probabilities averaged as the evaluation's "mean" rule does: softmax per crop, mean over the crops,
then over the models; so a prediction equals what `evaluate_ensemble.py` scores for the same image and
weights.

Bounded work per request (environment variables of the serving process):
- INCEPTION_SERVE_MAX_IMAGES (default 16): more images in one request are refused. `mlflow models
  serve` gives up on a request after MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (60 s by default) while its
  prediction runs on: keep images x crops within what the server answers in that time.
- INCEPTION_SERVE_CROP_CHUNK (default 144): crops per forward pass; images are cut and run in groups
  of max(1, chunk // crops), so memory does not grow with the request (about 10 MiB per crop for the
  paper's 224 px model on a CPU, ~1.4 GiB a request at the default chunk; far less at the demo's 32 px;
  measured by benchmarks/serving_memory.py).
- Files over 64 MiB are refused, and images whose header declares more than 50 MP are refused before
  decoding (baseline JPEGs among them are downscaled while decoding instead where the shards had a
  `max_side`).
- Every request image is decoded in full before it is answered: a JPEG whose compressed data the decoder
  finds corrupt ("Corrupt JPEG data", which decoders otherwise only warn about and fill with grey) is
  refused, as is an image in a format outside the list (named: "EPS images are not accepted ...").
A request with invalid rows (not an image, another format, truncated or corrupt, over a cap; in process,
also not base64) is refused with a ValueError naming each such row and why, and no row is answered.
`mlflow models serve` answers it with HTTP 400 (the rows are named in the error's `stack_trace`); it
decodes base64 itself, and a row that is not base64 gets its own 400.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipeline.config import env_int
from pipeline.tracking import ENSEMBLE_MODEL, pinned_requirements

CROPS = (1, 10, 144)
LATEST_ALIAS = "latest-complete"  # models:/googlenet-ensemble@latest-complete: the newest finished ensemble
MAX_IMAGES_ENV, DEFAULT_MAX_IMAGES = "INCEPTION_SERVE_MAX_IMAGES", 16
CROP_CHUNK_ENV, DEFAULT_CROP_CHUNK = "INCEPTION_SERVE_CROP_CHUNK", 144
COLUMNS = ["label", "top_k_labels", "top_k_probs", "probabilities"]


def prepare_request_images(values, max_side: int | None = None) -> list[bytes]:
    """The request's images as the shard job would store them; a ValueError naming every invalid row."""
    import base64
    import binascii

    from pipeline.shards.sources import MAX_FILE_BYTES, SkipSample, prepare_image_bytes

    out, bad = [], []
    for row, v in enumerate(values):
        try:
            if isinstance(v, str):
                try:
                    data = base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError):
                    raise SkipSample("not base64 (over HTTP, images are base64 strings)") from None
            elif isinstance(v, (bytes, bytearray, memoryview)):
                data = bytes(v)
            else:
                raise SkipSample(f"expected encoded image bytes, got {type(v).__name__}")
            if len(data) > MAX_FILE_BYTES:
                raise SkipSample(f"{len(data):,} bytes, the cap is {MAX_FILE_BYTES:,}")
            out.append(prepare_image_bytes(data, max_side=max_side, full_decode=True, keep_gray_jpeg=True).jpg)
        except SkipSample as e:
            bad.append(f"row {row}: {e}")
    if bad:
        raise ValueError(f"{len(bad)} of {len(out) + len(bad)} image(s) refused, none answered: " + "; ".join(bad))
    return out


def ensemble_probs(models: list, images: list[bytes], n_crops: int, input_size: int, device: str = "auto",
                   batch_size: int = 8, channels_last: bool = True):
    """Class probabilities [B, C] of the ensemble on encoded images: the evaluation's crops and rule,
    `batch_size` images at a time."""
    import torch

    from pipeline.data.dali import Normalizer, resolve_device, worker_gpu
    from pipeline.data.dali_eval import crops_of_images
    from pipeline.evaluate.run import forward_probs

    kind = resolve_device(device)
    dev = torch.device("cuda", worker_gpu()) if kind == "gpu" else torch.device("cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [m.to(dev, memory_format=fmt).eval() for m in models]
    normalize = Normalizer(dev)
    out = []
    for distinct, inverse in crops_of_images(images, n_crops, input_size, batch_size, kind,
                                             dev.index if dev.type == "cuda" else None):
        x = normalize(distinct).contiguous(memory_format=fmt)
        probs = forward_probs(models, x, inverse, *inverse.shape, dev, fmt)  # [M, B, K, C]
        out.append(probs.mean(2).mean(0).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: artifacts `ensemble/` = meta.json (replicas, classes, input size) + replica-<i>.pt."""

    def load_context(self, context):
        import torch

        from pipeline.model.googlenet import inference_model

        d = Path(context.artifacts["ensemble"])
        self.meta = json.loads((d / "meta.json").read_text())
        self.models = [inference_model(torch.load(d / r["file"], map_location="cpu", weights_only=True),
                                       len(self.meta["classes"]), r["variant"]) for r in self.meta["replicas"]]
        # `mlflow models serve` calls predict from several threads at once; concurrent DALI pipelines and
        # forward passes in one process crashed it (SIGSEGV) under two clients. One prediction at a time
        # per process: the CPUs or the GPU are busy with it anyway; more processes with --workers.
        self._lock = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        crops, top_k = int(params.get("crops", 144)), int(params.get("top_k", 5))
        if crops not in CROPS:
            raise ValueError(f"params.crops must be one of {CROPS}, got {crops}")
        if "image" not in getattr(model_input, "columns", []):
            raise ValueError("the input needs a column 'image' holding encoded images (bytes)")
        cap = env_int(MAX_IMAGES_ENV, DEFAULT_MAX_IMAGES, 1)
        if len(model_input) > cap:
            raise ValueError(f"{len(model_input)} images in one request; at most {cap} ({MAX_IMAGES_ENV}); "
                             "send them in several requests")
        if len(model_input) == 0:
            return pd.DataFrame({c: [] for c in COLUMNS})
        images = prepare_request_images(model_input["image"], self.meta.get("max_side"))
        per_batch = max(1, env_int(CROP_CHUNK_ENV, DEFAULT_CROP_CHUNK, 1) // crops)
        with self._lock:
            probs = ensemble_probs(self.models, images, crops, self.meta["input_size"],
                                   device=os.environ.get("INCEPTION_DEVICE", "auto"), batch_size=per_batch)
        classes = self.meta["classes"]
        k = max(1, min(top_k, len(classes)))
        top = probs.topk(k, dim=1)
        return pd.DataFrame({
            "label": [classes[i] for i in top.indices[:, 0].tolist()],
            "top_k_labels": [[classes[i] for i in row] for row in top.indices.tolist()],
            "top_k_probs": [list(map(float, row)) for row in top.values.tolist()],
            "probabilities": [list(map(float, row)) for row in probs.tolist()],
        })


def example_image() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(40 * 48 * 3) % 251).astype(np.uint8).reshape(40, 48, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _model_files(d: Path, replicas: list, classes: list[str], input_size: int, max_side: int | None) -> dict:
    """Write the pyfunc's artifact folder `d` (meta.json + replica-<i>.pt); returns what logging it takes:
    artifacts, signature (params crops and top_k) and an input example."""
    from mlflow.models import infer_signature

    from pipeline.model.googlenet import without_aux
    from pipeline.train.loop import save_state

    d.mkdir(parents=True)
    meta = {"classes": list(classes), "input_size": input_size, "crops": list(CROPS), "max_side": max_side,
            "rule": "softmax per crop, mean over crops, then over models",
            "replicas": [{"index": r.index, "strategy": r.strategy, "variant": r.variant,
                          "file": f"replica-{r.index}.pt"} for r in replicas]}
    for r in replicas:
        save_state(without_aux(r.state_dict), d / f"replica-{r.index}.pt")
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    example = pd.DataFrame({"image": [example_image()]})
    model = EnsembleModel()
    model.load_context(type("Ctx", (), {"artifacts": {"ensemble": str(d)}})())
    signature = infer_signature(example, model.predict(None, example, {"crops": 1, "top_k": 5}),
                                {"crops": 144, "top_k": 5})
    here = Path(__file__).resolve().parent
    # models-from-code: the logged model names its class in a code file (no pickled Python object)
    return {"python_model": str(here / "serving_model.py"), "artifacts": {"ensemble": str(d)},
            "signature": signature, "code_paths": [str(here)], "input_example": example,
            # what the code it carries imports to answer (MLflow adds itself; pandas, PyYAML come with it)
            "pip_requirements": pinned_requirements("torch", "nvidia-dali", "pillow", "simplejpeg", "numpy")}


def save_ensemble_model(path: str | Path, replicas: list, classes: list[str], input_size: int,
                        max_side: int | None = None) -> None:
    """The ensemble pyfunc in a local folder (no tracking server), loadable and servable by path."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(str(path), **_model_files(Path(tmp) / "ensemble", replicas, classes, input_size,
                                                            max_side))


def log_ensemble_model(uri: str, run_id: str, replicas: list, classes: list[str], input_size: int,
                       register: str | None = ENSEMBLE_MODEL, tags: dict | None = None,
                       max_side: int | None = None) -> str | None:
    """Log the ensemble pyfunc in `run_id` (the ensemble's parent run) and register it, with the alias
    `LATEST_ALIAS` moved to the new version; returns the version (or None when not registered).
    `replicas`: objects with index, strategy, variant, state_dict (pipeline.evaluate.run.Replica);
    `max_side`: the shard job's setting for the training images (request images are prepared alike)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    # (the run's own experiment: start_run refuses a run of another one than the process's active experiment)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        files = _model_files(Path(tmp) / "ensemble", replicas, classes, input_size, max_side)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="ensemble", **files)
    if not register:
        return None
    mv = mlflow.register_model(info.model_uri, register, tags=tags or {})
    move_latest_alias(mlflow.MlflowClient(uri), register, mv.version)
    return mv.version


def move_latest_alias(client, name: str, version) -> None:
    """Point `LATEST_ALIAS` of registered model `name` at `version`, unless it names a newer one."""
    try:
        current = int(client.get_model_version_by_alias(name, LATEST_ALIAS).version)
    except Exception:  # no such alias yet
        current = None
    if current is None or current < int(version):
        client.set_registered_model_alias(name, LATEST_ALIAS, str(version))
