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


def build_wheel(tmp_path_factory, name: str, out, version: str = "1.0") -> None:
    """A real wheel of a one-module package `name`, built offline by pip into `out`."""
    src = tmp_path_factory.mktemp("pkg")
    module = name.replace("-", "_")
    (src / module).mkdir()
    (src / module / "__init__.py").write_text("VALUE = 42\n" + "# padding\n" * 400)
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                        f'"setuptools.build_meta"\n[project]\nname = "{name}"\nversion = "{version}"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True)


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory):
    """A real wheel of a one-module package, built offline by pip."""
    out = tmp_path_factory.mktemp("wheels")
    build_wheel(tmp_path_factory, "gpu-probe-pkg", out)
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


def test_the_kit_can_bring_torch(tmp_path_factory, tmp_path):
    """--torch: torch and torchvision (the project's pins) with what the kit otherwise leaves to the machine's
    torch (numpy); a set without them is refused, and a CUDA 12 kit needs the index of a CUDA 12 build."""
    import tomllib

    from benchmarks.gpu.prepare import TORCH_PINS

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(TORCH_PINS) <= set(deps)  # the kit brings the versions the project is tested with
    wheels = tmp_path_factory.mktemp("torchwheels")
    pins = dict(pin.split("==") for pin in TORCH_PINS)
    for name in ("torch", "numpy", "nvidia-dali-cuda130"):
        build_wheel(tmp_path_factory, name, wheels, pins.get(name, "1.0"))

    def prepare(*args, dest="kit"):
        return subprocess.run([sys.executable, str(PREPARE), "--wheels", str(wheels), "--dest", str(tmp_path / dest),
                               *args], capture_output=True, text=True)

    p = prepare("--torch")
    assert p.returncode == 2 and "no torchvision among" in p.stderr, p.stderr  # half of torch is no kit
    build_wheel(tmp_path_factory, "torchvision", wheels, pins["torchvision"])
    assert prepare().returncode == 0  # without --torch: numpy is the machine's torch's, left out
    names = [w["name"].split("-")[0] for w in json.loads((tmp_path / "kit" / "manifest.json").read_text())["wheels"]]
    assert "numpy" not in names and "nvidia_dali_cuda130" in names
    p = prepare("--torch")
    assert p.returncode == 0, p.stderr
    manifest = json.loads((tmp_path / "kit" / "manifest.json").read_text())
    assert {"torch", "torchvision", "numpy", "nvidia_dali_cuda130"} <= {w["name"].split("-")[0] for w in manifest["wheels"]}
    assert manifest["packages"][:2] == list(TORCH_PINS)
    # two versions of one package cannot be installed offline together: refused here, not on the GPU machine
    build_wheel(tmp_path_factory, "numpy", wheels, "2.0")
    p = prepare("--torch", dest="kit2")
    assert p.returncode == 2 and "more than one version of numpy" in p.stderr, p.stderr
    # CUDA 12: PyPI's torch is a CUDA 13 build, so the index of a CUDA 12 one is asked for, before any download
    p = subprocess.run([sys.executable, str(PREPARE), "--torch", "--cuda", "12", "--dest", str(tmp_path / "k12")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--torch-index" in p.stderr and not (tmp_path / "k12").exists()
    p = subprocess.run([sys.executable, str(PREPARE), "--torch-index", "https://example.invalid/simple", "--dest",
                        str(tmp_path / "k0")], capture_output=True, text=True)
    assert p.returncode == 2 and "only with --torch" in p.stderr


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
