"""Plain-torch multi-crop, the reference the DALI eval pipeline is checked against (and the fallback).

Follows the paper's steps literally: resize the whole image so the shorter side is the scale, cut the
box, resize the "whole square" view to the input size, mirror. Uses the same crop geometry
(`pipeline.data.crops`) as DALI, which instead cuts each box with one ROI resize.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from pipeline.data.crops import crops


def decode_rgb(jpg: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 [3, H, W] (PIL, converted to RGB)."""
    img = Image.open(io.BytesIO(jpg)).convert("RGB")
    return TF.pil_to_tensor(img)


def torch_crops(image: torch.Tensor, n_crops: int, input_size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [n_crops, 3, S, S] in the order of `crops(W, H, n_crops)`."""
    _, h, w = image.shape
    resized_cache: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for c in crops(w, h, n_crops, input_size):
        if c.resized not in resized_cache:
            resized_cache[c.resized] = TF.resize(image, [c.resized[1], c.resized[0]], antialias=True,
                                                 interpolation=TF.InterpolationMode.BILINEAR)
        x0, y0, x1, y1 = c.box
        crop = resized_cache[c.resized][:, y0:y1, x0:x1]
        if crop.shape[-1] != input_size:
            crop = TF.resize(crop, [input_size, input_size], antialias=True, interpolation=TF.InterpolationMode.BILINEAR)
        out.append(TF.horizontal_flip(crop) if c.mirror else crop)
    return torch.stack(out)
