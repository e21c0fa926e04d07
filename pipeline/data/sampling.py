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


def get_strategy(name: str, input_size: int = PAPER_INPUT, custom: dict | None = None) -> SamplingStrategy:
    """A preset, or a strategy defined in the recipe (`ensemble.custom_strategies`: name -> fields)."""
    if custom and name in custom:
        return custom_strategy(name, custom[name]).scaled(input_size)
    if name not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy '{name}'; valid: "
                         f"{', '.join(list_strategies() + sorted(custom or {}))}")
    return STRATEGIES[name].scaled(input_size)


def strategy_for_replica(replica: int, input_size: int = PAPER_INPUT) -> SamplingStrategy:
    """The paper's order: replica i samples with preset i mod 7."""
    if replica < 0:
        raise ValueError(f"replica must be >= 0, got {replica}")
    return get_strategy(list_strategies()[replica % len(_PRESETS)], input_size)


# The fields a strategy defined in a recipe may set, with what each must be.
CUSTOM_FIELDS = {
    "kind": "area or scale-jitter",
    "area": "[low, high]: fractions of the image area, 0 < low <= high <= 1 (kind area)",
    "aspect": "[low, high]: width/height, 0 < low <= high (kind area)",
    "shorter_side": "[low, high]: pixels at input 224, 0 < low <= high (kind scale-jitter)",
    "flip": "true or false",
    "photometric": "true or false",
    "interpolations": f"a non-empty list of {', '.join(INTERPOLATIONS)}",
}


def custom_strategy(name: str, fields: dict) -> SamplingStrategy:
    """A strategy defined in a recipe: the preset fields, each checked, the field named on error
    (ValueError `ensemble.custom_strategies.<name>.<field>: ...`)."""
    where = f"ensemble.custom_strategies.{name}"
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: must be a mapping of {', '.join(CUSTOM_FIELDS)}")
    if name in STRATEGIES:
        raise ValueError(f"{where}: '{name}' is a preset's name; give the strategy another name")
    unknown = sorted(set(fields) - set(CUSTOM_FIELDS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field; a strategy has {', '.join(CUSTOM_FIELDS)}")
    if "kind" not in fields:
        raise ValueError(f"{where}.kind: missing ({CUSTOM_FIELDS['kind']})")

    def pair(key, number, lo_ok, hi_ok=None):
        v = fields[key]
        if (not isinstance(v, list | tuple) or len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, number)
                                                                   for x in v)
                or not (lo_ok(v[0]) and v[0] <= v[1] and (hi_ok is None or hi_ok(v[1])))):
            raise ValueError(f"{where}.{key}: {v!r} is not {CUSTOM_FIELDS[key]}")
        return tuple(v)

    out = {"kind": fields["kind"]}
    if out["kind"] not in ("area", "scale-jitter"):
        raise ValueError(f"{where}.kind: {fields['kind']!r} is not {CUSTOM_FIELDS['kind']}")
    if "area" in fields:
        out["area"] = pair("area", int | float, lambda x: x > 0, lambda x: x <= 1)
    if "aspect" in fields:
        out["aspect"] = pair("aspect", int | float, lambda x: x > 0)
    if "shorter_side" in fields:
        out["shorter_side"] = pair("shorter_side", int, lambda x: x > 0)
    for key in ("flip", "photometric"):
        if key in fields:
            if not isinstance(fields[key], bool):
                raise ValueError(f"{where}.{key}: {fields[key]!r} is not {CUSTOM_FIELDS[key]}")
            out[key] = fields[key]
    if "interpolations" in fields:
        v = fields["interpolations"]
        if not isinstance(v, list | tuple) or not v or any(i not in INTERPOLATIONS for i in v):
            raise ValueError(f"{where}.interpolations: {v!r} is not {CUSTOM_FIELDS['interpolations']}")
        out["interpolations"] = tuple(dict.fromkeys(v))
    return SamplingStrategy(name, cite="defined in the recipe (ensemble.custom_strategies)", **out)


def replica_strategies(replicas: int, names: list[str] | None = None, custom: dict | None = None,
                       allow_repeats: bool = False) -> list[str]:
    """The strategy of each replica: `names` (one per replica; presets or recipe-defined), by default the
    paper's seven in order. The paper's replicas differ in how they sample: a strategy named twice, or
    more replicas than the seven presets without a list, only with `allow_repeats`. ValueError naming
    the field otherwise."""
    for name, fields in (custom or {}).items():
        custom_strategy(name, fields)
    if names is None:
        if replicas > len(_PRESETS) and not allow_repeats:
            raise ValueError(f"ensemble.replicas: {replicas} replicas but {len(_PRESETS)} preset strategies; list one "
                             "per replica in ensemble.strategies (presets or ensemble.custom_strategies), or set "
                             "ensemble.allow_repeats: true to cycle through the presets")
        return [list_strategies()[i % len(_PRESETS)] for i in range(replicas)]
    if isinstance(names, str) or not isinstance(names, list | tuple):
        raise ValueError(f"ensemble.strategies: {names!r} is not a list of strategy names")
    if len(names) != replicas:
        raise ValueError(f"ensemble.strategies: {len(names)} strategies for ensemble.replicas: {replicas}; "
                         "list one per replica")
    for n in names:
        if n not in STRATEGIES and n not in (custom or {}):
            raise ValueError(f"ensemble.strategies: unknown strategy {n!r}; presets: {', '.join(list_strategies())}"
                             + (f"; defined in the recipe: {', '.join(sorted(custom))}" if custom else ""))
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice and not allow_repeats:
        raise ValueError(f"ensemble.strategies: {', '.join(twice)} named more than once; the paper's replicas differ "
                         "in how they sample (set ensemble.allow_repeats: true to repeat one anyway)")
    return list(names)
