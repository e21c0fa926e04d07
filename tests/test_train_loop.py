"""The training loop in-process (no Ray, no MLflow) on a small split written by the library."""


from pipeline.config import load_recipe
from pipeline.train.loop import train_replica


def test_limit_train_is_exactly_that_many_images_every_epoch(small_shards, tmp_path):
    """200 samples, batch 16: the loader's epoch is 12 batches. limit_train=160 (10 batches) makes
    epoch 2 run past the loader's end into its next epoch: still 10 batches, every epoch."""
    cfg = load_recipe("demo", [f"data.shards={small_shards}", "data.limit_train=160", "data.limit_val=16",
                               "data.batch_size=16", "schedule.epochs=4", "data.num_threads=1"])
    out = train_replica({"train": cfg.to_dict(), "replica": 0, "strategy": "inception", "seed": 0,
                         "local_dir": str(tmp_path / "ckpt"), "log_every": 0})
    assert [h["train/images"] for h in out["history"]] == [160, 160, 160, 160]
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4]


def test_a_checkpoint_written_to_a_full_disk_is_an_oserror_naming_the_cause(tmp_path):
    """torch.save reports a write that runs out of room as a RuntimeError from its zip writer ("unexpected
    pos ..."), naming neither the disk nor the cause; the loop's save raises it as the OSError it is
    (No space left on device), which the replica's checkpoint error then names with its folder, and
    leaves no part-written file."""
    import errno

    import pytest
    import torch
    from conftest import small_tmpfs

    from pipeline.train.loop import save_state

    state = {"w": torch.randn(1_000_000)}  # 4 MB
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        with pytest.raises(RuntimeError):
            torch.save(state, disk / "plain.pt")
        (disk / "plain.pt").unlink(missing_ok=True)
        with pytest.raises(OSError) as e:
            save_state(state, disk / "checkpoint.pt")
        assert e.value.errno == errno.ENOSPC and "No space left on device" in str(e.value)
        assert not (disk / "checkpoint.pt").exists()
