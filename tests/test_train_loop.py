"""The training loop in-process (no Ray, no MLflow) on a small split written by the library."""

import pytest
from conftest import jpeg_bytes, write_test_split

from pipeline.config import load_recipe
from pipeline.train.loop import train_replica


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    write_test_split(d / "train", [jpeg_bytes((28, 28), mode="L", seed=i) for i in range(200)],
                     [i % 10 for i in range(200)], per_shard=64)
    write_test_split(d / "val", [jpeg_bytes((28, 28), mode="L", seed=1000 + i) for i in range(40)],
                     [i % 10 for i in range(40)])
    return d


def test_limit_train_is_exactly_that_many_images_every_epoch(small_shards, tmp_path):
    """200 samples, batch 16: the loader's epoch is 12 batches. limit_train=160 (10 batches) makes
    epoch 2 run past the loader's end into its next epoch: still 10 batches, every epoch."""
    cfg = load_recipe("demo", [f"data.shards={small_shards}", "data.limit_train=160", "data.limit_val=16",
                               "data.batch_size=16", "schedule.epochs=4", "data.num_threads=1"])
    out = train_replica({"train": cfg.to_dict(), "replica": 0, "strategy": "inception", "seed": 0,
                         "local_dir": str(tmp_path / "ckpt"), "log_every": 0})
    assert [h["train/images"] for h in out["history"]] == [160, 160, 160, 160]
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4]
