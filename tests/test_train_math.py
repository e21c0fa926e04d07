"""Training recipe math and recipe configs (pure, fast)."""

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, list_recipes, load_recipe
from pipeline.train.schedule import PolyakAverage, lr_at


def test_lr_schedule_is_the_papers_step_decay():
    assert lr_at(0, 0.01) == 0.01
    assert lr_at(7.99, 0.01) == 0.01
    assert lr_at(8, 0.01) == pytest.approx(0.0096)
    assert lr_at(16, 0.01) == pytest.approx(0.01 * 0.96**2)
    assert lr_at(250, 0.01) == pytest.approx(0.01 * 0.96**31)
    assert lr_at(3, 1.0, decay=0.5, every=1) == 0.125


def test_warmup_then_schedule():
    assert lr_at(0, 0.16, warmup_epochs=2) == pytest.approx(0.016)
    assert lr_at(1, 0.16, warmup_epochs=2) == pytest.approx(0.16 * 0.55)
    assert lr_at(2, 0.16, warmup_epochs=2) == 0.16
    with pytest.raises(ValueError):
        lr_at(-1, 0.1)


def test_polyak_average_against_a_hand_computation():
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = PolyakAverage(m, decay=0.5, warmup=False)
    for w in (3.0, 5.0):
        with torch.no_grad():
            m.weight.fill_(w)
        ema.update(m)
    # 1 -> 0.5*1 + 0.5*3 = 2 -> 0.5*2 + 0.5*5 = 3.5
    assert ema.state["weight"].item() == pytest.approx(3.5) and ema.updates == 2
    out = nn.Linear(1, 1, bias=False)
    ema.copy_to(out)
    assert out.weight.item() == pytest.approx(3.5)


