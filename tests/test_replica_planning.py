"""Replicas at once from the cluster's CPUs and memory: the demo recipe (`max_concurrent: auto`,
`memory_per_worker: auto`) planned on Ray clusters with 2, 16 and 8 logical CPUs and a memory limit,
a worker's peak memory measured by a real probe, and one training placed by Ray under the plan."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import grey_shards

from pipeline.config import EnsembleConfig
from pipeline.train.ensemble import PlacementError, plan_placement
from pipeline.train.memory import GIB

REPO = Path(__file__).resolve().parents[1]


def node(cpus, memory_gib, node_id="n"):
    return {"Alive": True, "NodeID": node_id, "Resources": {"CPU": cpus, "memory": memory_gib * GIB}}


def test_memory_bounds_the_replicas_at_once_with_their_overhead_on_the_drivers_node():
    e = EnsembleConfig(replicas=7, max_concurrent="auto")
    worker = int(1.5 * GIB)
    assert plan_placement(e, [node(16, 64)])["replicas_at_once"] == 7  # room for all
    # 16 CPUs, 12 GiB: workers alone would fit 8; each running replica also takes 2 GiB on the driver's node
    p = plan_placement(e, [node(16, 12)], worker, driver_node="n")
    assert p["replicas_at_once"] == 3 and p["bound"] == "memory"  # 3 x (1.5 + 2) = 10.5 <= 12 < 14
    assert plan_placement(e, [node(16, 12)], worker)["replicas_at_once"] == 7  # (no driver there: 8 workers fit)
    assert plan_placement(e, [node(2, 64)], worker, driver_node="n")["bound"] == "CPUs"
    assert plan_placement(EnsembleConfig(replicas=7, max_concurrent=2), [node(16, 64)])["bound"] == \
        "ensemble.max_concurrent"
    with pytest.raises(PlacementError, match=r"memory: 1.50 GiB.*memory_per_worker"):
        plan_placement(e, [node(16, 1)], worker)
    # a small driver's node (a head without room for workers) bounds the replicas it supervises: 5 GiB
    # holds two replicas' 2 GiB, however many workers the big node holds
    head, big = node(2, 5, "head"), node(64, 256, "big")
    assert plan_placement(e, [head, big], worker, driver_node="head")["replicas_at_once"] == 2
    with pytest.raises(PlacementError, match="driver's node has 1.50 GiB of Ray memory"):
        plan_placement(e, [node(2, 1.5, "head"), big], worker, driver_node="head")


@pytest.mark.slow
def test_the_demo_plans_by_cpus_and_measured_memory_and_ray_places_it(mlflow_server, tmp_path):
    shards = grey_shards(tmp_path / "shards", 48)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # (nothing measured before)
    p = subprocess.run([sys.executable, str(REPO / "tests" / "planning_run.py"), str(shards), mlflow_server],
                       capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("PLANNING-RESULT ")]
    assert p.returncode == 0 and lines, (p.stdout[-3000:], p.stderr[-5000:])
    r = json.loads(lines[-1][len("PLANNING-RESULT "):])

    # a dry run on a machine that never measured: planned by CPUs, memory measured by the first run
    dry = r["dry_unmeasured"]
    assert dry["placement"]["replicas_at_once"] == 2 and "memory" not in dry["placement"]["worker"]
    assert any("a dry run plans by CPUs and GPUs only" in ln for ln in dry["lines"])
    # the probe: a real training step's peak (torch, DALI and the model are far above 300 MiB), then cached
    need = r["need"]
    assert need == r["need_again"] and need > 0.3 * GIB, r["measure_lines"]
    assert "measured now" in r["measure_lines"][0] and "measured before on this machine" in r["measure_lines"][1]

    # the plans: on 2 CPUs bound by them; on 16 CPUs memory holds 4 replicas (each worker's reservation + a
    # replica's overhead on the driver's node), each widened to 4 CPUs; the training's own plan on 8 CPUs with
    # memory for 2: 2 at once, each on 4 CPUs
    expect = {2: (2, "CPUs", 1), 16: (4, "memory", 4), "trained": (2, "memory", 4)}
    for cpus, (at_once, bound, width) in expect.items():
        plan = r["trained"] if cpus == "trained" else r["plans"][str(cpus)]
        if cpus != "trained":  # (dry runs return their plan; the training logs it)
            assert plan["placement"]["replicas_at_once"] == at_once, (cpus, plan)
            assert abs(plan["placement"]["worker"]["memory"] - need) <= 1, plan  # measured, or that figure stated
        line = next(ln for ln in plan["lines"] if ln.startswith("placement: "))
        assert f"; {at_once} replica(s) at once on this cluster" in line and f"bound by {bound}" in line, line
        assert (f"each on {width} CPUs" in line) == (width > 1), line
    # the demo on 2 cores: 2 at once, the 7th replica widened to both (as without memory planning)
    two = next(ln for ln in r["plans"]["2"]["lines"] if ln.startswith("placement: "))
    assert re.search(r"placement: 7 replica\(s\) x 1 worker\(s\) x \{CPU: 1, memory: [\d.]+ GiB\}; 2 replica\(s\) "
                     r"at once on this cluster \(2 worker\(s\) fit its nodes; bound by CPUs\)$", two), two

    # training on 8 CPUs with memory for 2 replicas: 2 at once, 4 CPUs each, the 3rd alone on all 8 once
    # both ended; every worker reserved that memory
    runs = r["trained"]["runs"]
    assert [x["status"] for x in runs] == ["FINISHED"] * 3
    assert [x["cpus"] for x in runs] == ["4", "4", "8"] and [x["threads"] for x in runs] == ["4", "4", "8"]
    assert {x["memory_gib"] for x in runs} == {f"{need / GIB:.2f}"}
    spans = [(x["first_ms"], x["last_ms"]) for x in runs]
    assert spans[2][0] > max(spans[0][1], spans[1][1]), spans
