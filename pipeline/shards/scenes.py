"""Fashion-MNIST scenes: each 28x28 garment placed in a larger RGB scene, at many scales and positions.

Fashion-MNIST's garments fill their frame at one scale, so multi-crop evaluation and scale/aspect
sampling have nothing to find. The `fashion-mnist-scenes` source turns image i of a split into a
`canvas` x `canvas` RGB scene: the garment scaled to a fraction of the canvas side sampled
log-uniformly from `scale`, stretched by an aspect ratio sampled log-uniformly from `aspect`, placed at
a uniformly random position that lets up to `cutoff` of its frame's area fall outside the canvas, tinted
and brightened a little, over a smooth random background (a random two-colour gradient plus coarse and
finer noise, drawn on a 12 x 12 grid of cells upsampled bilinearly to the canvas). The Fashion-MNIST intensity is both the garment's
luminance and (doubled, clipped) its alpha mask: its background is black, so it becomes transparent.

Every random choice comes from `np.random.default_rng([seed, split code, i])`: the bytes of a scene
depend only on the settings, the split and the image's index, never on shard assignment or workers.
Changing the drawing (any change to what a given seed gives) must change `GENERATOR`, which is part of
the job's recorded settings, so shards drawn by another generator are refused rather than mixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

GENERATOR = "fashion-mnist-scenes/1"
SPLIT_CODES = {"train": 0, "val": 1}
ALPHA_GAIN = 2.0  # intensity x gain, clipped to 1: the garment's body is opaque, its faint edges blend
_COARSE, _GRID = 4, 12  # background: coarse noise cells, upsampled to the grid of cells upsampled to the canvas


@dataclass(frozen=True)
class SceneSettings:
    """The settings of the scenes source (the shard job's --scene-* flags); all are recorded with the shards."""

    canvas: int = 96  # scene side in px
    scale: tuple[float, float] = (0.25, 0.90)  # garment frame side / canvas side, sampled log-uniformly
    aspect: tuple[float, float] = (3 / 4, 4 / 3)  # width / height stretch, sampled log-uniformly
    cutoff: float = 0.25  # at most this fraction of the garment frame's area falls outside the canvas
    seed: int = 0  # scene seed (independent of the shard job's --seed, which shuffles samples into shards)
    quality: int = 90  # JPEG quality

    def validate(self) -> SceneSettings:
        """ValueError naming the flag of the first bad setting."""
        if not isinstance(self.canvas, int) or isinstance(self.canvas, bool) or not 32 <= self.canvas <= 1024:
            raise ValueError(f"--scene-canvas {self.canvas}: must be a whole number of px from 32 to 1024")
        lo, hi = _pair(self.scale)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 1):
            raise ValueError(f"--scene-scale {_show(self.scale)}: expected MIN,MAX with 0 < MIN <= MAX <= 1 "
                             "(fractions of the canvas side)")
        if round(lo * self.canvas) < 4:
            raise ValueError(f"--scene-scale {_show(self.scale)}: MIN x canvas is under 4 px at --scene-canvas "
                             f"{self.canvas}")
        lo, hi = _pair(self.aspect)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.2 <= lo <= hi <= 5):
            raise ValueError(f"--scene-aspect {_show(self.aspect)}: expected MIN,MAX with 0.2 <= MIN <= MAX <= 5 "
                             "(width/height stretch)")
        if not (isinstance(self.cutoff, float | int) and 0 <= self.cutoff < 1):
            raise ValueError(f"scene cutoff {self.cutoff!r}: must be from 0 to under 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"--scene-seed {self.seed!r}: must be a whole number >= 0")
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ValueError(f"scene JPEG quality {self.quality!r}: must be from 1 to 100")
        return self

    def describe(self) -> dict:
        """The settings as JSON values (lists, not tuples: they are compared with the recorded manifest)."""
        return {"generator": GENERATOR, "canvas": self.canvas, "scale": [float(v) for v in self.scale],
                "scale_sampling": "log-uniform", "aspect": [float(v) for v in self.aspect],
                "aspect_sampling": "log-uniform", "cutoff": float(self.cutoff), "scene_seed": self.seed,
                "jpeg_quality": self.quality}


def _pair(v) -> tuple[float, float]:
    try:
        lo, hi = v
        return float(lo), float(hi)
    except (TypeError, ValueError):
        return math.nan, math.nan


def _show(v) -> str:
    try:
        return ",".join(f"{float(x):g}" for x in v)
    except (TypeError, ValueError):
        return repr(v)


@dataclass(frozen=True)
class SceneParams:
    """The random draw of one scene (what `render_scene` paints)."""

    scale: float  # garment frame side / canvas side, before the aspect stretch
    aspect: float  # width / height
    width: int  # garment frame size in px
    height: int
    x0: int  # its top-left corner on the canvas (may be negative: cut off at the border)
    y0: int
    tint: tuple[float, float, float]  # per-channel multiplier of the garment's luminance (tint x brightness)
    background: np.ndarray  # (_GRID, _GRID, 3) uint8: the background's cells, upsampled bilinearly to the canvas


def _axis_range(size: int, canvas: int, out: float) -> tuple[float, float]:
    """The range of the frame's top-left coordinate along one axis that keeps at most `out` of its
    length outside the canvas; centred when the frame is too large for that."""
    lo, hi = -out * size, canvas - size + out * size
    return (lo, hi) if lo <= hi else ((canvas - size) / 2, (canvas - size) / 2)


_CELL = (np.arange(_GRID) + 0.5) / _GRID - 0.5  # cell centres in [-0.5, 0.5]


def scene_params(seed: int, split: str, index: int, settings: SceneSettings) -> SceneParams:
    """The random parameters of image `index` of `split`: a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    u = rng.random(17)
    coarse = rng.random((_COARSE, _COARSE, 3))
    fine = rng.random((_GRID, _GRID, 3))
    c = settings.canvas
    (s_lo, s_hi), (a_lo, a_hi) = settings.scale, settings.aspect
    scale = math.exp(math.log(s_lo) + u[0] * (math.log(s_hi) - math.log(s_lo)))
    aspect = math.exp(math.log(a_lo) + u[1] * (math.log(a_hi) - math.log(a_lo)))
    width = max(1, round(scale * c * math.sqrt(aspect)))
    height = max(1, round(scale * c / math.sqrt(aspect)))
    # at most `cutoff` of the frame's area outside, also when it is cut on two sides (a corner):
    # (1 - f)^2 = 1 - cutoff along each axis
    out = 1 - math.sqrt(1 - settings.cutoff)
    x_lo, x_hi = _axis_range(width, c, out)
    y_lo, y_hi = _axis_range(height, c, out)
    x0, y0 = round(x_lo + u[2] * (x_hi - x_lo)), round(y_lo + u[3] * (y_hi - y_lo))
    brightness = 0.75 + 0.35 * u[4]
    tint = tuple(float(brightness * (0.8 + 0.2 * t)) for t in u[5:8])
    # mid-contrast background: a gradient between two colours within 70-185 along a random direction,
    # plus coarse noise (4x4 cells, +-8 to 25 levels) and finer noise (+-3 to 12 levels)
    start, end = 70 + 115 * u[8:11], 70 + 115 * u[11:14]
    direction = 2 * math.pi * u[14]
    t = np.clip(_CELL[None, :] * math.cos(direction) + _CELL[:, None] * math.sin(direction) + 0.5, 0, 1)
    grid = start + t[..., None] * (end - start)
    coarse_up = np.asarray(Image.fromarray(np.round(coarse * 255).astype(np.uint8), "RGB")
                           .resize((_GRID, _GRID), Image.Resampling.BILINEAR), np.float64) / 127.5 - 1
    grid += (8 + 17 * u[15]) * coarse_up + (3 + 9 * u[16]) * (2 * fine - 1)
    background = np.clip(np.round(grid), 0, 255).astype(np.uint8)
    return SceneParams(scale, aspect, width, height, x0, y0, tint, background)


def render_scene(garment: np.ndarray, params: SceneParams, settings: SceneSettings) -> Image.Image:
    """The scene (RGB, canvas x canvas) of one 28x28 uint8 Fashion-MNIST image drawn with `params`.
    (8-bit PIL resizing and elementwise float32 arithmetic: the same bytes on any CPU.)"""
    c = settings.canvas
    scene = np.array(Image.fromarray(params.background, "RGB").resize((c, c), Image.Resampling.BILINEAR))
    # the garment frame, resized (bicubic), cut to the part inside the canvas
    g = Image.fromarray(np.ascontiguousarray(garment, dtype=np.uint8), "L")
    g = np.asarray(g.resize((params.width, params.height), Image.Resampling.BICUBIC))
    gx0, gy0 = max(0, -params.x0), max(0, -params.y0)
    gx1, gy1 = min(params.width, c - params.x0), min(params.height, c - params.y0)
    if gx1 > gx0 and gy1 > gy0:
        lum = g[gy0:gy1, gx0:gx1, None].astype(np.float32)  # 0-255
        alpha = np.minimum(lum * np.float32(ALPHA_GAIN / 255), np.float32(1))
        colour = lum * np.asarray(params.tint, np.float32)
        sy = slice(params.y0 + gy0, params.y0 + gy1)
        sx = slice(params.x0 + gx0, params.x0 + gx1)
        region = scene[sy, sx].astype(np.float32)
        region += alpha * (colour - region) + np.float32(0.5)
        scene[sy, sx] = np.clip(region, 0, 255).astype(np.uint8)
    return Image.fromarray(scene, "RGB")
