"""The shard job on a real Ray cluster: bad inputs, determinism, resume, refusal, MLflow record."""

import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    REPO,
    WNIDS,
    declared_size_jpeg,
    grow_tmpfs,
    jpeg_bytes,
    make_imagenet,
    png16_bytes,
    small_tmpfs,
)

from pipeline.config import ConfigError, ShardConfig
from pipeline.shards.format import MANIFEST, PARTS_DIR
from pipeline.shards.job import run
from pipeline.shards.plan import ShardJobError
from pipeline.shards.sources import SourceError
from pipeline.shards.splits import iter_samples, open_split
from pipeline.tracking import TrackingError


def tree_digest(d: Path) -> dict[str, str]:
    """sha256 of every shard, index and manifest under d (what must be byte-identical)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.suffix in (".tar", ".idx", ".json") and PARTS_DIR not in p.parts}


def test_imagenet_with_every_bad_input(ray_cluster, tiny_imagenet, tmp_path):
    root, planted = tiny_imagenet
    cfg = ShardConfig(source="imagenet", root=str(root), out=str(tmp_path / "out"), samples_per_shard=7, seed=1)
    manifests = run(cfg, log=lambda *_: None)
    train, val = manifests["train"], manifests["val"]

    # every input is accounted for: stored + skipped == seen
    n_train_files = sum(1 for p in (root / "train").rglob("*") if not p.is_dir())
    assert train["inputs_seen"] == n_train_files
    assert train["num_samples"] + len(train["skipped"]) == train["inputs_seen"]
    assert val["num_samples"] + len(val["skipped"]) == val["inputs_seen"] == 8
    assert train["num_samples"] == planted["good"] + len(planted["repaired"])

    skipped = {Path(s["source"]).name: s["reason"] for s in train["skipped"]}
    assert set(skipped) == set(planted["skipped"])
    for name, why in planted["skipped"].items():
        assert why in skipped[name], (name, skipped[name])
    repaired = {Path(r["source"]).name: r["reason"] for r in train["repaired"]}
    assert set(repaired) == set(planted["repaired"])
    for name, why in planted["repaired"].items():
        assert why in repaired[name]
    assert any("n09999999" in w for w in train["warnings"])
    assert train["classes"] == sorted(WNIDS + ["n09999999"]) == val["classes"]

    # read every sample back and check its label against the folder it came from
    info = open_split(tmp_path / "out" / "imagenet" / "train", verify="sha256")
    seen = list(iter_samples(info))
    assert len(seen) == train["num_samples"] and len({s["key"] for s in seen}) == len(seen)
    for s in seen:
        assert info.classes[s["label"]] == s["meta"]["source"].split("/")[1] == s["meta"]["wnid"]
        assert s["jpg"][:2] == b"\xff\xd8"
    # shuffled across classes: no shard holds a single class
    for tar in info.tars:
        labels = {s["label"] for s in seen if s["shard"] == tar.name}
        assert len(labels) > 1, tar.name
    # sizes in the per-sample json match the stored image
    assert all(s["meta"]["width"] > 0 and s["meta"]["height"] > 0 for s in seen)


def test_fashion_mnist_is_deterministic_and_resumes(ray_cluster, tiny_fmnist, tmp_path):
    def cfg(out, **kw):
        return ShardConfig(source="fashion-mnist", root=str(tiny_fmnist), out=str(out), samples_per_shard=16, **kw)

    a, b = tmp_path / "a", tmp_path / "b"
    ma = run(cfg(a), log=lambda *_: None)
    assert ma["train"]["num_samples"] == 60 and ma["val"]["num_samples"] == 20
    assert len(ma["train"]["shards"]) == 4
    run(cfg(b), log=lambda *_: None)
    assert tree_digest(a) == tree_digest(b)

    # labels read back equal the IDX labels (i % 10 by construction)
    for s in iter_samples(a / "fashion-mnist" / "train"):
        assert s["label"] == int(s["key"].split("_")[1]) % 10
        assert s["meta"]["class_name"]

    # a crash mid-run: one shard gone, another half-written, manifest not yet written
    split = b / "fashion-mnist" / "train"
    (split / "fashion-mnist-train-000002.tar").unlink()
    (split / MANIFEST).unlink()
    (split / "fashion-mnist-train-000003.tar.tmp-12345").write_bytes(b"partial")
    (split / PARTS_DIR / "fashion-mnist-train-000003.json.tmp-12345").write_text("{")  # a part record cut short
    lines = []
    run(cfg(b), log=lines.append)
    assert tree_digest(a) == tree_digest(b)
    assert not list(split.rglob("*.tmp-*"))
    status = Counter(line.split()[3] for line in lines if line.startswith("[train]"))
    assert status == {"verified": 3, "written": 1}

    # a corrupted shard is detected by its hash and rewritten
    tar = split / "fashion-mnist-train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    run(cfg(b), log=lambda *_: None)
    assert tree_digest(a) == tree_digest(b)

    # so is a bogus index file (another shard's, over the good one)
    (split / "fashion-mnist-train-000002.idx").write_bytes((split / "fashion-mnist-train-000000.idx").read_bytes())
    lines = []
    run(cfg(b), log=lines.append)
    assert tree_digest(a) == tree_digest(b)
    assert [line.split()[2] for line in lines if line.startswith("[train]") and line.split()[3] == "written"] == ["2"]

    # other settings over existing output: refused, unless --overwrite
    with pytest.raises(ShardJobError, match="seed=0 .now 5"):
        run(cfg(b, seed=5), log=lambda *_: None)
    m = run(cfg(b, seed=5, overwrite=True), log=lambda *_: None)
    assert m["train"]["seed"] == 5 and tree_digest(a) != tree_digest(b)


def test_limit_keeps_a_class_mixed_subset(ray_cluster, tiny_fmnist, tmp_path):
    m = run(ShardConfig(source="fashion-mnist", root=str(tiny_fmnist), out=str(tmp_path), limit=25,
                        splits=["train"]), log=lambda *_: None)
    labels = [s["label"] for s in iter_samples(tmp_path / "fashion-mnist" / "train")]
    assert m["train"]["num_samples"] == 25 and len(set(labels)) == 10


def test_bad_arguments_fail_before_writing(ray_cluster, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="does not exist"):
        run(ShardConfig(source="imagenet", root=str(tmp_path / "missing"), out=str(out)))
    empty = tmp_path / "empty"
    (empty / "train" / "n00000001").mkdir(parents=True)
    (empty / "val" / "n00000001").mkdir(parents=True)
    with pytest.raises(SourceError, match="no usable images"):
        run(ShardConfig(source="imagenet", root=str(empty), out=str(out)))
    stray = tmp_path / "stray"
    (stray / "train" / "cats").mkdir(parents=True)
    with pytest.raises(SourceError, match="ignored folders, not WordNet ids n########: cats"):
        run(ShardConfig(source="imagenet", root=str(stray), out=str(out)))
    with pytest.raises(ConfigError, match="samples_per_shard"):
        run(ShardConfig(samples_per_shard=0, out=str(out)))
    with pytest.raises(ConfigError, match="source"):
        run(ShardConfig(source="cifar", out=str(out)))
    assert not out.exists()


def test_unreachable_mlflow_fails_before_work(ray_cluster, tiny_fmnist, tmp_path):
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=uri):
        run(ShardConfig(root=str(tiny_fmnist), out=str(tmp_path / "o"), mlflow_uri=uri))
    assert not (tmp_path / "o").exists()


def test_job_logs_its_manifests_to_mlflow(ray_cluster, mlflow_server, tiny_fmnist, tmp_path):
    import mlflow

    run(ShardConfig(root=str(tiny_fmnist), out=str(tmp_path), mlflow_uri=mlflow_server, experiment="shard-test"),
        log=lambda *_: None)
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("shard-test")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.metrics["shard/train/num_samples"] == 60 and r.data.metrics["shard/val/num_samples"] == 20
    assert r.data.params["seed"] == "0" and r.data.tags["stage"] == "shard"
    local = client.download_artifacts(r.info.run_id, "manifests/train.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["num_samples"] == 60


def test_cli_help_documents_every_option_with_its_default():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--source", "--root", "--out", "--splits", "--samples-per-shard", "--seed", "--limit",
                "--workers", "--max-side", "--overwrite", "--mlflow-uri"):
        assert opt in out
    assert "(default: 5000)" in out and "(default: train,val)" in out


def test_cli_missing_root_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--root", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "RAY_ADDRESS": ""})
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr
    assert not (tmp_path / "out").exists()


def test_every_skip_and_repair_path_gives_byte_identical_output_twice(ray_cluster, tiny_imagenet, tmp_path):
    """Two runs over inputs that hit every skip and repair path (truncated, empty, not an image,
    unreadable, PNG, CMYK, grayscale, unlabelled and unknown-class val images): every file the job
    writes, manifests included, is byte-identical, and no reason holds an object repr or address."""
    root, planted = tiny_imagenet
    outs = []
    for name in ("a", "b"):
        cfg = ShardConfig(source="imagenet", root=str(root), out=str(tmp_path / name), samples_per_shard=7,
                          full_decode=True)
        m = run(cfg, log=lambda *_: None)
        outs.append(tmp_path / name)
    every = {str(p.relative_to(outs[0])) for p in outs[0].rglob("*") if p.is_file()}
    assert every == {str(p.relative_to(outs[1])) for p in outs[1].rglob("*") if p.is_file()}
    assert every >= {"imagenet/train/manifest.json", "imagenet/val/manifest.json"}
    for rel in sorted(every):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    reasons = [s["reason"] for s in m["train"]["skipped"] + m["train"]["repaired"] + m["val"]["skipped"]]
    assert {Path(s["source"]).name for s in m["train"]["skipped"]} == set(planted["skipped"])
    assert {Path(s["source"]).name for s in m["train"]["repaired"]} == set(planted["repaired"])
    assert len(m["val"]["skipped"]) == 2
    assert not [r for r in reasons if " at 0x" in r or "object" in r or "/tmp" in r], reasons


def test_resume_after_the_inputs_changed_is_refused_not_mixed(ray_cluster, tiny_imagenet, tmp_path):
    """A run stopped part-way (no manifest yet), then one input deleted (what a user does after the job
    reports a bad file), then the same command: the seeded shuffle would give another order, so kept
    shards and new ones would store one image twice and lose another. The rerun is refused, naming the
    change; --overwrite rewrites the split from the current inputs, each image exactly once."""
    root, _ = tiny_imagenet
    out = tmp_path / "out"

    def cfg(**kw):
        return ShardConfig(source="imagenet", root=str(root), out=str(out), samples_per_shard=5, splits=["train"], **kw)

    run(cfg(), log=lambda *_: None)
    split = out / "imagenet" / "train"
    (split / MANIFEST).unlink()  # as if killed before the manifest
    for tar in sorted(split.glob("*.tar"))[1:]:
        tar.unlink()
    victim = sorted((root / "train" / WNIDS[2]).glob("*.JPEG"))[0]
    victim.unlink()
    with pytest.raises(ShardJobError, match=rf"1 input\(s\) gone \(train/{WNIDS[2]}/{victim.name} label 2\), 0 new"):
        run(cfg(), log=lambda *_: None)
    m = run(cfg(overwrite=True), log=lambda *_: None)
    sources = [s["meta"]["source"] for s in iter_samples(split)]
    assert len(sources) == len(set(sources)) == m["train"]["num_samples"]
    assert f"train/{WNIDS[2]}/{victim.name}" not in sources


def test_a_second_concurrent_run_on_one_output_is_refused(ray_cluster, tiny_fmnist, tmp_path):
    import fcntl

    cfg = ShardConfig(source="fashion-mnist", root=str(tiny_fmnist), out=str(tmp_path / "out"), samples_per_shard=16)
    split = tmp_path / "out" / "fashion-mnist" / "train"
    split.mkdir(parents=True)
    with open(split / ".shard-job.lock", "w") as held:  # what a running job holds
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ShardJobError, match="being written by another shard job"):
            run(cfg, log=lambda *_: None)
        assert not list(split.glob("*.tar"))
    assert run(cfg, log=lambda *_: None)["train"]["num_samples"] == 60  # released: runs


def test_odd_inputs_are_reported_in_the_manifest_never_a_traceback(ray_cluster, tmp_path):
    """Through the real CLI on a real cluster: a name that is not UTF-8 (stored, and skipped when broken),
    a link out of the root, a file over the size cap, a declared pixel bomb, a 16-bit PNG. Each is a skip
    or a repair in the manifest; the job exits 0 with no traceback and leaves no temporary behind."""
    import subprocess
    import sys

    root = tmp_path / "imagenet"
    make_imagenet(root, per_class=3, bad=False)
    d = os.fsencode(root / "train" / WNIDS[0])
    good, broken = b"caf\xe9.JPEG", b"tronqu\xe9.JPEG"
    Path(os.fsdecode(os.path.join(d, good))).write_bytes(jpeg_bytes(seed=11))
    Path(os.fsdecode(os.path.join(d, broken))).write_bytes(jpeg_bytes(seed=12)[:300])
    secret = tmp_path / "outside.JPEG"
    secret.write_bytes(jpeg_bytes(seed=13))
    cls = root / "train" / WNIDS[1]
    (cls / "link.JPEG").symlink_to(secret)
    with open(cls / "huge.JPEG", "wb") as f:
        f.truncate(64 * 2**20 + 1)
    (cls / "bomb.JPEG").write_bytes(declared_size_jpeg(12000, 12000))
    (cls / "deep.png").write_bytes(png16_bytes()[0])

    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--source", "imagenet",
                        "--root", str(root), "--out", str(out), "--samples-per-shard", "4"],
                       env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "\\udce9" in p.stdout  # the broken file's name, shown in the log with its odd byte escaped
    m = json.loads((out / "imagenet" / "train" / MANIFEST).read_text())
    skipped = {Path(s["source"]).name: s["reason"] for s in m["skipped"]}
    repaired = {Path(r["source"]).name: r["reason"] for r in m["repaired"]}
    assert "truncated" in skipped[os.fsdecode(broken)].lower()
    assert "outside the dataset root" in skipped["link.JPEG"]
    assert "file too large" in skipped["huge.JPEG"]
    assert "exceeds the 50 MP cap" in skipped["bomb.JPEG"]
    assert "16-bit samples scaled to 8 bits" in repaired["deep.png"]
    assert m["num_samples"] + len(m["skipped"]) == m["inputs_seen"]
    stored = {s["meta"]["source"]: s for s in iter_samples(out / "imagenet" / "train")}
    cafe = f"train/{WNIDS[0]}/{os.fsdecode(good)}"
    assert stored[cafe]["jpg"] == jpeg_bytes(seed=11)
    assert os.path.isfile(os.path.join(os.fsencode(root), os.fsencode(cafe)))  # the name round-trips to its bytes
    assert not [q for q in out.rglob("*") if ".tmp-" in q.name]


def test_the_input_caps_are_settings_recorded_with_the_shards(ray_cluster, tmp_path):
    """--max-megapixels and --max-file-mb reach every shard task; output made under other caps is refused
    (it holds other samples), and the defaults leave the fingerprint of shards made before the caps were
    settings unchanged, so those still resume."""
    root = tmp_path / "imagenet"
    d = root / "train" / WNIDS[0]
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"small{i}.JPEG").write_bytes(jpeg_bytes(seed=i))
    (d / "big.JPEG").write_bytes(jpeg_bytes(size=(1600, 1000), seed=9))  # 1.6 MP
    (d / "padded.JPEG").write_bytes(jpeg_bytes(seed=7) + b"\0" * (3 * 2**20))  # 3 MiB, valid

    def cfg(**kw):
        return ShardConfig(source="imagenet", root=str(root), out=str(tmp_path / "out"), splits=["train"], **kw)

    assert not {"max_file_mb", "max_megapixels"} & set(cfg().fingerprint())
    m = run(cfg(max_megapixels=1, max_file_mb=2), log=lambda *_: None)["train"]
    skipped = {Path(s["source"]).name: s["reason"] for s in m["skipped"]}
    assert m["num_samples"] == 3 and set(skipped) == {"big.JPEG", "padded.JPEG"}, skipped
    assert "exceeds the 1 MP cap" in skipped["big.JPEG"] and "--max-file-mb" in skipped["padded.JPEG"]
    assert m["job"]["max_megapixels"] == 1 and m["job"]["max_file_mb"] == 2
    with pytest.raises(ShardJobError, match=r"max_file_mb=2 \(now 64\), max_megapixels=1 \(now 50\)"):
        run(cfg(), log=lambda *_: None)
    m = run(cfg(overwrite=True), log=lambda *_: None)["train"]
    assert m["num_samples"] == 5 and not m["skipped"]
    with pytest.raises(ConfigError, match="max_megapixels: must be a positive integer"):
        run(cfg(max_megapixels=0), log=lambda *_: None)


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "600k") as d:
        yield d


def test_a_full_disk_is_one_line_exit_2_no_temporary_and_the_same_command_finishes(ray_cluster, small_disk,
                                                                                   tmp_path):
    """The output filesystem fills up while shard tasks write: the job stops with one line naming the
    file and exit 2 (not a traceback from a Ray task), no temporary stays behind; once there is room,
    the same command finishes, with output identical to a run that never lacked space."""
    import subprocess

    from conftest import write_photo_folder

    root = write_photo_folder(tmp_path / "photos", classes=2, per_class=40)  # ~7 MB of JPEGs

    def job(out):
        return subprocess.run([sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--source", "imagenet",
                               "--root", str(root), "--out", str(out), "--splits", "train", "--samples-per-shard", "20",
                               "--workers", "2"], env=ray_cluster.env, capture_output=True, text=True, timeout=600)

    p = job(small_disk / "out")
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"No space left on device \(.*/imagenet-train-\d+\.tar\); finished shards are kept: make room",
                     p.stderr), p.stderr
    assert not [f for f in small_disk.rglob("*") if ".tmp" in f.name]
    grow_tmpfs(small_disk, "64m")
    p = job(small_disk / "out")
    assert p.returncode == 0, p.stderr[-3000:]
    assert job(tmp_path / "ref").returncode == 0
    assert tree_digest(small_disk / "out") == tree_digest(tmp_path / "ref")
