"""Data-parallel correctness of a replica and the paper's protocol options, on CPU with real
DALI: the GPU each worker's DALI uses, per-rank RNG, exact resume of data position and RNG, BVLC's
bias rule, the same initial weights for every replica."""

import pytest
import torch

from pipeline.config import EnsembleConfig, load_recipe
from pipeline.data.dali import gpu_ordinal, worker_gpu
from pipeline.train.ensemble import init_seed, replica_seed
from pipeline.train.loop import (
    build_model,
    devices,
    load_checkpoint,
    param_groups,
    rank_seed,
    set_lr,
    train_replica,
)


def test_each_worker_gets_its_own_gpu_from_the_shared_visible_list():
    """Ray Train gives the 4 workers of a replica on one node CUDA_VISIBLE_DEVICES=<their 4 GPUs>; each
    worker's own GPU is where its Ray-assigned id sits in that list (ordinal 0 for all was the bug)."""
    visible = "4,5,6,7"
    assert [gpu_ordinal([str(4 + local_rank)], visible) for local_rank in range(4)] == [0, 1, 2, 3]
    assert gpu_ordinal(["5"], "3,5,7") == 1
    assert gpu_ordinal(["2"], None) == 2  # every GPU visible: ids are ordinals
    assert gpu_ordinal([], "0,1") == 0  # no GPU assigned (CPU worker)
    with pytest.raises(RuntimeError, match="not in CUDA_VISIBLE_DEVICES"):
        gpu_ordinal(["9"], "0,1")


def test_without_cuda_training_and_dali_stay_on_cpu(monkeypatch):
    cfg = load_recipe("demo", ["ensemble.gpus_per_worker=1", "data.device=cpu"])
    assert devices(cfg) == (torch.device("cpu"), None)
    assert worker_gpu() == 0


def test_ranks_draw_different_dropout_masks_and_a_rerun_epoch_the_same():
    def mask(seed, rank, epoch):
        torch.manual_seed(rank_seed(seed, rank, epoch))
        return torch.nn.functional.dropout(torch.ones(4096), 0.4, training=True) > 0

    assert not torch.equal(mask(3, 0, 0), mask(3, 1, 0))  # the two ranks of one replica
    assert not torch.equal(mask(3, 0, 0), mask(3, 0, 1))  # the next epoch
    assert not torch.equal(mask(3, 0, 0), mask(4, 0, 0))  # another replica
    assert torch.equal(mask(3, 1, 2), mask(3, 1, 2))  # a resumed epoch draws what it drew
    assert len({rank_seed(s, r, e) for s in range(3) for r in range(4) for e in range(5)}) == 60


def _run(shards, folder, epochs):
    cfg = load_recipe("demo", [f"data.shards={shards}", "data.limit_train=112", "data.limit_val=16",
                               "data.batch_size=16", f"schedule.epochs={epochs}", "schedule.shape=step",
                               "schedule.warmup_epochs=0", "data.num_threads=1", "model.dropout=0.5"])
    return train_replica({"train": cfg.to_dict(), "replica": 0, "strategy": "inception-photometric", "seed": 5,
                          "local_dir": str(folder), "log_every": 0})


def test_a_resumed_replica_trains_exactly_like_an_uninterrupted_one(small_shards, tmp_path):
    """3 epochs of 7 batches (112 of 200 images: epochs end mid-way through DALI's epoch) in one go,
    and 2 epochs + a restart from the checkpoint for the 3rd: the same samples, augmentations and
    dropout masks, hence bit-identical weights, Polyak average and optimizer state."""
    torch.set_num_threads(1)
    whole = _run(small_shards, tmp_path / "whole", 3)
    _run(small_shards, tmp_path / "cut", 2)
    cut_state = load_checkpoint(tmp_path / "cut" / "state.pt")
    assert cut_state["epoch"] == 2 and isinstance(cut_state["data"][0]["dali"], bytes)
    resumed = _run(small_shards, tmp_path / "cut", 3)
    a, b = load_checkpoint(tmp_path / "whole" / "state.pt"), load_checkpoint(tmp_path / "cut" / "state.pt")
    assert b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"]["state"][key], b["ema"]["state"][key]), key
    assert [h["train/loss"] for h in whole["history"]] == [h["train/loss"] for h in resumed["history"]]


def test_bvlc_bias_rule_doubles_the_bias_rate_without_decay():
    cfg = load_recipe("imagenet-paper", ["data.shards=/nonexistent"])
    assert (cfg.optim.bias_lr_mult, cfg.optim.bias_decay, cfg.ensemble.same_init) == (2.0, False, True)
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    opt = torch.optim.SGD(param_groups(model, cfg), lr=1.0, momentum=0.0, weight_decay=cfg.optim.weight_decay)
    set_lr(opt, 0.1)
    w0, b0 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    model.fc.weight.grad = torch.ones_like(w0)
    model.fc.bias.grad = torch.ones_like(b0)
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt.step()
    wd = cfg.optim.weight_decay
    assert torch.allclose(model.fc.weight, w0 - 0.1 * (1 + wd * w0))  # lr, with decay
    assert torch.allclose(model.fc.bias, b0 - 0.2 * 1)  # 2 x lr, no decay
    # the default recipes keep one group (plain SGD over every parameter)
    demo = load_recipe("demo")
    assert len(param_groups(build_model(demo, 10), demo)) == 1


def test_same_init_gives_every_replica_the_same_initial_weights():
    same, own = EnsembleConfig(seed=3, same_init=True), EnsembleConfig(seed=3)
    assert {init_seed(same, i) for i in range(7)} == {replica_seed(3, 0)}
    assert [init_seed(own, i) for i in range(7)] == [replica_seed(3, i) for i in range(7)]
    cfg = load_recipe("demo")

    def weights(seed):
        torch.manual_seed(seed)
        return build_model(cfg, 10).state_dict()

    a, b = weights(init_seed(same, 1)), weights(init_seed(same, 5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = weights(init_seed(own, 5))
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