def test_polyak_warmup_follows_the_num_updates_rule():
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = PolyakAverage(m, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        m.weight.fill_(10.0)
    ema.update(m)
    assert ema.state["weight"].item() == pytest.approx(9.0)  # 0.1 * 0 + 0.9 * 10
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 10**6
    assert ema.current_decay() == 0.999


def test_polyak_copies_integer_buffers():
    bn = nn.BatchNorm1d(2)
    ema = PolyakAverage(bn, 0.9)
    bn.train()(torch.randn(4, 2))
    ema.update(bn)
    assert ema.state["num_batches_tracked"].item() == 1


def test_polyak_update_is_one_foreach_call_not_two_kernels_per_tensor():
    """GoogLeNet-bn has 364 state tensors: the update is one `_foreach_lerp_` (fused on CUDA) and one
    `_foreach_copy_`, with no per-tensor mul_/add_ from the update itself, and the same result."""
    from torch.profiler import profile

    from pipeline.model.googlenet import GoogLeNet

    torch.manual_seed(0)
    m = GoogLeNet(10, variant="bn")
    ema = PolyakAverage(m, 0.99, warmup=False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    expect = {k: (0.99 * v + 0.01 * m.state_dict()[k]) if v.is_floating_point() else m.state_dict()[k].clone()
              for k, v in ema.state.items()}
    with profile() as prof:
        ema.update(m)
    top = [e.name for e in prof.events() if e.cpu_parent is None]  # the calls update() itself made
    assert top.count("aten::_foreach_lerp_") == 1 and top.count("aten::_foreach_copy_") == 1
    assert not {"aten::mul_", "aten::add_", "aten::lerp_", "aten::copy_"} & set(top)
    assert all(torch.allclose(ema.state[k].float(), expect[k].float(), atol=1e-6) for k in expect)


def test_recipes_load_and_validate():
    assert set(list_recipes()) >= {"demo", "fashion-mnist-full", "imagenet-paper"}
    paper = load_recipe("imagenet-paper")
    assert (paper.model.variant, paper.data.input_size, paper.optim.momentum) == ("paper", 224, 0.9)
    assert (paper.schedule.lr_decay, paper.schedule.decay_every, paper.schedule.aux_weight) == (0.96, 8, 0.3)
    assert load_recipe("demo", ["schedule.epochs=2"]).schedule.epochs == 2
    assert load_recipe("demo").ensemble.name == "ensemble-demo"


@pytest.mark.parametrize("sets,field", [
    (["schedule.epochs=0"], "schedule.epochs"), (["optim.lr=-1"], "optim.lr"), (["optim.lr=fast"], "optim.lr"),
    (["model.variant=v3"], "model.variant"), (["optim.lrr=1"], "optim.lrr"), (["data.input_size=16"], "data.input_size"),
    (["schedule.warmup_epochs=99"], "schedule.warmup_epochs"), (["nosuch.x=1"], "nosuch.x"),
    (["schedule.shape=linear"], "schedule.shape"),
])
def test_invalid_configs_name_the_field(sets, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_recipe("demo", sets)


def test_unknown_recipe_lists_the_named_ones():
    with pytest.raises(ConfigError, match="demo, fashion-mnist-full, fashion-mnist-gpu, imagenet-1node, imagenet-paper"):
        load_recipe("resnet")


def _job(*args, env=None):
    import os
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, str(REPO / "jobs" / "train_ensemble.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_train_job_help_and_one_line_errors(mlflow_server, tmp_path):
    out = _job("--help").stdout
    for opt in ("--recipe", "--set", "--replicas", "--workers-per-replica", "--gpus-per-worker", "--max-concurrent",
                "--mlflow-uri"):
        assert opt in out
    p = _job("--set", "schedule.epochs=zero", env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert p.returncode == 2 and "schedule.epochs" in p.stderr and p.stderr.strip().count("\n") == 0
    p = _job("--set", f"data.shards={tmp_path}/missing", env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert p.returncode == 2 and "no manifest.json" in p.stderr and p.stderr.strip().count("\n") == 0
    p = _job(env={"MLFLOW_TRACKING_URI": ""})
    assert p.returncode == 2 and "MLFLOW_TRACKING_URI" in p.stderr


def test_cosine_one_cycle():
    assert lr_at(0, 0.01, warmup_epochs=0.5, shape="cosine", total_epochs=6) == pytest.approx(0.001)
    assert lr_at(0.5, 0.01, warmup_epochs=0.5, shape="cosine", total_epochs=6) == pytest.approx(0.01)
    assert lr_at(3.25, 0.01, warmup_epochs=0.5, shape="cosine", total_epochs=6) == pytest.approx(0.005)  # halfway
    assert lr_at(6, 0.01, warmup_epochs=0.5, shape="cosine", total_epochs=6) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="total_epochs"):
        lr_at(1, 0.01, shape="cosine")
    with pytest.raises(ValueError, match="shape"):
        lr_at(1, 0.01, shape="linear")


def test_checkpoints_load_weights_only_and_refuse_pickled_objects(tmp_path):
    """The loop's checkpoint (model, optimizer with momentum, EMA, history, strings) loads with
    weights_only=True; one that carries any other pickled object is refused with a clear error."""
    import argparse

    from pipeline.model.googlenet import GoogLeNet
    from pipeline.train.loop import CheckpointError, load_checkpoint

    model = GoogLeNet(10, variant="bn", aux_logits=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    opt.step()
    ema = PolyakAverage(model, 0.99)
    ema.update(model)
    state = {"epoch": 1, "model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict(),
             "history": [{"epoch": 1, "val/top1_err": 0.5}], "num_classes": 10, "strategy": "inception",
             "replica": 0}
    torch.save(state, tmp_path / "state.pt")
    got = load_checkpoint(tmp_path / "state.pt")
    assert got["history"] == state["history"] and got["strategy"] == "inception"
    assert torch.equal(got["ema"]["state"]["fc.weight"], ema.state["fc.weight"])
    assert got["optimizer"]["state"][0]["momentum_buffer"].shape == next(model.parameters()).shape
    torch.save({**state, "args": argparse.Namespace(cmd="rm -rf /")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused: the checkpoint holds a pickled object"):
        load_checkpoint(tmp_path / "evil.pt")
