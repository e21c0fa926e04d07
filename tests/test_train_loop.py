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


def test_each_epoch_says_where_the_step_time_went_and_a_starved_replica_is_input_bound(small_shards, tmp_path):
    """Every epoch's metrics split the step time (waiting for data, forward+backward, optimizer, Polyak,
    the rest) and time the checkpoint. One CPU thread for torch and one for DALI, as a Ray worker of one CPU
    has: a replica fed 28 px images is not input-bound; the same training fed 2,400 x 2,400 JPEGs (decoded
    whole and resized: scale jitter) waits for its data a large part of the time, and the driver's verdict
    names it with what to change."""
    import torch
    from conftest import jpeg_bytes, write_test_split

    from pipeline.train.timing import INPUT_BOUND, input_bound_advice

    big = tmp_path / "big"
    photo = jpeg_bytes((2400, 2400), seed=0, quality=80)
    write_test_split(big / "train", [photo] * 24, [i % 10 for i in range(24)], per_shard=24)
    write_test_split(big / "val", [jpeg_bytes((28, 28), mode="L", seed=100 + i) for i in range(8)],
                     [i % 10 for i in range(8)])
    fracs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, shards in (("small", small_shards), ("big", big)):
            cfg = load_recipe("demo", [f"data.shards={shards}", "data.limit_train=24", "data.limit_val=8",
                                       "data.batch_size=4", "schedule.epochs=2", "data.num_threads=1",
                                       "data.input_size=32"])
            out = train_replica({"train": cfg.to_dict(), "replica": 0, "strategy": "scale-jitter", "seed": 0,
                                 "local_dir": str(tmp_path / f"ckpt-{name}"), "log_every": 0})
            last = out["history"][-1]
            parts = {k: v for k, v in last.items() if k.startswith("time/") and k.endswith("_frac")}
            assert set(parts) == {f"time/{p}_frac" for p in ("data_wait", "forward_backward", "optimizer", "polyak",
                                                             "other")}, last
            assert all(0 <= v <= 1 for v in parts.values()) and abs(sum(parts.values()) - 1) < 1e-6, parts
            assert last["time/checkpoint_s"] > 0
            fracs[name] = last["time/data_wait_frac"]
    finally:
        torch.set_num_threads(threads)
    assert fracs["small"] < INPUT_BOUND < fracs["big"], fracs
    assert input_bound_advice(0, "scale-jitter", fracs["small"]) is None
    advice = input_bound_advice(0, "scale-jitter", fracs["big"])
    assert advice.startswith("replica 0 (scale-jitter) is input-bound: it waited for its next batch") and \
        "ensemble.cpus_per_worker" in advice and "data.device=gpu" in advice and "ensemble.max_concurrent" in advice
