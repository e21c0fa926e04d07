"""DALI input pipelines: training (one per sampling strategy) and multi-crop evaluation.

Both read a split opened by its manifest (`open_split`): the tars with their index files, through
`fn.readers.webdataset`, sharded over ranks by sample (`shard_id` = rank, `num_shards` = world size).
`device="gpu"` decodes with the mixed (nvJPEG) decoder and runs every op on the GPU; `device="cpu"`
builds the same graph with `device_id=None` and CPU ops only (every dev/CI machine here). "auto"
picks the GPU when CUDA is visible.

Training: each epoch the reader visits the tars in a new order (`shuffle_after_epoch`, seeded per
replica so that all ranks of a replica agree) and shuffles samples in a 4096-sample buffer (seeded per
replica and rank). A strategy (`pipeline.data.sampling`) decides the crop: random area/aspect
(`decoders.image_random_crop`, fused into decoding) or scale jitter (resize the shorter side to
S ~ U[lo, hi], random square crop); then mirror, photometric distortion and normalisation, giving
NCHW float32 (or float16 / uint8) images and int64 labels. The last partial batch is dropped.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.sampling import PHOTOMETRIC, SamplingStrategy
from pipeline.data.shards import SplitInfo, open_split

# ImageNet RGB statistics on the 0-255 scale (the usual torchvision/DALI values).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
SHUFFLE_BUFFER = 4096


class Normalizer:
    """uint8 NCHW images (the eval loader's output) -> float, normalised like the train pipeline's."""

    def __init__(self, device="cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        import torch

        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, x):
        return (x.to(self.mean.device).float() - self.mean) / self.std
_INTERP = {"linear": "INTERP_LINEAR", "cubic": "INTERP_CUBIC", "nn": "INTERP_NN",
           # DALI has no "area" filter by that name; its triangular filter averages the source pixels
           # each output pixel covers when downscaling, which is what area interpolation does.
           "area": "INTERP_TRIANGULAR"}
DTYPES = ("float32", "float16", "uint8")


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, not {device!r}")
    if device == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return device


def default_num_threads() -> int:
    """The CPUs this process was given (Ray sets OMP_NUM_THREADS per worker), at least 1."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class TrainPipelineConfig:
    strategy: SamplingStrategy
    batch_size: int = 64
    shard_id: int = 0  # Ray Train rank
    num_shards: int = 1  # Ray Train world size (of this replica)
    seed: int = 0  # replica seed: tar order; combined with shard_id for the sample shuffle and augmentation
    device: str = "auto"
    device_id: int | None = None  # GPU ordinal for device="gpu"; default: 0
    num_threads: int | None = None
    dtype: str = "float32"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    prefetch: int = 2

    def validate(self) -> TrainPipelineConfig:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id {self.shard_id} is not in [0, num_shards={self.num_shards})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        return self


def _types():
    from nvidia.dali import types

    return types


def _reader(split: SplitInfo, cfg: TrainPipelineConfig, index_paths: list[str]):
    from nvidia.dali import fn

    types = _types()
    return fn.readers.webdataset(
        paths=[str(p) for p in split.tars], index_paths=index_paths, ext=["jpg", "lbl"],
        dtypes=[types.UINT8, types.INT32], shard_id=cfg.shard_id, num_shards=cfg.num_shards, name="Reader",
        missing_component_behavior="error", random_shuffle=True, initial_fill=SHUFFLE_BUFFER,
        shuffle_after_epoch=True, shuffle_after_epoch_seed=cfg.seed, pad_last_batch=False)


def _interp(strategy: SamplingStrategy):
    from nvidia.dali import fn

    types = _types()
    kinds = [getattr(types.DALIInterpType, _INTERP[i]) for i in strategy.interpolations]
    if len(kinds) == 1:
        return kinds[0]
    # one interpolation per sample, equally likely (paper sec. 6)
    return fn.cast(fn.random.choice([int(k) for k in kinds]), dtype=types.INTERP_TYPE)


def train_graph(cfg: TrainPipelineConfig, split: SplitInfo, device: str, index_paths: list[str]):
    """The DALI graph of one training pipeline (call inside a pipeline_def)."""
    from nvidia.dali import fn

    types = _types()
    s = cfg.strategy
    size = s.input_size
    jpegs, labels = _reader(split, cfg, index_paths)
    decoder = "mixed" if device == "gpu" else "cpu"
    if s.kind == "area":
        images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                               random_area=list(s.area), random_aspect_ratio=list(s.aspect),
                                               num_attempts=10)
        images = fn.resize(images, size=[size, size], interp_type=_interp(s), antialias=True)
    elif s.kind == "scale-jitter":
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        shorter = fn.random.uniform(range=[float(s.shorter_side[0]), float(s.shorter_side[1])])
        images = fn.resize(images, resize_shorter=shorter, interp_type=_interp(s), antialias=True)
        images = fn.crop(images, crop=[size, size], crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                         crop_pos_y=fn.random.uniform(range=[0.0, 1.0]), out_of_bounds_policy="pad")
    else:
        raise ValueError(f"unknown strategy kind {s.kind!r}")
    if s.photometric:
        p = PHOTOMETRIC
        colour = {"saturation": fn.random.uniform(range=list(p["saturation"])),
                  "hue": fn.random.uniform(range=list(p["hue"]))} if s.color else {}
        images = fn.color_twist(images, brightness=fn.random.uniform(range=list(p["brightness"])),
                                contrast=fn.random.uniform(range=list(p["contrast"])), **colour)
    mirror = fn.random.coin_flip(probability=0.5) if s.flip else 0
    if cfg.dtype == "uint8":
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
    else:
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT,
                                          output_layout="CHW", mean=list(cfg.mean), std=list(cfg.std), mirror=mirror)
    if device == "gpu":
        labels = labels.gpu()
    return images, labels


