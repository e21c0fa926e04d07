"""DALI training pipelines, one per sampling strategy.

The reader (`fn.readers.webdataset` over the split's tars and index files) is sharded over ranks by
sample (`shard_id` = rank, `num_shards` = world size). Each epoch it visits the tars in a new order
(`shuffle_after_epoch`, seeded per replica so that all ranks of a replica agree) and shuffles samples
in a 4096-sample buffer (seeded per replica and rank). A strategy (`pipeline.data.sampling`) decides
the crop: random area/aspect (`decoders.image_random_crop`, fused into decoding) or scale jitter
(resize the shorter side to S ~ U[lo, hi], random square crop); then mirror, photometric distortion
and normalisation, giving NCHW float32 (or float16 / uint8) images and int64 labels. The last
partial batch is dropped. On CPU, area sampling without photometric distortion leaves resizing and
normalisation to torch after the iterator (`resize_on_host`, `resize_batch`): the same pixels to
rounding, in a quarter of the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.dali import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _types,
    default_num_threads,
    find_corrupt,
    read_index,
    resolve_device,
    write_filtered_index,
)
from pipeline.data.sampling import PHOTOMETRIC, SamplingStrategy
from pipeline.shards.splits import SplitInfo, open_split

SHUFFLE_BUFFER = 4096
_INTERP = {"linear": "INTERP_LINEAR", "cubic": "INTERP_CUBIC", "nn": "INTERP_NN",
           # DALI has no "area" filter by that name; its triangular filter averages the source pixels
           # each output pixel covers when downscaling, which is what area interpolation does.
           "area": "INTERP_TRIANGULAR"}
DTYPES = ("float32", "float16", "uint8")


@dataclass
class TrainPipelineConfig:
    strategy: SamplingStrategy
    batch_size: int = 64
    shard_id: int = 0  # Ray Train rank
    num_shards: int = 1  # Ray Train world size (of this replica)
    seed: int = 0  # replica seed: tar order; combined with shard_id for the sample shuffle and augmentation
    device: str = "auto"
    device_id: int | None = None  # GPU ordinal for device="gpu": this worker's GPU (see worker_gpu); default 0
    num_threads: int | None = None
    dtype: str = "float32"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    prefetch: int = 2
    host_resize: bool | None = None  # None: torch resizes where it is faster (resize_on_host); False: DALI

    def validate(self) -> TrainPipelineConfig:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id {self.shard_id} is not in [0, num_shards={self.num_shards})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        return self


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


# torch's counterpart of each interpolation (resize_on_host): mode, antialiased. DALI's linear and
# triangular ("area") filters, antialiased, are both the triangle filter widened by the downscale factor,
# which is torch's antialiased bilinear; torch's antialiased bicubic is Keys' a = -0.5 (DALI's cubic);
# nearest-exact takes the source pixel under each output pixel's centre, as DALI's nearest neighbour.
TORCH_INTERP = {"linear": ("bilinear", True), "area": ("bilinear", True), "cubic": ("bicubic", True),
                "nn": ("nearest-exact", False)}


def resize_on_host(strategy: SamplingStrategy, device: str, choice: bool | None = None) -> bool:
    """Whether torch resizes the crops (after DALI's iterator) instead of DALI: CPU pipelines of the
    area-sampling strategies without photometric distortion. DALI's CPU resize costs about 1 ms per
    image and thread at 224 px, torch's antialiased uint8 resize a quarter of that
    (benchmarks/dali_stages.py). DALI still decodes the random crop and mirrors it; the crops leave DALI
    at their own sizes. GPU pipelines, scale jitter (it resizes whole images) and photometric
    distortion (DALI distorts the resized image, clipping at 0 and 255: distorting the crop before the
    resize would clip other pixels) resize in DALI. `choice=False` keeps the resize in DALI."""
    return device == "cpu" and strategy.kind == "area" and not strategy.photometric and choice is not False


def output_names(strategy: SamplingStrategy, host_resize: bool) -> list[str]:
    names = ["images", "labels"]
    if host_resize and len(strategy.interpolations) > 1:
        names.append("interp")  # each crop's interpolation, an index into strategy.interpolations
    return names


def train_graph(cfg: TrainPipelineConfig, split: SplitInfo, device: str, index_paths: list[str]):
    """The DALI graph of one training pipeline (call inside a pipeline_def)."""
    from nvidia.dali import fn

    types = _types()
    s = cfg.strategy
    size = s.input_size
    jpegs, labels = _reader(split, cfg, index_paths)
    decoder = "mixed" if device == "gpu" else "cpu"
    host = resize_on_host(s, device, cfg.host_resize)
    if s.kind == "area":
        images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                               random_area=list(s.area), random_aspect_ratio=list(s.aspect),
                                               num_attempts=10)
        if not host:
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
    if host:  # uint8 HWC crops of their own sizes; torch resizes and normalises them (resize_batch)
        assert not s.photometric  # (resize_on_host: distortion follows the resize)
        if s.flip:
            images = fn.flip(images, horizontal=mirror)
        if len(s.interpolations) > 1:  # one interpolation per sample, equally likely (paper sec. 6)
            return images, labels, fn.random.choice(len(s.interpolations))
        return images, labels
    if cfg.dtype == "uint8":
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
    else:
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT,
                                          output_layout="CHW", mean=list(cfg.mean), std=list(cfg.std), mirror=mirror)
    if device == "gpu":
        labels = labels.gpu()
    return images, labels


def build_train_pipeline(split: SplitInfo | str, cfg: TrainPipelineConfig, index_paths: list[str] | None = None,
                         checkpoint: str | None = None):
    """A built DALI pipeline for one rank of one replica (`index_paths`: filtered copies, see quarantine).
    It traces its state (DALI checkpointing: reader position and shuffle, every random operator's RNG);
    `checkpoint` (from `DALITrainLoader.state`) restores one."""
    from nvidia.dali import pipeline_def

    cfg.validate()
    info = split if isinstance(split, SplitInfo) else open_split(split)
    device = resolve_device(cfg.device)
    device_id = (cfg.device_id or 0) if device == "gpu" else None
    # Augmentation randomness differs per rank; all ranks of a replica share the tar order (cfg.seed).
    seed = (cfg.seed * 1_000_003 + cfg.shard_id) % (2**31 - 1)

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.num_threads or default_num_threads(),
                  device_id=device_id, seed=seed, prefetch_queue_depth=cfg.prefetch, enable_checkpointing=True,
                  checkpoint=checkpoint)
    def pipe():
        return train_graph(cfg, info, device, index_paths or [str(p) for p in info.index_files])

    p = pipe()
    p.build()
    return p


class DALITrainLoader:
    """(images, labels) torch batches from a training pipeline; drops each epoch's last partial batch.

    `len(loader)` is exact and known up front from the manifest: DALI's iterator with the last batch
    dropped gives every rank (n // world) // batch batches per epoch (it stops all ranks at the
    smallest shard). DALI reshuffles by itself at every epoch boundary; `set_epoch(e)` records the
    epoch for logging.

    `exclude` ("shard.tar:key" names, e.g. from `pipeline.data.scan.corrupt_images`) leaves images out
    from the start: data-parallel ranks must agree on the samples before training, so the driver finds
    corrupt images once and every rank gets the same list. `state()` is the loader's position (DALI's
    checkpoint: reader position and shuffle, every random operator's RNG, plus the excluded names);
    a loader built with `state=` continues exactly where that one stood.

    A corrupt image met anyway stops a DALI pipeline for good, and its error does not say which sample
    it was. A single-process loader (`num_shards == 1`) then scans the split for undecodable images
    (`find_corrupt`), warns with shard and key, counts them in `skipped`, writes index files without
    them (`quarantine_dir`), rebuilds the pipeline on those, and ends the interrupted epoch early. A
    rank of a data-parallel group cannot do that alone (its epoch would end early while the other ranks
    wait in a gradient collective, and it would hold one sample fewer): it raises CorruptImageError,
    naming the images, so the group restarts and the driver's scan includes them.
    """

    def __init__(self, split: SplitInfo | str, cfg: TrainPipelineConfig, quarantine_dir: str | None = None,
                 exclude: list[str] | tuple[str, ...] = (), state: dict | None = None):
        self.split = split if isinstance(split, SplitInfo) else open_split(split)
        self.cfg = cfg.validate()
        self.quarantine_dir = quarantine_dir
        self.skipped: list[str] = sorted(set(exclude))  # "shard.tar:key" of every corrupt image left out
        self.index_paths = [str(p) for p in self.split.index_files]
        if self.skipped:
            self.index_paths = write_filtered_index(self.split, set(self.skipped), self._quarantine_folder())
        self.epoch = 0
        self._epoch_done = True
        self.device = resolve_device(cfg.device)
        self.host_resize = resize_on_host(cfg.strategy, self.device, cfg.host_resize)
        if self.host_resize:
            reuse_freed_memory()
        checkpoint = None
        if state is not None:
            if sorted(state.get("skipped", [])) != self.skipped:
                raise ValueError("the saved data position was taken with other images left out "
                                 f"({len(state.get('skipped', []))} vs {len(self.skipped)}); it cannot be restored")
            if state.get("resize", "dali") != self.resize_where:  # (a position saved before torch resized)
                raise ValueError(f"the saved data position is of a pipeline that resized in {state.get('resize', 'dali')}, "
                                 f"this one resizes in {self.resize_where}; it cannot be restored")
            checkpoint, self._epoch_done = state["dali"], bool(state["epoch_done"])
        self._build(checkpoint)

    def _quarantine_folder(self) -> Path:
        import tempfile

        return Path(self.quarantine_dir or tempfile.mkdtemp(prefix="dali-quarantine-"))

    def _build(self, checkpoint: str | None = None) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, DALIRaggedIterator, LastBatchPolicy

        while True:
            self.pipe = build_train_pipeline(self.split, self.cfg, self.index_paths, checkpoint)
            names = output_names(self.cfg.strategy, self.host_resize)
            try:  # the iterator runs the first batches right away: a corrupt image can stop it here
                if self.host_resize:  # crops of their own sizes: one tensor each
                    self._it = DALIRaggedIterator([self.pipe], names, reader_name="Reader", output_types=[
                        DALIRaggedIterator.SPARSE_LIST_TAG] + [DALIRaggedIterator.DENSE_TAG] * (len(names) - 1),
                        last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
                else:
                    self._it = DALIGenericIterator([self.pipe], names, reader_name="Reader",
                                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
                return
            except RuntimeError as e:
                self._quarantine(e)
                checkpoint = None

    @property
    def resize_where(self) -> str:
        """Which library resizes ("torch" or "dali"): the graphs differ, so do their saved states."""
        return "torch" if self.host_resize else "dali"

    def __len__(self) -> int:
        n = self.split.num_samples - len(self.skipped)
        return (n // self.cfg.num_shards) // self.cfg.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state(self) -> dict:
        """Where this loader stands (plain data: bytes, bools, lists), for a training checkpoint."""
        return {"dali": self._it.checkpoints()[0], "epoch_done": self._epoch_done, "skipped": list(self.skipped),
                "resize": self.resize_where}

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
            images = b["images"]
            if self.host_resize:
                images = resize_batch(images, self.cfg, b["interp"].view(-1).tolist() if "interp" in b else None)
            yield images, b["labels"].view(-1).long()

    def _quarantine(self, error: RuntimeError) -> None:
        """Find the corrupt images behind a DALI error and leave them out of the index files."""
        import warnings

        bad = [s for s in find_corrupt(read_index(self.split)) if f"{Path(s.tar).name}:{s.key}" not in self.skipped]
        if not bad:
            raise error
        names = [f"{Path(s.tar).name}:{s.key}" for s in bad]
        if self.cfg.num_shards > 1:
            raise CorruptImageError(
                f"rank {self.cfg.shard_id} of {self.cfg.num_shards}: corrupt image(s) {', '.join(names)} not in the "
                "list of images left out before training; a data-parallel rank cannot drop them alone (the "
                "ranks would fall out of step). Rerun: the ensemble driver scans the split again "
                "(pipeline.data.scan) and every rank leaves them out.", names) from error
        for name in names:
            self.skipped.append(name)
            warnings.warn(f"skipping corrupt image {name} (epoch {self.epoch})", stacklevel=3)
        self.index_paths = write_filtered_index(self.split, set(self.skipped), self._quarantine_folder())


_REUSING = False


def reuse_freed_memory() -> bool:
    """Have this process reuse the memory of freed batches rather than hand it back to the system and
    fault fresh pages in for the next batch. glibc serves an allocation over 32 MB (one batch of 64
    images at 224 px, in float32, is 38 MB) with its own mapping, unmapped when freed: every batch then
    costs ~9,000 page faults, about 0.3 ms per image here, more than resizing it. With the threshold
    at 256 MB such blocks come from the heap and stay there for the next one (not trimmed below 512 MB).
    Linux with glibc only; returns whether it is set (once per process)."""
    global _REUSING
    import ctypes
    import sys

    if _REUSING or not sys.platform.startswith("linux"):
        return _REUSING
    try:
        libc = ctypes.CDLL("libc.so.6")
        _REUSING = bool(libc.mallopt(-3, 256 << 20)) and bool(libc.mallopt(-1, 512 << 20))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # (another C library: left as it is)
        pass
    return _REUSING


def resize_batch(crops: list, cfg: TrainPipelineConfig, interp: list[int] | None = None):
    """Crops (uint8 HWC tensors of any size, from a host-resize pipeline) -> one batch as the pipeline
    gives it otherwise: N x 3 x S x S, normalised float32 (or float16, or uint8 as is). `interp`: each
    crop's index into the strategy's interpolations (default: the first)."""
    import torch
    import torch.nn.functional as F

    s = cfg.strategy
    size = s.input_size
    dtype = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    out = torch.empty((len(crops), 3, size, size), dtype=dtype)
    # (x - mean) / std as x * scale + bias, image by image while it is in cache
    scale = (1 / torch.tensor(cfg.std, dtype=torch.float32)).view(3, 1, 1)
    bias = -torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1) * scale
    work = None if dtype != torch.float16 else torch.empty((3, size, size), dtype=torch.float32)
    for i, crop in enumerate(crops):
        mode, antialias = TORCH_INTERP[s.interpolations[interp[i] if interp else 0]]
        r = F.interpolate(crop.permute(2, 0, 1).unsqueeze(0), size=(size, size), mode=mode, antialias=antialias)[0]
        if dtype == torch.uint8:
            out[i] = r
        elif work is None:
            out[i].copy_(r).mul_(scale).add_(bias)
        else:
            out[i] = work.copy_(r).mul_(scale).add_(bias)
    return out


class CorruptImageError(RuntimeError):
    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names
