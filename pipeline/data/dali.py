"""DALI plumbing shared by the training and evaluation input pipelines (`dali_train`, `dali_eval`).

Both read a split opened by its manifest (`open_split`). `device="gpu"` decodes with the mixed (nvJPEG)
decoder and runs every op on the GPU; `device="cpu"` builds the same graph with `device_id=None` and
CPU ops only (every dev/CI machine here); "auto" picks the GPU when CUDA is visible. This module holds
what both need: normalisation, device and thread choice, the DALI index files read as byte ranges
(`read_index`), rank ranges, and finding corrupt images (DALI stops a pipeline on one without naming it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.shards.splits import SplitInfo

# ImageNet RGB statistics on the 0-255 scale (the usual torchvision/DALI values).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class Normalizer:
    """uint8 NCHW images (the eval loader's output) -> float, normalised like the train pipeline's."""

    def __init__(self, device="cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        import torch

        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, x):
        return (x.to(self.mean.device).float() - self.mean) / self.std

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


def _types():
    from nvidia.dali import types

    return types

def batch_to_torch(x):
    """A DALI TensorList as one torch tensor where it lies: a GPU batch is copied device to device into a
    tensor on its GPU (on torch's current stream; no round trip through host memory), a CPU batch
    becomes a CPU tensor."""
    import torch
    from nvidia.dali.tensors import TensorListGPU

    if isinstance(x, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = x.as_tensor()
        dev = torch.device("cuda", t.device_id())
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=dev)
        return feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(dev))
    return torch.from_numpy(np.array(x.as_tensor()))


def gpu_ordinal(assigned: list[str], cuda_visible: str | None) -> int:
    """The CUDA ordinal, inside this process, of the GPU Ray assigned to it (`ray.get_gpu_ids()`).

    Ray Train gives all workers of one trainer on a node the same CUDA_VISIBLE_DEVICES (the union of
    their GPUs), so ordinal 0 is the *first* worker's GPU for every one of them: a worker's own GPU is
    the position of its assigned id in that list. Without CUDA_VISIBLE_DEVICES, ids are ordinals."""
    if not assigned:
        return 0
    gpu = str(assigned[0]).strip()
    visible = [v.strip() for v in (cuda_visible or "").split(",") if v.strip()]
    if not visible:
        return int(gpu)
    if gpu not in visible:
        raise RuntimeError(f"GPU {gpu} assigned by Ray is not in CUDA_VISIBLE_DEVICES={cuda_visible!r}")
    return visible.index(gpu)


def worker_gpu() -> int:
    """This worker's GPU ordinal (for torch and for DALI's `device_id`): the GPU Ray assigned to this
    process when it runs in a Ray worker with GPUs, else torch's current device (0)."""
    ids: list[str] = []
    try:
        import ray

        if ray.is_initialized():
            ids = [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # Ray absent (the GPU runner) or not a Ray process
        ids = []
    if ids:
        return gpu_ordinal(ids, os.environ.get("CUDA_VISIBLE_DEVICES"))
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


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
