"""Crop geometry of the paper's multi-crop testing (sec. 7), as pure functions.

"We resize the image to 4 scales where the shorter dimension (height or width) is 256, 288, 320 and
352 respectively, take the left, center and right square of these resized images (in the case of
portrait images, we take the top, center and bottom squares). For each square, we then take the 4
corners and the center 224x224 crop as well as the square resized to 224x224, and their mirrored
versions. This results in 4x3x6x2 = 144 crops per image."

Sizes scale with the model's input size S (224 for ImageNet): scale s becomes round(s * S / 224).
For a square image the three squares coincide, and at every scale the "whole square" view is the whole
image: as the paper's formula counts them, its 144 crops then hold 42 distinct crops. Costs and
averages stay the paper's (duplicates included); `crop_plan` lets the evaluator compute each
distinct crop once and weight it by its multiplicity, which gives the same average.

Order of the 144: scale, then square (left/top, center, right/bottom), then view (top-left, top-right,
bottom-left, bottom-right, center, whole square), then mirror (off, on). The 10-crop set is the 4
corners + center of the center square at the first scale, each mirrored or not; the 1-crop is that
center crop, not mirrored. Both are subsets of the 144 (`crop_subset`).
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_INPUT = 224
PAPER_SCALES = (256, 288, 320, 352)
SQUARES = ("first", "center", "last")  # left/center/right for landscape, top/center/bottom for portrait
VIEWS = ("top-left", "top-right", "bottom-left", "bottom-right", "center", "whole")
SCHEMES = (1, 10, 144)


@dataclass(frozen=True)
class Crop:
    """One crop: resize the W x H image to `resized` (w, h), cut `box` = (x0, y0, x1, y1) (pixels of the
    resized image, x1/y1 exclusive), resize that box to size x size, then mirror horizontally if `mirror`."""

    scale: int
    resized: tuple[int, int]
    square: str
    view: str
    box: tuple[int, int, int, int]
    size: int
    mirror: bool

    def box_in_original(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The same box in the original image's pixel coordinates (what a fused crop+resize needs)."""
        fx, fy = width / self.resized[0], height / self.resized[1]
        x0, y0, x1, y1 = self.box
        return (x0 * fx, y0 * fy, x1 * fx, y1 * fy)


def scales_for(input_size: int) -> tuple[int, ...]:
    return tuple(round(s * input_size / PAPER_INPUT) for s in PAPER_SCALES)


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """Resize so that the shorter side is `shorter`, keeping the aspect ratio (rounded)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width <= height:
        return shorter, max(shorter, round(height * shorter / width))
    return max(shorter, round(width * shorter / height)), shorter


def _square_origins(w: int, h: int, s: int) -> list[tuple[int, int]]:
    if w >= h:  # landscape (or square): left, center, right
        return [(0, 0), ((w - s) // 2, 0), (w - s, 0)]
    return [(0, 0), (0, (h - s) // 2), (0, h - s)]  # portrait: top, center, bottom


def _views(sx: int, sy: int, s: int, c: int) -> list[tuple[int, int, int, int]]:
    e = s - c
    return [(sx, sy, sx + c, sy + c), (sx + e, sy, sx + s, sy + c), (sx, sy + e, sx + c, sy + s),
            (sx + e, sy + e, sx + s, sy + s), (sx + e // 2, sy + e // 2, sx + e // 2 + c, sy + e // 2 + c),
            (sx, sy, sx + s, sy + s)]


def crops_144(width: int, height: int, input_size: int = PAPER_INPUT) -> list[Crop]:
    """All 144 crops of a width x height image, in the documented order."""
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    out = []
    for s in scales_for(input_size):
        w, h = resized_size(width, height, s)
        for square, (sx, sy) in zip(SQUARES, _square_origins(w, h, s), strict=True):
            for view, box in zip(VIEWS, _views(sx, sy, s, input_size), strict=True):
                for mirror in (False, True):
                    out.append(Crop(s, (w, h), square, view, box, input_size, mirror))
    return out


def crop_subset(n: int) -> list[int]:
    """Indices into `crops_144` of the n-crop scheme (1, 10 or 144)."""
    if n == 144:
        return list(range(144))
    per_view, per_square = 2, 2 * len(VIEWS)
    center_square = SQUARES.index("center") * per_square  # first scale
    if n == 10:
        return [center_square + v * per_view + m for v in range(5) for m in (0, 1)]
    if n == 1:
        return [center_square + VIEWS.index("center") * per_view]
    raise ValueError(f"crop scheme must be one of {SCHEMES}, not {n}")


def crops(width: int, height: int, n: int, input_size: int = PAPER_INPUT) -> list[Crop]:
    """The n-crop scheme (1, 10 or 144) for a width x height image."""
    all_crops = crops_144(width, height, input_size)
    return [all_crops[i] for i in crop_subset(n)]


def relative_roi(c: Crop) -> tuple[float, float, float, float]:
    """The crop's box relative to the image, (y0, x0, y1, x1) in [0, 1], as float32 values (what the
    DALI eval pipeline is given: two crops with equal relative ROIs and mirror flags are the same pixels)."""
    import numpy as np

    x0, y0, x1, y1 = c.box
    rw, rh = c.resized
    return tuple(float(v) for v in np.array([y0 / rh, x0 / rw, y1 / rh, x1 / rw], dtype=np.float32))


@dataclass(frozen=True)
class CropPlan:
    """How one image's n crops are made: DALI cuts each distinct box once (`boxes`: (y0, x0, y1, x1)
    relative to the image); `pairs` lists the distinct crops to compute as (box, mirrored); crop j of
    the scheme is pairs[inverse[j]]. Identical boxes give identical pixels, so this is exact."""

    boxes: tuple[tuple[float, float, float, float], ...]
    pairs: tuple[tuple[int, bool], ...]
    inverse: tuple[int, ...]


def crop_plan(width: int, height: int, n: int, input_size: int) -> CropPlan:
    boxes, pairs, inverse = {}, {}, []
    for c in crops(width, height, n, input_size):
        box = boxes.setdefault(relative_roi(c), len(boxes))
        inverse.append(pairs.setdefault((box, c.mirror), len(pairs)))
    return CropPlan(tuple(boxes), tuple(pairs), tuple(inverse))
