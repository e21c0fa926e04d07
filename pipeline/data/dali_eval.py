"""DALI multi-crop evaluation (1, 10 or 144 crops per image, paper sec. 7).

Evaluation reads each rank's contiguous range of the split (rank i of k: samples [n*i//k, n*(i+1)//k),
so all ranks together see every sample exactly once) by seeking to the offsets in the DALI index
files, and feeds DALI the JPEG bytes with each image's distinct crop boxes, computed by the pure
functions of `pipeline.data.crops` from the width/height recorded in the sample's json. DALI decodes
once and cuts each box with one ROI resize (box -> size x size); mirrors are exact flips made after.
Output: uint8 [B, crops, 3, S, S] on DALI's device (normalise there): 144 x 3 x 224 x 224 bytes =
21.7 MB per image at 224 (a float32 copy would be 86.7 MB), 1.4 MB per image for Fashion-MNIST at 56.
"""

from __future__ import annotations

import functools
from collections import deque
from pathlib import Path

import numpy as np

from pipeline.data.crops import CropPlan, crop_plan, crop_subset
from pipeline.data.dali import (
    IndexedSample,
    _types,
    batch_to_torch,
    default_num_threads,
    find_corrupt,
    rank_range,
    read_index,
    resolve_device,
)
from pipeline.shards.splits import SplitInfo, open_split


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
                    jpegs.append(np.frombuffer(self._part(s, s.jpg), dtype=np.uint8))
                    labels.append(np.array([struct.unpack("<i", self._part(s, s.lbl))[0]], dtype=np.int64))
                    lo, hi = roi_bounds(plan, self.slots)
                    starts.append(lo)
                    ends.append(hi)
                    plans.append(plan)
                self.pending.append((todo[b:b + self.batch_size], plans))
                yield jpegs, labels, starts, ends
        finally:
            self.close()


def roi_bounds(plan: CropPlan, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """An image's distinct boxes padded to the pipeline's `slots` (repeating the first), as the ROI
    starts (y0, x0) and ends (y1, x1) that `build_eval_pipeline` takes."""
    boxes = np.array(plan.boxes + (plan.boxes[0],) * (slots - len(plan.boxes)), dtype=np.float32)
    return np.ascontiguousarray(boxes[:, :2]), np.ascontiguousarray(boxes[:, 2:])


def displayed_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image as DALI's decoder gives it (EXIF orientation applied)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class BytesEvalSource:
    """`EvalSource`'s contract over encoded images in memory (a prediction request): the same crop
    plans, padding and batches, so `build_eval_pipeline` cuts exactly what it cuts for the evaluation."""

    def __init__(self, images: list[bytes], n_crops: int, input_size: int, batch_size: int):
        crop_subset(n_crops)
        self.images, self.n_crops, self.size, self.batch_size = images, n_crops, input_size, batch_size
        self.pending: deque[tuple[list[int], list[CropPlan]]] = deque()
        plans: dict[tuple[int, int], CropPlan] = {}
        self.plans = []
        for data in images:
            wh = displayed_size(data)
            if wh not in plans:
                plans[wh] = crop_plan(*wh, n_crops, input_size)
            self.plans.append(plans[wh])
        self.slots = max((len(p.boxes) for p in self.plans), default=1)

    def batches(self, start: int):
        for b in range(start, len(self.images), self.batch_size):
            idx = list(range(b, min(b + self.batch_size, len(self.images))))
            bounds = [roi_bounds(self.plans[i], self.slots) for i in idx]
            self.pending.append((idx, [self.plans[i] for i in idx]))
            yield ([np.frombuffer(self.images[i], dtype=np.uint8) for i in idx],
                   [np.zeros(1, dtype=np.int64) for _ in idx], [lo for lo, _ in bounds], [hi for _, hi in bounds])


def crops_of_images(images: list[bytes], n_crops: int, input_size: int, batch_size: int = 8, device: str = "auto",
                    device_id: int | None = None, num_threads: int | None = None):
    """Batches (distinct crops [N, 3, S, S] uint8, inverse [B, crops]) of encoded images, cut by the
    evaluation's pipeline (`build_eval_pipeline`, `assemble_crops`)."""
    src = BytesEvalSource(images, n_crops, input_size, batch_size)
    p = build_eval_pipeline(src, 0, device, device_id, num_threads=num_threads)
    for _ in range(-(-len(images) // batch_size)):
        boxes, _labels = p.run()
        _idx, plans = src.pending.popleft()
        yield crops_from_dali(boxes, plans)


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


def crops_from_dali(images, plans: list[CropPlan]):
    """The pipeline's output [B, slots, S, S, 3] (HWC) as `assemble_crops` of its [B, slots, 3, S, S]
    view (channels_last in memory); a GPU batch stays on the GPU (device-to-device copy out of DALI)."""
    return assemble_crops(batch_to_torch(images).permute(0, 1, 4, 2, 3), plans)


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
                 num_threads: int | None = None, offset: int = 0, dedup: bool = False, device_id: int | None = None):
        self.split = split if isinstance(split, SplitInfo) else open_split(split)
        self.args = dict(n_crops=n_crops, input_size=input_size, batch_size=batch_size, rank=rank,
                         world_size=world_size, limit=limit, offset=offset, dedup=dedup)
        self.device, self.num_threads, self.device_id = resolve_device(device), num_threads, device_id
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


        src = self.source = EvalSource(self.split, **self.args, samples=self._index, sizes=self._sizes)  # read once
        self.keys, self.skipped = [], []
        start = src.range.start
        while start < src.range.stop:
            src.pending.clear()
            p = build_eval_pipeline(src, start, self.device, self.device_id, num_threads=self.num_threads)
            try:
                while True:
                    images, labels = p.run()
                    taken, plans = src.pending.popleft()
                    self.keys += [src.samples[i].key for i in taken]
                    start = taken[-1] + 1
                    y = batch_to_torch(labels).view(-1)
                    distinct, inverse = crops_from_dali(images, plans)
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
