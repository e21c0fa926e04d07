"""The plain PyTorch fallback implements the same strategies as DALI (parity on controlled images)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ramp_png, solid_jpeg, write_test_split

from pipeline.data.dali import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
from pipeline.data.fallback import torch_train_loader
from pipeline.data.sampling import get_strategy, list_strategies

COLOUR = (30, 140, 220)


@pytest.mark.parametrize("name", list_strategies())
def test_fallback_batches_match_dali_on_a_solid_colour(tmp_path, name):
    split = write_test_split(tmp_path / "s", [solid_jpeg(COLOUR, (50, 40))] * 40, [i % 4 for i in range(40)],
                             per_shard=10)
    x, y = next(iter(torch_train_loader(split, get_strategy(name, 32), batch_size=8, num_workers=0)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    expect = torch.tensor([(c - m) / s for c, m, s in zip(COLOUR, IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    per_image = x.mean(dim=(2, 3))
    if get_strategy(name).photometric:
        assert per_image.std(dim=0).min() > 0.05
    else:
        assert torch.allclose(per_image, expect.expand_as(per_image), atol=0.03)


def crop_windows(batches, W, H, S):
    """(area fraction, aspect) of each crop, read off a coordinate-encoded uint8 image batch."""
    areas, aspects = [], []
    for x in batches:
        x = x.float()
        w = (x[:, 0, :, -1].mean(1) - x[:, 0, :, 0].mean(1)) / 255 * (W - 1) * S / (S - 1)
        h = (x[:, 1, -1, :].mean(1) - x[:, 1, 0, :].mean(1)) / 255 * (H - 1) * S / (S - 1)
        areas += (w * h / (W * H)).tolist()
        aspects += (w / h).tolist()
    return np.array(areas), np.array(aspects)


def test_area_and_aspect_distributions_agree_with_dali(tmp_path):
    W, H, S = 240, 160, 64
    split = write_test_split(tmp_path / "ramp", [ramp_png(W, H)] * 40, [0] * 40, per_shard=10)
    s = replace(get_strategy("inception", S), flip=False)
    dali = DALITrainLoader(split, TrainPipelineConfig(s, batch_size=40, seed=3, device="cpu", dtype="uint8"))
    d_area, d_aspect = crop_windows([x for _ in range(25) for x, _ in dali], W, H, S)
    fb = [x for seed in range(25) for x, _ in torch_train_loader(split, s, batch_size=40, num_workers=0, seed=seed,
                                                                  dtype=torch.uint8)]
    t_area, t_aspect = crop_windows(fb, W, H, S)
    assert len(d_area) == len(t_area) == 1000
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(d_area, q) - np.quantile(t_area, q)) < 0.06, q
        assert abs(np.quantile(np.log(d_aspect), q) - np.quantile(np.log(t_aspect), q)) < 0.06, q
