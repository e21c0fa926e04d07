"""DALI training pipelines, CPU-only, on splits written by the library's shard writer."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, ramp_png, solid_jpeg, write_test_split

from pipeline.data.dali import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
from pipeline.data.sampling import get_strategy, list_strategies

COLOUR = (200, 60, 120)


@pytest.fixture(scope="module")
def solid_split(tmp_path_factory):
    d = tmp_path_factory.mktemp("solid") / "train"
    return write_test_split(d, [solid_jpeg(COLOUR, size=(48 + i % 7, 40 + i % 5)) for i in range(96)],
                            [i % 10 for i in range(96)])


@pytest.fixture(scope="module")
def unique_split(tmp_path_factory):
    """200 distinct images, label = sample index: batches reveal the order samples were read in."""
    d = tmp_path_factory.mktemp("unique") / "train"
    return write_test_split(d, [jpeg_bytes(seed=i, size=(40, 32)) for i in range(200)], list(range(200)), per_shard=25)


def loader(split, name, size=32, exclude=(), state=None, **kw):
    kw.setdefault("device", "cpu")
    return DALITrainLoader(split, TrainPipelineConfig(get_strategy(name, size), **kw), exclude=exclude, state=state)


@pytest.mark.parametrize("name", list_strategies())
def test_every_strategy_gives_normalised_nchw_batches(solid_split, name):
    ld = loader(solid_split, name, batch_size=16, seed=3)
    assert len(ld) == 96 // 16
    batches = list(ld)
    assert len(batches) == 6
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64 and int(y.max()) < 10
    expect = torch.tensor([(c - m) / s for c, m, s in zip(COLOUR, IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    per_image = x.mean(dim=(2, 3))  # [B, 3]
    if get_strategy(name).photometric:
        # colour statistics vary from image to image, all around the true colour
        assert per_image.std(dim=0).min() > 0.05
    else:
        assert torch.allclose(per_image, expect.expand_as(per_image), atol=0.03)  # JPEG q100 +- 1 level


def test_uint8_and_float16_outputs(solid_split):
    x, _ = next(iter(loader(solid_split, "inception", batch_size=8, dtype="uint8")))
    assert x.dtype == torch.uint8 and (x.float().mean(dim=(0, 2, 3)) - torch.tensor(COLOUR)).abs().max() < 2
    x, _ = next(iter(loader(solid_split, "inception", batch_size=8, dtype="float16")))
    assert x.dtype == torch.float16


def read_labels(ld, n_batches):
    out = []
    for i, (_, y) in enumerate(ld):
        out += y.tolist()
        if i + 1 == n_batches:
            break
    return out


def test_same_seed_same_batches_other_replica_other_order(unique_split):
    a = read_labels(loader(unique_split, "inception", batch_size=20, seed=7), 10)
    b = read_labels(loader(unique_split, "inception", batch_size=20, seed=7), 10)
    c = read_labels(loader(unique_split, "inception", batch_size=20, seed=8), 10)
    assert a == b
    assert a != c and sorted(a) == sorted(c) == list(range(200))  # one epoch: every sample once


def test_samples_are_reshuffled_between_epochs(unique_split):
    ld = loader(unique_split, "inception", batch_size=20, seed=7)
    first = read_labels(ld, 10)
    ld.set_epoch(1)
    second = read_labels(ld, 10)  # the iterator ends with the epoch and resets for the next one
    assert sorted(first) == sorted(second) == list(range(200)) and first != second


def test_two_ranks_split_an_epoch_without_overlap(unique_split):
    r0 = loader(unique_split, "inception", batch_size=10, seed=2, shard_id=0, num_shards=2)
    r1 = loader(unique_split, "inception", batch_size=10, seed=2, shard_id=1, num_shards=2)
    assert len(r0) == len(r1) == 10
    a, b = read_labels(r0, 10), read_labels(r1, 10)
    assert not set(a) & set(b) and len(set(a) | set(b)) == 200


def test_area_and_aspect_of_inception_crops_measured_on_a_ramp_image(tmp_path):
    """Strategy 0's crop windows, read off a coordinate-encoded image: area in [8%, 100%], aspect in [3/4, 4/3]."""
    W, H = 240, 160
    split = write_test_split(tmp_path / "ramp", [ramp_png(W, H)] * 50, [0] * 50)
    strategy = replace(get_strategy("inception", 64), flip=False)
    ld = DALITrainLoader(split, TrainPipelineConfig(strategy, batch_size=50, seed=11, device="cpu", dtype="uint8"))
    areas, aspects = [], []
    while len(areas) < 2000:  # 40 epochs of the one-batch split
        (x, _), = list(ld)
        x = x.float()
        # window edges from the ramp values at the output's borders (+ half an output pixel each side)
        r_left, r_right = x[:, 0, :, 0].mean(1), x[:, 0, :, -1].mean(1)
        g_top, g_bottom = x[:, 1, 0, :].mean(1), x[:, 1, -1, :].mean(1)
        w = (r_right - r_left) / 255 * (W - 1) * 64 / 63
        h = (g_bottom - g_top) / 255 * (H - 1) * 64 / 63
        areas += (w * h / (W * H)).tolist()
        aspects += (w / h).tolist()
    areas, aspects = np.array(areas), np.array(aspects)
    assert len(areas) == 2000
    assert areas.min() > 0.08 * 0.9 and areas.max() < 1.0 * 1.05
    assert aspects.min() > 0.75 * 0.93 and aspects.max() < 4 / 3 * 1.07
    # spread over the ranges, not stuck at one end: both small and near-full crops occur
    assert (areas < 0.2).mean() > 0.05 and (areas > 0.7).mean() > 0.05
    assert (aspects < 0.85).mean() > 0.05 and (aspects > 1.18).mean() > 0.05


