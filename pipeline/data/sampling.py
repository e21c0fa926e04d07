"""The seven sampling strategies, one per ensemble replica, as named declarative presets.

The paper's seven models "only differ in sampling methodologies and the random order in which they
see input images" (sec. 7), and sec. 6 lists the methods used: "sampling of various sized patches of
the image whose size is distributed evenly between 8% and 100% of the image area with aspect ratio
constrained to the interval [3/4, 4/3]", "the photometric distortions of Andrew Howard", and "random
interpolation methods (bilinear, area, nearest neighbor and cubic, with equal probability)". Replicas
3 and 4 use the scale jitter of Simonyan & Zisserman (VGG, 2014), the other common recipe of the time.

A strategy only describes what to sample; the DALI pipeline and the torchvision fallback implement it.
Sizes are given for the paper's 224 input and scale with the configured input size (`scaled`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

INTERPOLATIONS = ("linear", "cubic", "nn", "area")
PAPER_INPUT = 224


@dataclass(frozen=True)
class SamplingStrategy:
    name: str
    kind: str  # "area": random-area/aspect crop resized to the input; "scale-jitter": resize then square crop
    area: tuple[float, float] = (0.08, 1.0)  # fraction of the image area (kind "area")
    aspect: tuple[float, float] = (3 / 4, 4 / 3)  # width/height, sampled log-uniformly (kind "area")
    shorter_side: tuple[int, int] = (256, 512)  # pixels at input 224 (kind "scale-jitter")
    flip: bool = True  # random horizontal mirror, p = 0.5
    photometric: bool = False  # brightness/contrast (and, on colour sources, saturation/hue) jitter
    color: bool = True  # the source has colour (False: photometric jitter leaves saturation and hue alone)
    interpolations: tuple[str, ...] = ("linear",)  # one drawn per sample with equal probability
    input_size: int = PAPER_INPUT
    cite: str = ""

    def scaled(self, input_size: int) -> SamplingStrategy:
        """The same strategy for another input size (scale-jitter sides scale with it)."""
        if input_size < 16:
            raise ValueError(f"input_size must be >= 16, got {input_size}")
        lo, hi = self.shorter_side
        f = input_size / self.input_size
        return replace(self, input_size=input_size, shorter_side=(round(lo * f), round(hi * f)))

    def for_source(self, shorter_side: int, channels: int) -> SamplingStrategy:
        """The same strategy fitted to the images it will see (their typical shorter side and channels).

        - Grayscale sources (1 channel): photometric distortion keeps brightness and contrast and drops
          saturation and hue, which have no meaning on gray pixels and would invent colour that the
          evaluation never shows.
        - Sources smaller than the network input (every pixel already upsampled; e.g. Fashion-MNIST's
          28 px at input 32): VGG's scale jitter was set for ImageNet photos, where S = 512 still shows
          224/512 of a scene whose object rarely fills the frame. On a source whose object fills the
          frame it would cut most of it away, so the zoom range keeps its lower end (the evaluation's
          base scale) and halves its log-range: S in [lo, lo * sqrt(hi / lo)] (scale-jitter: 256-362
          instead of 256-512 at input 224; narrow: 256-314 instead of 256-384).
        """
        out = self
        if channels == 1 and self.photometric:
            out = replace(out, color=False)
        if self.kind == "scale-jitter" and shorter_side < self.input_size:
            lo, hi = self.shorter_side
            out = replace(out, shorter_side=(lo, max(lo, round(lo * (hi / lo) ** 0.5))))
        return out


# Photometric distortion ranges (factors around 1; hue in degrees), after Howard (2013), sec. 2.1
# "Additional Transformations": random contrast, brightness and colour, each by a factor in [0.6, 1.4].
PHOTOMETRIC = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.6, 1.4), "hue": (-18.0, 18.0)}

_PRESETS = [
    SamplingStrategy("inception", "area", cite="paper sec. 6: 8%-100% area, aspect in [3/4, 4/3]"),
    SamplingStrategy("inception-photometric", "area", photometric=True,
                     cite="paper sec. 6 + Howard (2013) photometric distortions"),
    SamplingStrategy("inception-large", "area", area=(0.35, 1.0),
                     cite="paper sec. 6: 'some of the models were mainly trained on smaller relative crops, others on larger ones'"),
    SamplingStrategy("scale-jitter", "scale-jitter", shorter_side=(256, 512),
                     cite="Simonyan & Zisserman (2014), multi-scale training, S in [256, 512]"),
    SamplingStrategy("scale-jitter-narrow", "scale-jitter", shorter_side=(256, 384),
                     cite="Simonyan & Zisserman (2014), S in [256, 384]"),
    SamplingStrategy("inception-wide-aspect", "area", aspect=(1 / 2, 2.0),
                     cite="paper sec. 6 area sampling with a wider aspect interval [1/2, 2] (our variation: a further source of diversity between replicas)"),
    SamplingStrategy("inception-random-interp", "area", interpolations=INTERPOLATIONS,
                     cite="paper sec. 6: 'random interpolation methods ... with equal probability'"),
]
STRATEGIES = {s.name: s for s in _PRESETS}


def list_strategies() -> list[str]:
    """Names in replica order (replica i uses list_strategies()[i % 7])."""
    return [s.name for s in _PRESETS]


def get_strategy(name: str, input_size: int = PAPER_INPUT) -> SamplingStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy '{name}'; valid: {', '.join(list_strategies())}")
    return STRATEGIES[name].scaled(input_size)


def strategy_for_replica(replica: int, input_size: int = PAPER_INPUT) -> SamplingStrategy:
    if replica < 0:
        raise ValueError(f"replica must be >= 0, got {replica}")
    return get_strategy(list_strategies()[replica % len(_PRESETS)], input_size)
