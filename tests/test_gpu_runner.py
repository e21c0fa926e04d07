"""The offline GPU kit and the GPU checks, on the CPU: the kit's wheels split into parts, reassembled,
verified and installed offline (as on a GPU machine without internet access), `make gpu-kit` building
it for a chosen Python, CUDA and part size, and every check of benchmarks/gpu/run.py at tiny sizes
(--smoke)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

PREPARE = REPO / "benchmarks" / "gpu" / "prepare.py"
RUNNER = REPO / "benchmarks" / "gpu" / "run.py"


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory):
    """A real wheel of a one-module package, built offline by pip."""
    src = tmp_path_factory.mktemp("pkg")
    (src / "gpu_probe_pkg").mkdir()
    (src / "gpu_probe_pkg" / "__init__.py").write_text("VALUE = 42\n" + "# padding\n" * 400)
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                        '"setuptools.build_meta"\n[project]\nname = "gpu-probe-pkg"\nversion = "1.0"\n')
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True)
    return out


def test_parts_reassemble_verify_and_install_offline(tiny_wheel, tmp_path):
    kit = tmp_path / "kit"
    p = subprocess.run([sys.executable, str(PREPARE), "--wheels", str(tiny_wheel), "--dest", str(kit),
                        "--part-mib", "0.001", "--require", "gpu_probe_pkg"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    manifest = json.loads((kit / "manifest.json").read_text())
    assert len(manifest["parts"]) >= 2 and [w["name"][:13] for w in manifest["wheels"]] == ["gpu_probe_pkg"]
    site = tmp_path / "site"
    env = {**os.environ, "GPU_SITE": str(site)}

    def install(*extra):
        return subprocess.run([sys.executable, str(RUNNER), "--install", str(kit), "--out", str(tmp_path / "out"),
                               "--only", "", *extra], capture_output=True, text=True, env=env)

    # a missing part is named; a damaged one is refused
    last = kit / manifest["parts"][-1]["name"]
    data = last.read_bytes()
    last.unlink()
    p = install()
    assert p.returncode != 0 and f"parts missing under {kit}: {last.name}" in p.stdout + p.stderr
    last.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    p = install()
    assert p.returncode != 0 and "is damaged" in p.stdout + p.stderr
    last.write_bytes(data)
    p = install()
    assert "install: installed 1 wheels" in p.stdout, p.stdout + p.stderr
    got = subprocess.run([sys.executable, "-c", "import gpu_probe_pkg; print(gpu_probe_pkg.VALUE)"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert got.stdout.strip() == "42"
    assert "install: already installed" in install().stdout


def test_make_gpu_kit_builds_for_the_chosen_python_cuda_and_part_size(tiny_wheel, tmp_path):
    kit = tmp_path / "kit"
    p = subprocess.run(["make", "-s", "gpu-kit", f"GPU_KIT={kit}", "GPU_PYTHON=3.11", "GPU_CUDA=12",
                        "GPU_KIT_PART_MIB=0.002", f"GPU_KIT_ARGS=--wheels {tiny_wheel} --require gpu_probe_pkg"],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    manifest = json.loads((kit / "manifest.json").read_text())
    assert manifest["python"] == "3.11" and manifest["cuda"] == "12"
    assert manifest["packages"][0] == "nvidia-dali-cuda120==2.4.0"
    parts = manifest["parts"]
    assert len(parts) >= 2 and all(pt["bytes"] <= 0.002 * 2**20 for pt in parts)
    assert sorted(f.name for f in kit.iterdir()) == sorted(["manifest.json", *(pt["name"] for pt in parts)])
    assert f"python benchmarks/gpu/run.py --install {kit} --out gpu-results" in p.stdout
    bad = subprocess.run([sys.executable, str(PREPARE), "--python", "three", "--dest", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--python" in bad.stderr and not (tmp_path / "x").exists()


def test_prepare_refuses_a_set_without_dali(tiny_wheel, tmp_path):
    p = subprocess.run([sys.executable, str(PREPARE), "--wheels", str(tiny_wheel), "--dest", str(tmp_path / "c")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no nvidia_dali_cuda130" in p.stderr


@pytest.mark.slow
def test_smoke_runs_every_check_on_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(RUNNER), "--smoke", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=1500, cwd=REPO)
    results = json.loads((tmp_path / "results.json").read_text())
    assert p.returncode == 0, json.dumps({k: v["status"] for k, v in results["checks"].items()}) + p.stderr[-2000:]
    assert set(results["checks"]) == {"dali_train", "dali_eval", "model", "train_loop", "eval_path"}
    r = {k: v["result"] for k, v in results["checks"].items()}
    assert len(r["dali_train"]["strategies"]) == 7 and r["dali_train"]["decode_only_img_s"] > 0
    assert r["dali_eval"]["within_tolerance"] and r["train_loop"]["loop_img_s"] > 0
    assert {run["model"] for run in r["model"]["runs"]} == {"torchvision", "bn", "paper"}
    assert r["eval_path"]["models"] == 2 and (tmp_path / "results.md").read_text().startswith("# GPU proof (SMOKE")
    assert results["machine"]["dali"] and results["machine"]["torch"]