def test_bad_config_is_a_clear_error(unique_split):
    with pytest.raises(ValueError, match="shard_id"):
        loader(unique_split, "inception", shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="dtype"):
        loader(unique_split, "inception", dtype="bfloat16")
    with pytest.raises(ValueError, match="device"):
        loader(unique_split, "inception", device="tpu")


def test_photometric_jitter_keeps_grayscale_images_gray(tmp_path):
    """On a 1-channel source the photometric replica varies brightness and contrast only: its RGB output
    stays gray (R = G = B), while brightness still changes from image to image."""
    from pipeline.shards.splits import image_profile

    gray = write_test_split(tmp_path / "gray" / "train", [jpeg_bytes(seed=i, size=(28, 28), mode="L")
                                                         for i in range(32)], [i % 10 for i in range(32)])
    assert image_profile(gray) == (28, 1)
    s = get_strategy("inception-photometric", 32).for_source(*image_profile(gray))
    x, _ = next(iter(DALITrainLoader(gray, TrainPipelineConfig(s, batch_size=16, device="cpu", dtype="uint8"))))
    x = x.int()
    assert (x[:, 0] - x[:, 1]).abs().max() <= 1 and (x[:, 1] - x[:, 2]).abs().max() <= 1
    assert x.float().mean(dim=(1, 2, 3)).std() > 2


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    imgs = [solid_jpeg((i * 3, 0, 0), size=(8, 8)) for i in range(64)]
    return {n: write_test_split(tmp_path_factory.mktemp(f"n{n}") / "train", imgs[:n], list(range(n)), per_shard=11)
            for n in (37, 50, 64)}


@pytest.mark.parametrize("n,world,batch", [(37, 2, 4), (37, 3, 4), (37, 4, 2), (50, 3, 4), (50, 4, 3), (50, 7, 2),
                                           (64, 3, 5), (64, 5, 4), (64, 1, 64), (37, 1, 5)])
def test_len_is_the_batch_count_dali_gives_every_rank_every_epoch(tiny_splits, n, world, batch):
    """DALI's iterator (last batch dropped) stops every rank at the smallest shard: (n // world) // batch
    batches, every epoch (the LR fraction and ETA use len)."""
    for rank in range(world):
        ld = loader(tiny_splits[n], "inception", size=32, batch_size=batch, shard_id=rank, num_shards=world,
                    num_threads=1)
        counts = [sum(1 for _ in ld) for _ in range(3)]
        assert counts == [len(ld)] * 3, (rank, counts, len(ld))