def build_train_pipeline(split: SplitInfo | str, cfg: TrainPipelineConfig, index_paths: list[str] | None = None):
    """A built DALI pipeline for one rank of one replica (`index_paths`: filtered copies, see quarantine)."""
    from nvidia.dali import pipeline_def

    cfg.validate()
    info = split if isinstance(split, SplitInfo) else open_split(split)
    device = resolve_device(cfg.device)
    device_id = (cfg.device_id or 0) if device == "gpu" else None
    # Augmentation randomness differs per rank; all ranks of a replica share the tar order (cfg.seed).
    seed = (cfg.seed * 1_000_003 + cfg.shard_id) % (2**31 - 1)

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.num_threads or default_num_threads(),
                  device_id=device_id, seed=seed, prefetch_queue_depth=cfg.prefetch)
    def pipe():
        return train_graph(cfg, info, device, index_paths or [str(p) for p in info.index_files])

    p = pipe()
    p.build()
    return p


class DALITrainLoader:
    """(images, labels) torch batches from a training pipeline; drops each epoch's last partial batch.

    `len(loader)` is known up front from the manifest: (samples of this rank) // batch size. DALI
    reshuffles by itself at every epoch boundary; `set_epoch(e)` records the epoch for logging.

    A corrupt image stops a DALI pipeline for good and its error does not say which sample it was. The
    loader then scans the split for undecodable images (`find_corrupt`), warns with shard and key,
    counts them in `skipped`, writes index files without them (`quarantine_dir`), rebuilds the pipeline
    on those, and ends the interrupted epoch early; training goes on from the next epoch.
    """

    def __init__(self, split: SplitInfo | str, cfg: TrainPipelineConfig, quarantine_dir: str | None = None):
        self.split = split if isinstance(split, SplitInfo) else open_split(split)
        self.cfg = cfg.validate()
        self.quarantine_dir = quarantine_dir
        self.skipped: list[str] = []  # "shard.tar:key" of every corrupt image left out
        self.index_paths = [str(p) for p in self.split.index_files]
        self.epoch = 0
        self._epoch_done = True
        self._build()

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        while True:
            self.pipe = build_train_pipeline(self.split, self.cfg, self.index_paths)
            try:  # the iterator runs the first batches right away: a corrupt image can stop it here
                self._it = DALIGenericIterator([self.pipe], ["images", "labels"], reader_name="Reader",
                                               last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
                return
            except RuntimeError as e:
                self._quarantine(e)

    def __len__(self) -> int:
        n = self.split.num_samples - len(self.skipped)
        k, i = self.cfg.num_shards, self.cfg.shard_id
        per_rank = n * (i + 1) // k - n * i // k  # DALI's split of n samples into k contiguous shards
        return per_rank // self.cfg.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # DALI's iterator resets in iter() once an epoch has ended; a caller that stopped early (a step
        # limit) continues the running epoch, unless it stopped exactly at its end.
        continuing = not self._epoch_done
        it = self._it if continuing else iter(self._it)
        self._epoch_done = False
        yielded = False
        while True:
            try:
                batch = next(it)
            except StopIteration:
                if continuing and not yielded:
                    continuing, it = False, iter(self._it)
                    continue
                self._epoch_done = True
                return
            except RuntimeError as e:
                self._quarantine(e)
                self._build()
                return
            b = batch[0]
            yielded = True
            yield b["images"], b["labels"].view(-1).long()

    def _quarantine(self, error: RuntimeError) -> None:
        """Find the corrupt images behind a DALI error and leave them out of the index files."""
        import tempfile
        import warnings

        bad = [s for s in find_corrupt(read_index(self.split)) if f"{Path(s.tar).name}:{s.key}" not in self.skipped]
        if not bad:
            raise error
        for s in bad:
            name = f"{Path(s.tar).name}:{s.key}"
            self.skipped.append(name)
            warnings.warn(f"skipping corrupt image {name} (epoch {self.epoch})", stacklevel=3)
        out = Path(self.quarantine_dir or tempfile.mkdtemp(prefix="dali-quarantine-"))
        self.index_paths = write_filtered_index(self.split, set(self.skipped), out)


def batch_to_numpy(x) -> np.ndarray:
    """A DALI TensorList (CPU or GPU) as one numpy array."""
    if hasattr(x, "as_cpu"):
        x = x.as_cpu()
    return np.array(x.as_tensor())


# ------------------------------------------------------------------------------------------ evaluation
#
# Evaluation reads each rank's contiguous range of the split (rank i of k: samples [n*i//k, n*(i+1)//k),
# so all ranks together see every sample exactly once) by seeking to the offsets in the DALI index
# files, and feeds DALI the JPEG bytes with each image's crop windows, computed by the pure functions of
# pipeline.evaluate.crops from the width/height recorded in the sample's json. DALI decodes once and
# cuts every crop with one ROI resize (box -> size x size) and a mirror. Output: uint8 [B, crops, 3, S, S]
# (normalise on the model's device): 144 x 3 x 224 x 224 bytes = 21.7 MB per image at 224 (a float32
# copy would be 86.7 MB), 1.4 MB per image for Fashion-MNIST at 56.

@dataclass(frozen=True)
class IndexedSample:
    tar: str
    key: str
    jpg: tuple[int, int]  # offset, size
    lbl: tuple[int, int]
    json: tuple[int, int]


def read_index(split: SplitInfo) -> list[IndexedSample]:
    """Every sample of the split, in order, with the byte ranges of its components (from the .idx files)."""
    out = []
    for tar, idx in zip(split.tars, split.index_files, strict=True):
        lines = idx.read_text().splitlines()
        for line in lines[1:]:
            f = line.split()
            comps = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
            key = f[3].split(".", 1)[0]
            missing = {"jpg", "lbl", "json"} - set(comps)
            if missing:
                raise ValueError(f"{idx}: sample {key} lacks {sorted(missing)}")
            out.append(IndexedSample(str(tar), key, comps["jpg"], comps["lbl"], comps["json"]))
    if len(out) != split.num_samples:
        raise ValueError(f"{split.dir}: index files list {len(out)} samples, manifest says {split.num_samples}")
    return out


def rank_range(n: int, rank: int, world: int) -> range:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world_size={world})")
    return range(n * rank // world, n * (rank + 1) // world)


@dataclass(frozen=True)
class CropPlan:
    """How one image's n crops are made: DALI cuts each distinct box once (`boxes`: (y0, x0, y1, x1)
    relative to the image); `pairs` lists the distinct crops to compute as (box, mirrored); crop j of
    the scheme is pairs[inverse[j]]. Identical boxes give identical pixels, so this is exact."""

    boxes: tuple[tuple[float, float, float, float], ...]
    pairs: tuple[tuple[int, bool], ...]
    inverse: tuple[int, ...]


def crop_plan(width: int, height: int, n: int, input_size: int) -> CropPlan:
    from pipeline.evaluate.crops import crops, relative_roi

    boxes, pairs, inverse = {}, {}, []
    for c in crops(width, height, n, input_size):
        box = boxes.setdefault(relative_roi(c), len(boxes))
        inverse.append(pairs.setdefault((box, c.mirror), len(pairs)))
    return CropPlan(tuple(boxes), tuple(pairs), tuple(inverse))


class EvalSource:
    """Batches of (jpeg bytes, label, ROI starts, ROI ends) for DALI's external_source, over one rank's
    range of the split (from `offset`, at most `limit` samples).

    Each image's distinct boxes (`crop_plan`) are cut once, padded to the pipeline's `slots` (the most
    any image of the range needs) by repeating the first; mirrors are flips of those crops, made by the
    loader. `pending` holds, for every batch handed to DALI and not yet taken by the loader, its sample
    indices and crop plans (DALI runs batches in order); `skip` holds keys of corrupt images.
    """

    def __init__(self, split: SplitInfo, n_crops: int, input_size: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, limit: int | None = None, samples: list[IndexedSample] | None = None,
                 offset: int = 0, dedup: bool = False, sizes: dict[str, tuple[int, int]] | None = None):
        from pipeline.evaluate.crops import crop_subset

        crop_subset(n_crops)  # validates the scheme
        self.samples = samples if samples is not None else read_index(split)
        if offset < 0 or offset >= len(self.samples):
            raise ValueError(f"offset {offset} is outside the split's {len(self.samples)} samples")
        self.samples = self.samples[offset:offset + limit if limit is not None else None]
        self.range = rank_range(len(self.samples), rank, world_size)
        self.n_crops, self.size, self.batch_size, self.dedup = n_crops, input_size, batch_size, dedup
        self.skip: set[str] = set()
        self.pending: deque[tuple[list[int], list[CropPlan]]] = deque()
        self._files: dict[str, object] = {}
        self._plans: dict[tuple[int, int], CropPlan] = {}
        self.sizes = sizes if sizes is not None else {}  # key -> (width, height), read once from the json
        self.slots = max((len(self.plan(i).boxes) for i in self.range), default=1)

    def __len__(self) -> int:
        return -(-len(self.range) // self.batch_size)

    def _part(self, s: IndexedSample, rng: tuple[int, int]) -> bytes:
        f = self._files.get(s.tar) or self._files.setdefault(s.tar, open(s.tar, "rb"))
        f.seek(rng[0])
        return f.read(rng[1])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def plan(self, i: int) -> CropPlan:
        """Sample i's crop plan (from the width and height recorded in its json)."""
        import json

        s = self.samples[i]
        wh = self.sizes.get(s.key)
        if wh is None:
            meta = json.loads(self._part(s, s.json))
            wh = self.sizes[s.key] = (meta["width"], meta["height"])
        if wh not in self._plans:
            self._plans[wh] = crop_plan(*wh, self.n_crops, self.size)
        return self._plans[wh]

    def batches(self, start: int):
        """Generator of batches from sample index `start` to the end of the range."""
        import struct

        todo = [i for i in range(start, self.range.stop) if self.samples[i].key not in self.skip]
        try:
            for b in range(0, len(todo), self.batch_size):
                jpegs, labels, starts, ends, plans = [], [], [], [], []
                for i in todo[b:b + self.batch_size]:
                    s = self.samples[i]
                    plan = self.plan(i)
                    boxes = np.array(plan.boxes + (plan.boxes[0],) * (self.slots - len(plan.boxes)), dtype=np.float32)
                    jpegs.append(np.frombuffer(self._part(s, s.jpg), dtype=np.uint8))
                    labels.append(np.array([struct.unpack("<i", self._part(s, s.lbl))[0]], dtype=np.int64))
                    starts.append(np.ascontiguousarray(boxes[:, :2]))  # (y0, x0)
                    ends.append(np.ascontiguousarray(boxes[:, 2:]))  # (y1, x1)
                    plans.append(plan)
                self.pending.append((todo[b:b + self.batch_size], plans))
                yield jpegs, labels, starts, ends
        finally:
            self.close()


def build_eval_pipeline(source: EvalSource, start: int, device: str = "auto", device_id: int | None = None,
                        num_threads: int | None = None):
    """A DALI pipeline giving uint8 [B, slots, S, S, 3] (HWC, one ROI resize per box) and labels."""
    from nvidia.dali import fn, pipeline_def

    types = _types()
    device = resolve_device(device)
    size = source.size

    @pipeline_def(batch_size=source.batch_size, num_threads=num_threads or default_num_threads(),
                  device_id=(device_id or 0) if device == "gpu" else None, seed=0, exec_dynamic=True)
    def pipe():
        jpegs, labels, starts, ends = fn.external_source(
            source=functools.partial(source.batches, start), num_outputs=4, batch=True,
            dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT])
        images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        out = [fn.resize(images, size=[size, size], roi_start=starts[k], roi_end=ends[k], roi_relative=True,
                         interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.UINT8)
               for k in range(source.slots)]
        stacked = fn.stack(*out) if len(out) > 1 else fn.expand_dims(out[0], axes=[0])
        return stacked, labels

    p = pipe()
    p.build()
    return p


def assemble_crops(boxes, plans: list[CropPlan]):
    """DALI's boxes [B, slots, 3, S, S] + the images' plans -> (distinct crops [N, 3, S, S], inverse [B, n]):
    each image's (box, mirror) pairs, mirrors flipped here (exact), and for every crop of the scheme the
    position of its distinct crop."""
    import torch

    plain, mirrored, order, inverse = [], [], [], []
    base = 0
    for b, plan in enumerate(plans):
        for box, mirror in plan.pairs:
            (mirrored if mirror else plain).append(b * boxes.shape[1] + box)
            order.append((mirror, len(mirrored if mirror else plain) - 1))
        inverse.append([base + j for j in plan.inverse])
        base += len(plan.pairs)
    flat = boxes.reshape(-1, *boxes.shape[2:])
    parts = [flat[plain]] + ([flat[mirrored].flip(-1)] if mirrored else [])
    distinct = torch.cat(parts)
    # position of pair p (in plan order) inside `distinct`: plain ones first, then the mirrored ones
    where = torch.tensor([j if not m else len(plain) + j for m, j in order], dtype=torch.long)
    return distinct, where[torch.tensor(inverse, dtype=torch.long)]


class DALIEvalLoader:
    """Every sample of this rank's range exactly once.

    Yields (uint8 images [B, crops, 3, S, S], int64 labels [B]); with `dedup=True` it yields
    (uint8 distinct crops [N, 3, S, S], labels [B], inverse [B, crops]) instead, where
    `distinct[inverse[b]]` are image b's crops in the scheme's order: a model runs on the N distinct
    crops only (N = 42 B instead of 144 B for square images) and `probs[inverse]` gives [B, crops, C].
    Either way DALI cuts each distinct box once and mirrors are exact flips. Image tensors are
    channels_last in memory (DALI's HWC), which is the models' format.

    The range is samples [offset, offset + limit) of the split, divided among `world_size` ranks. `keys`
    lists the keys of the samples yielded, in order. A corrupt image stops the DALI pipeline
    without naming the sample: the loader then decodes the not-yet-yielded samples with PIL to find the
    corrupt ones, warns with shard and key, records them in `skipped`, and resumes from the first
    sample not yet yielded with a new pipeline.
    """

    def __init__(self, split: SplitInfo | str, n_crops: int = 1, input_size: int = 224, batch_size: int = 8,
                 rank: int = 0, world_size: int = 1, device: str = "auto", limit: int | None = None,
                 num_threads: int | None = None, offset: int = 0, dedup: bool = False):
        self.split = split if isinstance(split, SplitInfo) else open_split(split)
        self.args = dict(n_crops=n_crops, input_size=input_size, batch_size=batch_size, rank=rank,
                         world_size=world_size, limit=limit, offset=offset, dedup=dedup)
        self.device, self.num_threads = resolve_device(device), num_threads
        self._index = read_index(self.split)
        self._sizes: dict[str, tuple[int, int]] = {}
        self.source = EvalSource(self.split, **self.args, samples=self._index, sizes=self._sizes)
        self.source.close()
        self.keys: list[str] = []
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        import warnings

        import torch

        src = self.source = EvalSource(self.split, **self.args, samples=self._index, sizes=self._sizes)  # read once
        self.keys, self.skipped = [], []
        start = src.range.start
        while start < src.range.stop:
            src.pending.clear()
            p = build_eval_pipeline(src, start, self.device, num_threads=self.num_threads)
            try:
                while True:
                    images, labels = p.run()
                    taken, plans = src.pending.popleft()
                    self.keys += [src.samples[i].key for i in taken]
                    start = taken[-1] + 1
                    # [B, slots, S, S, 3] HWC -> a [B, slots, 3, S, S] view, channels_last in memory
                    boxes = torch.from_numpy(batch_to_numpy(images)).permute(0, 1, 4, 2, 3)
                    y = torch.from_numpy(batch_to_numpy(labels)).view(-1)
                    distinct, inverse = assemble_crops(boxes, plans)
                    if src.dedup:
                        yield distinct, y, inverse
                    else:
                        yield distinct[inverse], y
            except StopIteration:
                return
            except RuntimeError as e:
                rest = [src.samples[i] for i in range(start, src.range.stop) if src.samples[i].key not in src.skip]
                bad = find_corrupt(rest)
                if not bad:
                    raise
                for s in bad:
                    src.skip.add(s.key)
                    self.skipped.append(f"{Path(s.tar).name}:{s.key}")
                    warnings.warn(f"skipping corrupt image {Path(s.tar).name}:{s.key}", stacklevel=2)
                del e
            finally:
                src.close()


def find_corrupt(samples: list[IndexedSample], workers: int | None = None) -> list[IndexedSample]:
    """The samples whose image PIL cannot fully decode (read by offset from the index files)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def bad(s: IndexedSample) -> bool:
        with open(s.tar, "rb") as f:
            f.seek(s.jpg[0])
            data = f.read(s.jpg[1])
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
            return False
        except Exception:
            return True

    with ThreadPoolExecutor(workers or default_num_threads()) as pool:
        flags = list(pool.map(bad, samples, chunksize=64))
    return [s for s, f in zip(samples, flags, strict=True) if f]


def write_filtered_index(split: SplitInfo, exclude: set[str], out_dir: Path) -> list[str]:
    """Copies of the split's index files without the samples named "shard.tar:key" in `exclude`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for tar, idx in zip(split.tars, split.index_files, strict=True):
        lines = idx.read_text().splitlines()
        keep = [ln for ln in lines[1:] if f"{tar.name}:{ln.split()[3].split('.', 1)[0]}" not in exclude]
        version = lines[0].split()[0]
        path = out_dir / idx.name
        path.write_text(f"{version} {len(keep)}\n" + "".join(ln + "\n" for ln in keep))
        paths.append(str(path))
    return paths
