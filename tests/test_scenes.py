"""The fashion-mnist-scenes source: each Fashion-MNIST garment drawn into a larger RGB scene.

The shard job runs for real (the session Ray cluster; the CLI as a subprocess where its exit status and
message are the point) over a few hundred images of the val split: the real Fashion-MNIST files where
installed, else Fashion-MNIST-shaped random ones.
"""

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FASHION_MNIST_ROOT, REPO, make_fashion_mnist
from PIL import Image

from pipeline.config import ShardConfig
from pipeline.shards.format import MANIFEST, PARTS_DIR
from pipeline.shards.job import run
from pipeline.shards.scenes import GENERATOR, SceneSettings, render_scene, scene_params
from pipeline.shards.sources import FASHION_MNIST_FILES, FashionMNISTScenesSource, read_idx
from pipeline.shards.splits import iter_samples

LIMIT, PER_SHARD = 200, 64


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    if (FASHION_MNIST_ROOT / FASHION_MNIST_FILES["val"][0]).is_file():
        return FASHION_MNIST_ROOT
    return make_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=20, n_val=300)


def cfg(root: Path, out: Path, **kw) -> ShardConfig:
    return ShardConfig(**{"source": "fashion-mnist-scenes", "root": str(root), "out": str(out), "splits": ["val"],
                          "limit": LIMIT, "samples_per_shard": PER_SHARD, "workers": 2, **kw})


def digests(split: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(split.rglob("*")) if p.suffix in (".tar", ".idx", ".json") and PARTS_DIR not in p.parts}