def batches(ld, n):
    out = []
    for x, y in ld:
        out.append((y.tolist(), x.sum().item()))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("stop,name", [(4, "inception-photometric"), (10, "inception-photometric"),
                                       (4, "inception-random-interp")])  # (DALI resizes; torch resizes)
def test_state_restores_the_data_position_and_augmentation(unique_split, stop, name):
    """A loader rebuilt from `state()` continues with the very batches (samples and augmented pixels)
    the uninterrupted loader gives, across the next epoch boundary (mid-epoch, a data.limit_train
    epoch, and exactly at its end)."""
    kw = dict(batch_size=20, seed=7, shard_id=1, num_shards=2, num_threads=1)
    whole = loader(unique_split, name, **kw)
    first, after = batches(whole, stop), batches(whole, 5) + batches(whole, 5)
    cut = loader(unique_split, name, **kw)
    assert batches(cut, stop) == first
    state = cut.state()
    assert isinstance(state["dali"], bytes) and state["skipped"] == []
    resumed = DALITrainLoader(unique_split, TrainPipelineConfig(get_strategy(name, 32), device="cpu", **kw), state=state)
    assert batches(resumed, 5) + batches(resumed, 5) == after
    fresh = batches(loader(unique_split, name, **kw), 5)
    assert fresh != after[:5]  # (what today's resume did: the order from the start)


def test_a_position_saved_by_the_other_resize_is_refused_not_crashed_on(unique_split):
    """Where torch resizes, DALI's graph has other operators, and DALI cannot restore a checkpoint of the
    other graph (nor one saved before torch resized: no "resize" entry): a clear ValueError, on which
    training starts the data order afresh, instead of an error inside DALI."""
    kw = dict(batch_size=20, seed=7, num_threads=1)
    dali_state = loader(unique_split, "inception", host_resize=False, **kw).state()
    torch_state = loader(unique_split, "inception", **kw).state()
    assert (dali_state["resize"], torch_state["resize"]) == ("dali", "torch")
    for state in (dali_state, {k: v for k, v in dali_state.items() if k != "resize"}):
        with pytest.raises(ValueError, match="resized in dali, this one resizes in torch"):
            loader(unique_split, "inception", state=state, **kw)
    with pytest.raises(ValueError, match="resized in torch, this one resizes in dali"):
        loader(unique_split, "inception", host_resize=False, state=torch_state, **kw)
    old = {k: v for k, v in dali_state.items() if k != "resize"}  # saved before: restores where DALI resizes
    assert batches(loader(unique_split, "inception", host_resize=False, state=old, **kw), 2)


def test_excluded_images_are_left_out_by_every_rank_equally(tmp_path):
    from test_dali_bad_input import CORRUPT

    from pipeline.data.dali_train import CorruptImageError

    images = [jpeg_bytes(seed=i, size=(40, 30)) for i in range(41)]
    images[13] = CORRUPT
    split = write_test_split(tmp_path / "train", images, list(range(41)), per_shard=10)
    cfg = dict(batch_size=4, seed=1, num_shards=2, num_threads=1)
    # a data-parallel rank that meets an image nobody told it to leave out stops with a clear error
    # instead of ending its epoch alone (the other rank would wait in a collective)
    errors = []
    for rank in (0, 1):
        ld = loader(split, "inception", shard_id=rank, **cfg)
        try:
            for _ in range(3):
                list(ld)
        except CorruptImageError as e:
            errors.append(str(e))
    assert errors and all(re.search(r"rank \d of 2: corrupt image\(s\) test-split-000001.tar:s000013", e)
                          for e in errors)
    seen = []
    lens = []
    for rank in (0, 1):
        ld = loader(split, "inception", shard_id=rank, exclude=["test-split-000001.tar:s000013"], **cfg)
        lens.append(len(ld))
        for _ in range(2):
            seen += [label for _, y in ld for label in y.tolist()]
    assert lens == [5, 5]  # 40 images left: 20 per rank, 5 batches each
    assert 13 not in seen and len(seen) == 2 * 2 * 5 * 4


