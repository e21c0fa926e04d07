"""GPU placement without GPUs: Ray clusters with logical GPUs, the recipes' requests as Ray places them,
a request the cluster can never hold refused before training, and training on the CPU when CUDA is
absent."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import grey_shards

from pipeline.config import EnsembleConfig
from pipeline.train.ensemble import EnsembleError, plan_placement

REPO = Path(__file__).resolve().parents[1]


def node(cpus, gpus=0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_plan_placement_counts_whole_workers_per_node():
    packed = EnsembleConfig(replicas=7, workers_per_replica=1, gpus_per_worker=0.14, cpus_per_worker=1, max_concurrent=7)
    assert plan_placement(packed, [node(16, 1)])["replicas_at_once"] == 7  # 7 x 0.14 <= 1 GPU
    assert plan_placement(packed, [node(4, 1)])["replicas_at_once"] == 4  # CPUs bound it
    paper = EnsembleConfig(replicas=7, workers_per_replica=4, gpus_per_worker=1, max_concurrent=7)
    assert plan_placement(paper, [node(64, 8), node(64, 8)])["replicas_at_once"] == 4
    assert plan_placement(paper, [node(8, 2), node(8, 2)])["replicas_at_once"] == 1  # workers span nodes
    with pytest.raises(EnsembleError, match=r"needs 4 worker\(s\) x \{CPU: 1, GPU: 1\}.*hold 3 such"):
        plan_placement(paper, [node(64, 3), node(64, 0), node(64, 8, alive=False)])
    half = EnsembleConfig(workers_per_replica=1, gpus_per_worker=0.5)
    with pytest.raises(EnsembleError, match="largest node"):
        plan_placement(half, [node(64)])  # no GPU node at all


@pytest.fixture(scope="module")
def placed(mlflow_server, tmp_path_factory):
    """tests/gpu_placement_run.py run once: a cluster with 1 logical GPU, then one with 8."""
    shards = grey_shards(tmp_path_factory.mktemp("placement") / "shards", 96)
    p = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_placement_run.py"), str(shards), mlflow_server],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("PLACEMENT-RESULT ")]
    assert p.returncode == 0 and lines, (p.stdout[-3000:], p.stderr[-5000:])
    r = json.loads(lines[-1][len("PLACEMENT-RESULT "):])
    assert set(r["addresses"]) == {"127.0.0.1"}  # the clusters listen on loopback only
    return r


@pytest.mark.slow
def test_recipes_on_logical_gpus(placed):
    r = placed
    # fashion-mnist-full: 2 replicas of 0.14 GPU, planned (and submitted) at once on the cluster's one
    # (logical) GPU, each got that GPU's share and trained on the CPU (no CUDA) to the end
    packed = r["packed"]
    assert any("2 replica(s) at once" in line for line in packed["lines"])
    assert len(packed["runs"]) == 2
    assert all(x["gpus"] == "0" and x["devices"] == "cpu" and x["epochs"] == [1] and x["status"] == "FINISHED"
               for x in packed["runs"]), packed["runs"]

    # imagenet-paper on one GPU: refused before training, saying why
    assert r["refused"] and "can never run one replica" in r["refused"] and "GPU: 1" in r["refused"]
    assert not r["refused_dir_exists"]  # nothing started: no checkpoint folder

    # imagenet-paper on a machine with 8 GPUs: one replica's 4 data-parallel workers each got its own GPU
    (run,) = r["per_replica"]["runs"]
    gpus = run["gpus"].split(";")
    assert len(set(gpus)) == 4 and set(gpus) <= {str(i) for i in range(8)} and run["devices"] == "cpu;cpu;cpu;cpu", run
    assert run["epochs"] == [1] and run["status"] == "FINISHED"


@pytest.mark.slow
def test_one_8gpu_machine_on_logical_gpus(placed):
    """imagenet-1node on a one-node Ray cluster with 8 logical GPUs: the dry run plans the 7 replicas at
    once, one GPU each, at lr x global batch / 512, and writes nothing; training 2 of them submits the 2 at
    once and puts them on 2 distinct GPUs, and each optimiser uses that learning rate."""
    r = placed
    dry = r["dry_run"]
    assert dry["out"]["replicas_at_once"] == 7 and dry["out"]["workers_fit"] == 8
    # (memory_per_worker: auto: reserved once measured on this machine, by this test's training or before)
    assert any(re.search(r"7 replica\(s\) x 1 worker\(s\) x \{CPU: 0.25, GPU: 1(, memory: [\d.]+ GiB)?\}; 7 replica\(s\) "
                         "at once", ln) for ln in dry["lines"]), dry["lines"]
    # the rule: TINY's global batch of 8 (8 x 1 worker), reference 512 -> 0.16 x 8 / 512 = 0.0025
    assert any("effective lr = 0.0025 (optim.lr 0.16 x 8 / reference batch 512)" in ln for ln in dry["lines"])
    assert "one-node" not in dry["experiments"] and not dry["ckpt_dir"]  # the dry run wrote nothing

    # training 2 of them: submitted at once (the plan), each on its own GPU of the 8
    trained = r["trained"]
    assert any("2 replica(s) at once" in line for line in trained["lines"])
    assert len(trained["runs"]) == 2 and all(x["status"] == "FINISHED" for x in trained["runs"])
    gpus = [x["gpus"] for x in trained["runs"]]
    assert len(set(gpus)) == 2 and set(gpus) <= {str(i) for i in range(8)}, gpus  # 2 distinct GPUs of 8
    assert set(trained["lr"].values()) == {"0.0025"}
    # the optimiser used it: the epoch's logged lr (TINY: 1 epoch, no warm-up) is the effective one
    assert all(v == [pytest.approx(0.0025)] for v in trained["step_lr"].values()), trained["step_lr"]
