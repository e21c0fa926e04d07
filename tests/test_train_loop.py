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