@pytest.mark.parametrize("size", [32, 96])  # half the source's size (antialiasing matters) and 1.5x
def test_torch_resizes_crops_as_dali_does(tmp_path, size):
    """On CPU, area-sampling pipelines hand the crops to torch to resize (faster than DALI's CPU resize);
    each interpolation gives what DALI's resize gives on the same crop, to rounding: the whole image as
    the crop (area 1, the image's aspect), a pattern with fine detail, uint8 outputs compared."""
    import io

    from PIL import Image

    W, H = 64, 48
    yy, xx = np.mgrid[0:H, 0:W]
    arr = np.stack([127 + 100 * np.sin(xx / 2.1) * np.cos(yy / 3.3), 4 * xx, 5 * yy], -1).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    split = write_test_split(tmp_path / "pattern", [buf.getvalue()] * 8, [0] * 8)
    for interp in ("linear", "cubic", "nn", "area"):
        s = replace(get_strategy("inception", size), area=(1.0, 1.0), aspect=(W / H, W / H), flip=False,
                    interpolations=(interp,))
        out = {}
        for host in (None, False):
            ld = DALITrainLoader(split, TrainPipelineConfig(s, batch_size=8, device="cpu", dtype="uint8", host_resize=host))
            assert ld.host_resize is (host is None)  # the default on CPU: torch resizes
            x, _ = next(iter(ld))
            out[host] = x.float()
        diff = (out[None] - out[False]).abs()
        assert diff.mean() < 0.3 and diff.max() <= 6, (interp, float(diff.mean()), float(diff.max()))
        assert out[None].std() > 30  # (the pattern survives: not a flat image compared with another)


def test_only_cpu_area_sampling_resizes_in_torch(solid_split):
    assert loader(solid_split, "inception").host_resize
    assert loader(solid_split, "inception-random-interp").host_resize
    assert not loader(solid_split, "scale-jitter").host_resize  # (resizes the whole image, then crops)
    assert not loader(solid_split, "inception-photometric").host_resize  # (distorts the resized image)
    assert not loader(solid_split, "inception", host_resize=False).host_resize


def test_a_strategy_defined_in_a_recipe_reaches_the_dali_pipeline(tmp_path):
    """A recipe's own strategy (ensemble.custom_strategies), resolved as the training loop resolves it,
    drives DALI's crop window: large crops of a narrow aspect only, read off a coordinate-encoded image."""
    from pipeline.config import load_recipe

    cfg = load_recipe("demo", ["ensemble.replicas=2", "ensemble.strategies=[inception, big-narrow]",
                               "ensemble.custom_strategies={big-narrow: {kind: area, area: [0.6, 0.8], "
                               "aspect: [1.2, 1.3], flip: false}}"])
    assert cfg.strategy_names() == ["inception", "big-narrow"]
    strategy = get_strategy("big-narrow", 64, cfg.ensemble.custom_strategies)
    assert (strategy.area, strategy.aspect, strategy.flip) == ((0.6, 0.8), (1.2, 1.3), False)
    W, H = 240, 160
    split = write_test_split(tmp_path / "ramp", [ramp_png(W, H)] * 50, [0] * 50)
    ld = DALITrainLoader(split, TrainPipelineConfig(strategy, batch_size=50, seed=3, device="cpu", dtype="uint8"))
    areas, aspects = [], []
    for _ in range(4):
        (x, _), = list(ld)
        x = x.float()
        w = (x[:, 0, :, -1].mean(1) - x[:, 0, :, 0].mean(1)) / 255 * (W - 1) * 64 / 63
        h = (x[:, 1, -1, :].mean(1) - x[:, 1, 0, :].mean(1)) / 255 * (H - 1) * 64 / 63
        areas += (w * h / (W * H)).tolist()
        aspects += (w / h).tolist()
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() > 0.6 * 0.9 and areas.max() < 0.8 * 1.1, (areas.min(), areas.max())
    assert aspects.min() > 1.2 * 0.93 and aspects.max() < 1.3 * 1.07, (aspects.min(), aspects.max())