def shard_job(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "shard_dataset.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, cwd=REPO)


def test_two_runs_give_byte_identical_labelled_scenes_with_the_settings_recorded(ray_cluster, fmnist_root, tmp_path):
    ma = run(cfg(fmnist_root, tmp_path / "a"), log=lambda *_: None)["val"]
    mb = run(cfg(fmnist_root, tmp_path / "b"), log=lambda *_: None)["val"]
    a, b = tmp_path / "a" / "fashion-mnist-scenes" / "val", tmp_path / "b" / "fashion-mnist-scenes" / "val"
    # the whole output is byte-identical: shards, DALI indexes and the manifest (which holds no run-specific field)
    assert ma["num_samples"] == LIMIT and len(ma["shards"]) == math.ceil(LIMIT / PER_SHARD)
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert digests(a) == digests(b) and MANIFEST in digests(a)

    # the manifest on disk records every scene setting
    info = json.loads((a / MANIFEST).read_text())["job"]["source_info"]
    assert info == {"kind": "fashion-mnist-scenes", "root": str(fmnist_root.resolve()), "generator": GENERATOR,
                    "canvas": 96, "scale": [0.25, 0.9], "scale_sampling": "log-uniform", "aspect": [0.75, 4 / 3],
                    "aspect_sampling": "log-uniform", "cutoff": 0.25, "scene_seed": 0, "jpeg_quality": 90}

    # every label is the IDX label of the sample's source index; every image is the 96x96 RGB scene of it
    images = read_idx(fmnist_root / FASHION_MNIST_FILES["val"][0])
    labels = read_idx(fmnist_root / FASHION_MNIST_FILES["val"][1])
    settings = SceneSettings()
    seen = list(iter_samples(a))
    assert len(seen) == LIMIT
    for s in seen:
        i = int(s["key"].split("_")[1])
        assert s["label"] == labels[i] and s["meta"]["source"].endswith(f"#{i}")
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (96, 96)
        assert (s["meta"]["width"], s["meta"]["height"]) == (96, 96)
        got = np.asarray(img, np.float32)
        own, other = (np.abs(got - np.asarray(render_scene(images[j], scene_params(0, "val", j, settings), settings),
                                              np.float32)).mean() for j in (i, (i + 1) % len(images)))
        assert own < 8 and own < other / 2, (i, own, other)  # (JPEG quality 90)


def test_scene_params_spread_over_the_ranges_and_depend_on_seed_split_and_index_only():
    s = SceneSettings()
    ps = [scene_params(0, "train", i, s) for i in range(2000)]
    scales, aspects = np.array([p.scale for p in ps]), np.array([p.aspect for p in ps])
    assert 0.25 <= scales.min() < 0.27 and 0.87 < scales.max() <= 0.9
    assert 0.75 <= aspects.min() < 0.77 and 1.31 < aspects.max() <= 4 / 3
    # log-uniform: the median is near the geometric mean of the range, and each third of log(scale) gets a third
    assert abs(np.median(scales) - math.sqrt(0.25 * 0.9)) < 0.03
    thirds = np.histogram(np.log(scales), bins=3, range=(math.log(0.25), math.log(0.9)))[0] / len(ps)
    assert np.all(np.abs(thirds - 1 / 3) < 0.05), thirds
    # positions: the garment frame is at times cut at the border, never more than `cutoff` of its area
    c = s.canvas
    inside = np.array([(min(c, p.x0 + p.width) - max(0, p.x0)) * (min(c, p.y0 + p.height) - max(0, p.y0))
                       / (p.width * p.height) for p in ps])
    assert 0.1 < np.mean(inside < 1) < 0.9
    assert inside.min() >= 1 - s.cutoff - 0.03  # (positions and sizes are rounded to whole pixels)
    centres = np.array([p.x0 + p.width / 2 for p in ps])
    assert centres.min() < c * 0.2 and centres.max() > c * 0.8

    # a pure function of (seed, split, index, settings): the same draw twice, another one when any differs
    def key(p):
        return (p.scale, p.aspect, p.x0, p.y0, p.tint, p.background.tobytes())

    assert key(scene_params(0, "train", 7, s)) == key(ps[7])
    others = [scene_params(1, "train", 7, s), scene_params(0, "val", 7, s), scene_params(0, "train", 8, s)]
    assert all(key(p) != key(ps[7]) for p in others)

    # rendered: canvas x canvas RGB, the same bytes twice; the garment shows where it was placed
    garment = np.zeros((28, 28), np.uint8)
    garment[4:24, 6:22] = 255
    p = scene_params(0, "val", 3, s)
    img = render_scene(garment, p, s)
    assert img.mode == "RGB" and img.size == (c, c) and img.tobytes() == render_scene(garment, p, s).tobytes()
    blank = np.asarray(render_scene(np.zeros((28, 28), np.uint8), p, s), np.float32)
    changed = np.abs(np.asarray(img, np.float32) - blank).max(axis=2) > 30
    ys, xs = np.nonzero(changed)
    assert changed.any() and p.x0 - 1 <= xs.min() and xs.max() <= p.x0 + p.width
    assert p.y0 - 1 <= ys.min() and ys.max() <= p.y0 + p.height
    small = SceneSettings(canvas=48, scale=(0.5, 0.5), aspect=(1.0, 1.0))
    assert render_scene(garment, scene_params(0, "val", 3, small), small).size == (48, 48)
    assert scene_params(0, "val", 3, small).width == 24


def test_max_side_downscales_the_scene(fmnist_root):
    source = FashionMNISTScenesSource(fmnist_root)
    item = source.list_split("val").items[5]
    assert (source.prepare(item).width, source.prepare(item, max_side=64).width) == (96, 64)
    assert Image.open(io.BytesIO(source.prepare(item, max_side=64).jpg)).size == (64, 64)
    assert ShardConfig(source="fashion-mnist-scenes", max_side=64).dataset == "fashion-mnist-scenes-max64"
    assert ShardConfig(source="fashion-mnist-scenes").dataset == "fashion-mnist-scenes"


def test_a_changed_scene_setting_is_refused_naming_it_and_overwrite_replaces(ray_cluster, fmnist_root, tmp_path):
    out = tmp_path / "out"
    run(cfg(fmnist_root, out, limit=40), log=lambda *_: None)
    split = out / "fashion-mnist-scenes" / "val"
    before = digests(split)
    args = ["--source", "fashion-mnist-scenes", "--root", str(fmnist_root), "--out", str(out), "--splits", "val",
            "--limit", "40", "--samples-per-shard", str(PER_SHARD), "--workers", "2", "--scene-scale", "0.3,0.9"]
    p = shard_job(*args, env=ray_cluster.env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert "made with other settings: source_info.scale=[0.25, 0.9] (now [0.3, 0.9])" in p.stderr, p.stderr
    assert digests(split) == before

    p = shard_job(*args, "--overwrite", env=ray_cluster.env)
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = json.loads((split / MANIFEST).read_text())
    assert manifest["job"]["source_info"]["scale"] == [0.3, 0.9] and manifest["num_samples"] == 40
    assert digests(split) != before


@pytest.mark.parametrize("args, flag", [
    (["--scene-scale", "0.9,0.2"], "--scene-scale"),
    (["--scene-scale", "0.2"], "--scene-scale"),
    (["--scene-scale", "0,0.5"], "--scene-scale"),
    (["--scene-aspect", "2,1"], "--scene-aspect"),
    (["--scene-aspect", "a,b"], "--scene-aspect"),
    (["--scene-canvas", "8"], "--scene-canvas"),
    (["--scene-seed", "-1"], "--scene-seed"),
    (["--source", "imagenet", "--scene-seed", "3"], "--scene-seed"),
    (["--source", "fashion-mnist", "--scene-canvas", "64"], "--scene-canvas"),
])
def test_bad_scene_flags_are_refused_naming_the_flag(args, flag, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import shard_dataset
    finally:
        sys.path.remove(str(REPO / "jobs"))
    argv = ["--source", "fashion-mnist-scenes", "--out", str(tmp_path / "out"), *args]
    assert shard_dataset.main(shard_dataset.parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shard_dataset: error: {flag}") and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out").exists()
