"""Plain PyTorch input pipeline: `webdataset` + torchvision transforms v2 + DataLoader.

The same sampling strategies as the DALI pipeline (`pipeline.data.sampling`), built from torchvision's
transforms: RandomResizedCrop (area uniform, aspect log-uniform, 10 attempts, then a center crop: what
DALI's random crop does too), shortest-side scale jitter + random crop, ColorJitter, horizontal flip.
Not the default: it is the baseline of `benchmarks/data_loading.py` and the reference for parity
tests. Tars are split over ranks and DataLoader workers by whole shard (webdataset's convention), so
the per-rank sample counts are only as even as the shard counts.
"""

from __future__ import annotations

import random

import torch
from torchvision.transforms import v2

from pipeline.data.dali import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.sampling import PHOTOMETRIC, SamplingStrategy
from pipeline.shards.splits import SplitInfo, open_split

_MODES = {"linear": v2.InterpolationMode.BILINEAR, "cubic": v2.InterpolationMode.BICUBIC,
          "nn": v2.InterpolationMode.NEAREST, "area": v2.InterpolationMode.BOX}


class _RandomChoiceOf:
    """Apply one of several transforms, chosen with equal probability per sample."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
        return random.choice(self.transforms)(img)


def strategy_transform(s: SamplingStrategy, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32):
    """PIL RGB image -> normalised CHW tensor, sampled as the strategy says."""
    size = s.input_size

    def crop(mode):
        if s.kind == "area":
            return v2.RandomResizedCrop(size, scale=s.area, ratio=s.aspect, interpolation=mode, antialias=True)
        lo, hi = s.shorter_side
        return v2.Compose([v2.RandomShortestSize(list(range(lo, hi + 1)), interpolation=mode, antialias=True),
                           v2.RandomCrop(size, pad_if_needed=True)])

    # Crops run on the PIL image (PIL has the "box" = area filter; torch tensors do not).
    crops = [crop(_MODES[m]) for m in s.interpolations]
    steps = [crops[0] if len(crops) == 1 else _RandomChoiceOf(crops)]
    if s.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToImage())
    if s.photometric:
        p = PHOTOMETRIC
        colour = {"saturation": p["saturation"], "hue": (p["hue"][0] / 360, p["hue"][1] / 360)} if s.color else {}
        steps.append(v2.ColorJitter(brightness=p["brightness"], contrast=p["contrast"], **colour))
    if dtype == torch.uint8:
        steps.append(v2.ToDtype(torch.uint8))
    else:
        steps += [v2.ToDtype(torch.float32, scale=True),
                  v2.Normalize([m / 255 for m in mean], [sd / 255 for sd in std]), v2.ToDtype(dtype)]
    return v2.Compose(steps)


def torch_train_loader(split: SplitInfo | str, strategy: SamplingStrategy, batch_size: int = 64,
                       num_workers: int = 2, seed: int = 0, rank: int = 0, world_size: int = 1,
                       shuffle_buffer: int = 4096, dtype=torch.float32):
    """A DataLoader of (images, labels) batches; drops the last partial batch of each worker's stream."""
    import webdataset as wds

    info = split if isinstance(split, SplitInfo) else open_split(split)
    urls = [str(p) for p in info.tars][rank::world_size]
    if not urls:
        raise ValueError(f"rank {rank} of {world_size} gets no shard: {len(info.tars)} tars in {info.dir}")
    transform = strategy_transform(strategy, dtype=dtype)
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, nodesplitter=None, empty_check=False)
          .shuffle(shuffle_buffer, seed=seed)
          .decode("pilrgb")
          .to_tuple("jpg", "cls")
          .map_tuple(transform, int)
          .batched(batch_size, partial=False))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=False)
