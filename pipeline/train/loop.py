"""The per-worker training loop of one replica. The same function runs in-process (tests, debugging)
and inside a Ray Train worker (the ensemble driver), where it is data-parallel over the replica's
workers (DDP) and reports metrics and checkpoints through `ray.train.report`.

Recipe (paper sec. 5-6): SGD with momentum, the step schedule of `lr_at` (x0.96 every 8 epochs),
auxiliary losses weighted 0.3, Polyak-averaged weights kept beside the model and used for validation
and as the final model; bf16 autocast and channels_last on GPU. Only rank 0 logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.model.googlenet import GoogLeNet, googlenet_loss
from pipeline.train.schedule import PolyakAverage, lr_at
from pipeline.train.timing import StepProfiler, StepTimes

CHECKPOINT_FILE = "state.pt"


MARKER_FILE = "checkpoint.json"  # beside CHECKPOINT_FILE: {"epoch", "settings_sha256"}, cheap to list and read


class CheckpointError(Exception):
    pass


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, permissions): the previous one is kept."""


def save_state(state: dict, path: Path) -> None:
    """torch.save, written so that a failed write raises the OSError it is (ENOSPC, EDQUOT, EFBIG, EACCES,
    EROFS): torch's own file writer reports one as a RuntimeError ("unexpected pos ...", "iostream
    error") naming neither the cause nor the disk. The state is serialised in memory (one checkpoint's
    size) and written with one write; a part-written file is removed."""
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        with open(path, "wb") as f:
            f.write(buf.getbuffer())
    except OSError:
        with contextlib.suppress(OSError):
            Path(path).unlink()
        raise


def write_marker(folder: Path, state: dict) -> None:
    import json

    (folder / MARKER_FILE).write_text(json.dumps({"epoch": state["epoch"],
                                                  "settings_sha256": state.get("settings_sha256")}))


def checkpoint_markers(run_dir: str) -> list[tuple[str, dict]]:
    """(checkpoint folder, marker) of each complete checkpoint in a Ray Train run folder (a path or an
    s3:// prefix), newest name first; folders without a marker (cut short, or written before markers
    existed) are left out."""
    import json

    from pipeline.shards.storage import objstore

    out = []
    if not objstore.is_uri(run_dir):
        for m in sorted(Path(run_dir).glob(f"checkpoint_*/{MARKER_FILE}"), reverse=True):
            if (m.parent / CHECKPOINT_FILE).exists():
                try:
                    out.append((str(m.parent), json.loads(m.read_text())))
                except (OSError, ValueError):
                    continue
        return out
    for name in sorted((d for d in objstore.list_dirs(run_dir) if d.startswith("checkpoint_")), reverse=True):
        uri = objstore.join(run_dir, name)
        if objstore.size(objstore.join(uri, MARKER_FILE)) is not None and \
                objstore.size(objstore.join(uri, CHECKPOINT_FILE)) is not None:
            try:  # (Ray may delete an old checkpoint meanwhile: num_to_keep)
                out.append((uri, json.loads(objstore.read_bytes(objstore.join(uri, MARKER_FILE)))))
            except (OSError, ValueError):
                continue
    return out


def _open_checkpoint(folder: str):
    """A checkpoint folder's state file: its path, or for object storage (s3://) a file-like copy."""
    from pipeline.shards.storage import objstore

    if not objstore.is_uri(folder):
        return Path(folder) / CHECKPOINT_FILE
    import io

    uri = objstore.join(folder, CHECKPOINT_FILE)
    buf = io.BytesIO(objstore.read_bytes(uri))
    buf.name = uri  # (named in errors)
    return buf


def run_dir_checkpoints(run_dir: str | None) -> list[tuple[int | None, str]]:
    """(epoch, folder) of each checkpoint in a run's folder (a path or an s3:// prefix): the epoch from its
    marker, most advanced first, then those without one (written before markers existed, or cut short)
    with None, newest name first. Nothing but the markers is read."""
    if not run_dir:
        return []
    from pipeline.shards.storage import objstore

    marked = [(folder, m) for folder, m in checkpoint_markers(run_dir) if isinstance(m.get("epoch"), int)]
    known = {folder for folder, _ in marked}  # (a marker without a whole epoch: read as unmarked)
    if objstore.is_uri(run_dir):
        folders = [objstore.join(run_dir, d) for d in sorted(objstore.list_dirs(run_dir), reverse=True)
                   if d.startswith("checkpoint_")]
        unmarked = [f for f in folders if f not in known and objstore.size(objstore.join(f, CHECKPOINT_FILE)) is not None]
    else:
        unmarked = [str(p.parent) for p in sorted(Path(run_dir).glob(f"checkpoint_*/{CHECKPOINT_FILE}"), reverse=True)
                    if str(p.parent) not in known]
    ordered = sorted(((m["epoch"], folder) for folder, m in marked), key=lambda c: c[0], reverse=True)
    return ordered + [(None, f) for f in unmarked]


def latest_state(registered, run_dir: str | None) -> dict | None:
    """The most advanced checkpoint of a run: Ray Train's registered one (`registered`, a Checkpoint or
    None), or a newer one in the run's folder that Ray's controller has not registered (yet): a worker
    SIGKILLed right after `ray.train.report` wrote the files, or a final epoch the controller registers
    after `fit()` returned. A checkpoint cut short by a kill mid-write is skipped; one holding a pickled
    object is refused (CheckpointError). The training loop resumes from it; the driver takes the final
    weights from it.

    Only checkpoints that can be the answer are read whole: the folder's markers say each one's epoch,
    and reading stops at the most advanced one that loads (on object storage each is a download of the
    whole model, optimizer and average)."""
    candidates = run_dir_checkpoints(run_dir)
    best = None
    name = lambda folder: str(folder).rstrip("/").rsplit("/", 1)[-1]  # noqa: E731
    if registered is not None and name(registered.path) not in {name(f) for e, f in candidates if e is not None}:
        with registered.as_directory() as d:  # (not in the run's folder, or without a marker: read it)
            best = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    found_marked = False
    for epoch, folder in candidates:
        if epoch is not None and (found_marked or (best is not None and epoch <= best["epoch"])):
            continue  # (one at least as advanced is loaded)
        try:
            f = _open_checkpoint(folder)  # (object storage: an error reaching it is raised, not skipped)
        except FileNotFoundError:
            continue  # (removed meanwhile: Ray keeps num_to_keep)
        try:
            state = load_checkpoint(f)
        except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated by a kill mid-write
            print(f"skipping unreadable checkpoint {name(folder)}: {type(e).__name__}", flush=True)
            continue
        found_marked = found_marked or epoch is not None
        if best is None or state["epoch"] > best["epoch"]:
            best = state
    return best


def load_checkpoint(path) -> dict:
    """A training checkpoint (model, optimizer, EMA, history: tensors, numbers, strings, lists, dicts),
    loaded with `weights_only=True`: a file on shared storage that holds any other pickled object is
    refused rather than executed."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        path = getattr(path, "name", path)
        raise CheckpointError(f"{path}: refused: the checkpoint holds a pickled object that is not plain data "
                              f"(only tensors, numbers, strings, lists and dicts are loaded): {first}") from None


def config_from_dict(d: dict) -> TrainConfig:
    cfg = TrainConfig(recipe=d.get("recipe", "custom"))
    for f in fields(cfg):
        if f.name != "recipe":
            section = getattr(cfg, f.name)
            for k, v in d.get(f.name, {}).items():
                setattr(section, k, v)
    return cfg


class _Context:
    """Rank, world size and checkpoint I/O: Ray Train's inside a worker, a local folder otherwise."""

    def __init__(self, local_dir: str | None, run_dir: str | None = None):
        self.local_dir, self.run_dir = local_dir, run_dir
        try:
            import ray.train

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.ray = True
        except Exception:  # not in a Ray Train worker
            self.rank, self.world, self.ray = 0, 1, False

    def load(self, settings: str | None = None, accepted: tuple = ()) -> dict | None:
        """The most advanced checkpoint (`latest_state`); one written under other settings is refused
        (`accepted`: digests of equivalent settings recorded by an earlier version)."""
        if not self.ray:
            path = Path(self.local_dir or "") / CHECKPOINT_FILE
            state = load_checkpoint(path) if self.local_dir and path.exists() else None
        else:
            import ray.train

            state = latest_state(ray.train.get_checkpoint(), self.run_dir)
        if state is not None and settings and state.get("settings_sha256") not in (None, settings, *accepted):
            raise CheckpointError(f"the checkpoint of epoch {state['epoch']} in {self.run_dir or self.local_dir} was "
                                  f"written under other settings (settings {state['settings_sha256']}, this run "
                                  f"{settings}); use another ensemble.name")
        return state

    def confirmed(self, epoch: int) -> bool:
        """Whether the checkpoint of `epoch` is in this run's folder, where a restart or a resubmission will
        find it (`ray.train.report` may return without having persisted it)."""
        if not self.ray:
            return True
        if not self.run_dir:
            return False
        return any(m.get("epoch") == epoch for _, m in checkpoint_markers(self.run_dir))

    def report(self, metrics: dict, state: dict | None) -> None:
        if not self.ray:
            if state is not None and self.local_dir:
                os.makedirs(self.local_dir, exist_ok=True)
                tmp = Path(self.local_dir) / (CHECKPOINT_FILE + ".tmp")
                save_state(state, tmp)
                os.replace(tmp, Path(self.local_dir) / CHECKPOINT_FILE)
            return
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        where = f"the node-local temporary folder {tempfile.gettempdir()} (TMPDIR)"
        try:
            with tempfile.TemporaryDirectory() as d:
                save_state(state, Path(d) / CHECKPOINT_FILE)
                write_marker(Path(d), state)
                where = self.run_dir or "the run's storage"
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        except OSError as e:  # (a full disk, a quota, permissions)
            cause = os.strerror(e.errno) if e.errno else (e.strerror or str(e))  # (pyarrow's text is longer)
            raise CheckpointWriteError(
                f"cannot write the checkpoint of epoch {state['epoch']} under {where}: {cause}; the previous "
                "checkpoint is kept: make room there and run the same command again, it resumes from "
                "there") from None


def _all_reduce(values: list[float], device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _all_gather(obj, world: int) -> list:
    """Every rank's `obj` (plain data), in rank order; [obj] outside a process group."""
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _take(loader, steps: int):
    """Exactly `steps` batches from a loader that ends at each of its own (DALI) epochs: a training
    epoch shorter than the split (`data.limit_train`) continues where the last one stopped and runs on
    into the loader's next epoch when it reaches the end, so every epoch has the same length."""
    n = 0
    while n < steps:
        got = False
        for batch in loader:
            got = True
            yield batch
            n += 1
            if n == steps:
                return
        if not got:
            raise RuntimeError(f"the training loader gave no batch ({n} of {steps} taken this epoch)")


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of torch's RNG (dropout) for one rank in one epoch: the ranks of a data-parallel
    replica draw different masks (each sees other images), and a resumed epoch draws what the
    uninterrupted run would have."""
    digest = hashlib.sha256(f"torch-rng/{seed}/{rank}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_model(cfg: TrainConfig, num_classes: int) -> GoogLeNet:
    return GoogLeNet(num_classes, variant=cfg.model.variant, aux_logits=cfg.model.aux_logits,
                     dropout=cfg.model.dropout, aux_dropout=cfg.model.aux_dropout)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """SGD parameter groups, each with its `lr_mult`: one group, or with BVLC's bias rule
    (`optim.bias_lr_mult`, `optim.bias_decay`) the biases apart."""
    o = cfg.optim
    if o.bias_lr_mult == 1 and o.bias_decay:
        return [{"params": list(model.parameters()), "lr_mult": 1.0}]
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    others = [p for n, p in model.named_parameters() if not n.endswith(".bias")]
    return [{"params": others, "lr_mult": 1.0},
            {"params": biases, "lr_mult": o.bias_lr_mult, "weight_decay": o.weight_decay if o.bias_decay else 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's SGD (its parameter groups, the effective learning rate): training's and the budget's
    warm-up's."""
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.effective_lr(), momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for this step, times each group's `lr_mult`."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def devices(cfg: TrainConfig) -> tuple[torch.device, int | None]:
    """This worker's torch device and DALI `device_id`: the GPU Ray assigned to this worker (not
    ordinal 0, which every worker of a trainer on a node would otherwise share), or the CPU and None."""
    from pipeline.data.dali import resolve_device, worker_gpu

    dali_on_gpu = resolve_device(cfg.data.device) == "gpu"
    cuda = torch.cuda.is_available() and cfg.ensemble.gpus_per_worker > 0
    gpu = worker_gpu() if cuda or dali_on_gpu else None
    if cuda:
        torch.cuda.set_device(gpu)
    return (torch.device("cuda", gpu) if cuda else torch.device("cpu")), (gpu if dali_on_gpu else None)


def worker_cpus() -> int | None:
    """The whole CPUs Ray gave this worker (a widened last-round replica gets several), None outside Ray
    or below one CPU."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:
        return None
    return int(cpus) if cpus >= 1 else None


def _exclude(config: dict, ctx: _Context, train_split) -> list[str]:
    """The training images every rank leaves out: the driver's scan, or (a trainer started without
    the driver, several ranks) a scan shared out over the ranks here."""
    from pipeline.data.scan import scan_chunk

    if config.get("exclude") is not None:
        return sorted(config["exclude"])
    if ctx.world == 1:
        return []  # a single process can skip lazily (DALITrainLoader's quarantine)
    from pipeline.data.dali import rank_range

    part = rank_range(train_split.num_samples, ctx.rank, ctx.world)
    mine = scan_chunk(str(train_split.dir), part.start, part.stop)
    return sorted({name for names in _all_gather(mine, ctx.world) for name in names})


def train_replica(config: dict) -> dict:
    """Train one replica. `config`: {"train": TrainConfig as dict, "replica": i, "strategy": name,
    "seed": int (data order, augmentation, dropout), "init_seed": int (initial weights; default seed),
    "exclude": ["shard.tar:key", ...] corrupt training images every rank leaves out (default: none for
    one process, a shared scan for several), "mlflow_uri": str | None, "mlflow_run_id": str | None,
    "local_dir": str | None (checkpoints when not under Ray Train), "run_dir": the Ray Train run's
    folder on a filesystem path (resume also looks there), "log_every": steps between progress lines}.

    A checkpoint holds, besides model, optimiser and Polyak state, every rank's data position (DALI's
    checkpoint: reader position, shuffle and augmentation RNG); torch's RNG is seeded per rank and
    epoch (`rank_seed`). A resumed run therefore sees the samples, augmentations and dropout masks the
    uninterrupted run would have (same world size; with another, the data order starts afresh)."""
    from pipeline.data.dali_eval import DALIEvalLoader
    from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
    from pipeline.data.sampling import get_strategy
    from pipeline.shards.splits import image_profile, open_split

    cfg = config_from_dict(config["train"])
    replica, seed = config["replica"], config["seed"]
    ctx = _Context(config.get("local_dir"), config.get("run_dir"))
    device, dali_gpu = devices(cfg)
    cuda = device.type == "cuda"
    # channels_last: faster on GPUs (tensor cores) and, measured here, on CPU too (GoogLeNet-bn at 32 px,
    # one thread: x1.35 for a training step, x1.7 for inference; benchmarks/model_throughput.py).
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    label = f"replica {replica} ({config['strategy']})"
    threads = worker_cpus()
    if threads:  # torch's and DALI's threads: the CPUs this worker holds
        torch.set_num_threads(threads)

    from pipeline.shards.cache import split_location  # s3://: each node reads a verified local copy

    train_split = open_split(split_location(cfg.data.shards, cfg.data.train_split))
    val_split = open_split(split_location(cfg.data.shards, cfg.data.val_split))
    num_classes = len(train_split.classes)
    torch.manual_seed(config.get("init_seed", seed))  # (DDP then copies rank 0's weights to every rank)
    model = build_model(cfg, num_classes).to(device, memory_format=fmt)
    eval_model = build_model(cfg, num_classes).to(device, memory_format=fmt).eval()
    ema = PolyakAverage(model, cfg.schedule.ema_decay)
    opt = build_optimizer(model, cfg)
    history: list[dict] = []
    start_epoch = 0
    data_state = None
    settings = config.get("settings_sha256")
    state = ctx.load(settings, tuple(config.get("settings_accepted") or ()))
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start_epoch, history = state["epoch"], state["history"]
        saved = state.get("data") or []
        if len(saved) == ctx.world:
            data_state = saved[ctx.rank]
        elif ctx.rank == 0:
            print(f"{label}: the checkpoint holds the data position of {len(saved) or 'no'} rank(s), this run has "
                  f"{ctx.world}: the data order starts afresh", flush=True)
        if ctx.rank == 0:
            print(f"{label}: resuming after epoch {start_epoch} from its checkpoint", flush=True)
    train_model = model
    if ctx.world > 1:
        import ray.train.torch

        train_model = ray.train.torch.prepare_model(model, move_to_device=False)

    strategy = get_strategy(config["strategy"], cfg.data.input_size,
                            cfg.ensemble.custom_strategies).for_source(*image_profile(train_split))
    if ctx.rank == 0:
        print(f"{label}: sampling {strategy}; {torch.get_num_threads()} torch thread(s)", flush=True)
    exclude = _exclude(config, ctx, train_split)
    if data_state is not None:  # a single process may have skipped more on its own since
        exclude = sorted(set(exclude) | set(data_state.get("skipped", [])))
    pipe_cfg = TrainPipelineConfig(strategy, batch_size=cfg.data.batch_size, shard_id=ctx.rank, num_shards=ctx.world,
                                   seed=seed, device=cfg.data.device, device_id=dali_gpu,
                                   num_threads=cfg.data.num_threads or threads)
    try:
        loader = DALITrainLoader(train_split, pipe_cfg, exclude=exclude, state=data_state)
    except ValueError as e:
        print(f"{label} rank {ctx.rank}: data position not restored ({e}); the data order starts afresh", flush=True)
        loader = DALITrainLoader(train_split, pipe_cfg, exclude=exclude)
    steps = len(loader)
    if cfg.data.limit_train:
        steps = min(steps, max(1, cfg.data.limit_train // (cfg.data.batch_size * ctx.world)))
    val_loader = DALIEvalLoader(val_split, n_crops=1, input_size=cfg.data.input_size, batch_size=cfg.data.batch_size,
                                rank=ctx.rank, world_size=ctx.world, device=cfg.data.device, limit=cfg.data.limit_val,
                                num_threads=cfg.data.num_threads or threads, device_id=dali_gpu)
    from pipeline.data.dali import Normalizer

    normalize = Normalizer(device)
    mlflow = _MlflowLogger(config.get("mlflow_uri"), config.get("mlflow_run_id")) if ctx.rank == 0 else None
    log_every = config.get("log_every", 20)
    if mlflow:
        from pipeline.tracking import environment

        for k, v in environment().items():  # the versions, CUDA, driver and GPU of the node that trains
            mlflow.tag(k, v)
    if mlflow and cfg.tracking.system_metrics_s:
        mlflow.start_system_metrics(cfg.tracking.system_metrics_s)

    if start_epoch and mlflow:
        mlflow.tag("resumed_from_epoch", str(start_epoch))
        # A worker killed after its checkpoint was persisted and before MLflow heard of the epoch:
        # the checkpoint's history has it, MLflow does not. Backfill exactly those (never twice).
        backfilled = mlflow.log_epochs(history)
        if backfilled:
            print(f"{label}: logged epoch(s) {backfilled} to MLflow from the checkpoint's history", flush=True)
    if ctx.ray:  # what this replica received, rank by rank (Ray's GPU ids; the torch device each uses)
        import ray

        got = _all_gather({"gpus": [str(g) for g in ray.get_gpu_ids()], "device": str(device),
                           "node": ray.get_runtime_context().get_node_id(),
                           "resources": ray.get_runtime_context().get_assigned_resources()}, ctx.world)
        if mlflow:
            mlflow.tag("ray_node_id", got[0]["node"])
            mlflow.tag("torch_threads", str(torch.get_num_threads()))  # (a widened replica: several)
            # what Ray gave each rank: CPUs, and the memory it reserved (ensemble.memory_per_worker)
            mlflow.tag("worker_cpus", ";".join(f"{r['resources'].get('CPU', 0):g}" for r in got))
            mlflow.tag("worker_memory_gib", ";".join(f"{r['resources'].get('memory', 0) / 2**30:.2f}" for r in got))
            mlflow.tag("ray_gpu_ids", ";".join(",".join(r["gpus"]) or "-" for r in got))
            mlflow.tag("worker_devices", ";".join(r["device"] for r in got))
    sch = cfg.schedule

    def lr_of(e: float) -> float:
        return lr_at(e, cfg.effective_lr(), sch.lr_decay, sch.decay_every, sch.warmup_epochs, sch.shape, sch.epochs)

    acc_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    profiler = (StepProfiler(cfg.tracking.profile_steps, cuda, mlflow, label)
                if mlflow and cfg.tracking.profile_steps and replica == cfg.tracking.profile_replica else None)
    for epoch in range(start_epoch, cfg.schedule.epochs):
        loader.set_epoch(epoch)
        torch.manual_seed(rank_seed(seed, ctx.rank, epoch))
        train_model.train()
        t0 = time.perf_counter()
        # running sums stay on the device: read (one host sync) only when a progress line is printed
        loss_sum = torch.zeros((), dtype=acc_dtype, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = step = 0
        mark = (0.0, 0.0, 0, t0)  # sums at the last progress line: loss, correct, seen, time
        times = StepTimes(cuda)  # where the step time goes (pipeline/train/timing.py)
        times.start()
        for x, y in _take(loader, steps):
            lr = lr_of(epoch + step / steps)
            set_lr(opt, lr)
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            times.lap("data_wait")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = train_model(x)
                loss = googlenet_loss(out, y, cfg.schedule.aux_weight, cfg.schedule.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            times.lap("forward_backward")
            opt.step()
            times.lap("optimizer")
            ema.update(model)
            times.lap("polyak")
            step += 1
            loss_sum += loss.detach() * len(y)
            correct += (out.logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if ctx.rank == 0 and log_every and step % log_every == 0:
                ls, c = torch.stack([loss_sum, correct.to(acc_dtype)]).tolist()
                now = time.perf_counter()
                rate = seen * ctx.world / (now - t0)
                eta = (steps - step) * cfg.data.batch_size * ctx.world / max(rate, 1e-9)
                print(f"{label} epoch {epoch + 1}/{cfg.schedule.epochs} step {step}/{steps} loss {ls / seen:.3f} "
                      f"err {1 - c / seen:.3f} lr {lr:.4g} {rate:,.0f} img/s eta {eta:,.0f}s", flush=True)
                if mlflow:  # this interval's averages, at the global step (rank 0's share of the batch)
                    n = seen - mark[2]
                    mlflow.log_steps({"train/step_loss": (ls - mark[0]) / n, "train/step_top1_err": 1 - (c - mark[1]) / n,
                                      "train/step_lr": lr, "train/step_images_per_s": n * ctx.world / (now - mark[3])},
                                     epoch * steps + step)
                mark = (ls, c, seen, now)
            times.end_step()
            if profiler is not None and profiler.step():
                profiler = None  # (its trace is logged)
        train_s = time.perf_counter() - t0
        loss_total, correct_total, seen = _all_reduce([loss_sum.item(), float(correct.item()), seen], device)
        ema.copy_to(eval_model)
        v_top1 = torch.zeros((), dtype=torch.int64, device=device)
        v_top5 = torch.zeros((), dtype=torch.int64, device=device)
        v_n = 0
        with torch.inference_mode():
            for x, y in val_loader:
                x = normalize(x[:, 0])  # [B, 1 crop, 3, S, S] uint8 -> normalised [B, 3, S, S]
                y = y.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    logits = eval_model(x.contiguous(memory_format=fmt))
                top5 = logits.float().topk(min(5, num_classes), dim=1).indices
                v_top1 += (top5[:, 0] == y).sum()
                v_top5 += (top5 == y[:, None]).any(1).sum()
                v_n += len(y)
        v_top1, v_top5, v_n = _all_reduce([float(v_top1.item()), float(v_top5.item()), v_n], device)
        epoch_s = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "train/loss": loss_total / max(seen, 1),
                   "train/top1_err": 1 - correct_total / max(seen, 1),
                   "val/top1_err": 1 - v_top1 / max(v_n, 1), "val/top5_err": 1 - v_top5 / max(v_n, 1),
                   "train/lr": lr_of(epoch),
                   "data/images_per_s": seen / max(train_s, 1e-9), "train/epoch_s": epoch_s, "train/images": seen,
                   "data/skipped_images": len(loader.skipped), **times.fractions()}
        history.append(metrics)
        data = _all_gather(loader.state(), ctx.world)  # every rank's position, kept by rank 0
        if ctx.rank == 0:
            print(f"{label} epoch {epoch + 1}/{cfg.schedule.epochs} done: loss {metrics['train/loss']:.3f} "
                  f"train err {metrics['train/top1_err']:.3f} val top1 err {metrics['val/top1_err']:.3f} "
                  f"top5 err {metrics['val/top5_err']:.3f} | {metrics['data/images_per_s']:,.0f} img/s | "
                  f"{epoch_s:,.0f}s/epoch, eta {(cfg.schedule.epochs - epoch - 1) * epoch_s:,.0f}s", flush=True)
            state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "ema": ema.state_dict(), "history": history, "num_classes": num_classes,
                     "strategy": config["strategy"], "replica": replica, "data": data, "settings_sha256": settings}
            saved = time.perf_counter()
            ctx.report(metrics, state)
            metrics["time/checkpoint_s"] = time.perf_counter() - saved  # (in the history MLflow gets, not the file)
            # An epoch reaches MLflow only once its checkpoint is in the run folder, where a restart finds
            # it: logged earlier, a restart would re-run the epoch and its values would be dropped as
            # doubles. With the history, epochs whose checkpoint was not persisted follow with the next one.
            if ctx.confirmed(epoch + 1):
                if mlflow:
                    mlflow.log_epochs(history)  # each (key, epoch) once: see _MlflowLogger
            else:
                print(f"{label} epoch {epoch + 1}: its checkpoint is not in {ctx.run_dir}; the epoch reaches MLflow "
                      "with the next persisted checkpoint", flush=True)
        else:
            ctx.report(metrics, None)
    if mlflow:
        mlflow.stop_system_metrics()
    if ctx.rank == 0:
        print(f"{label}: training done ({len(history)} epochs); its final weights are logged next", flush=True)
    return {"history": history, "num_classes": num_classes}  # no tensors: Ray Train cannot return them


class _MlflowLogger:
    """Rank 0's MLflow writer. Per-epoch metrics are logged at most once per (key, epoch): before
    logging, the run's recorded steps are read back, so a re-run epoch (after a restart from an
    earlier checkpoint) or a backfill never adds a second value for an epoch.

    A tracking server that is down (restarting, its database failing over) pauses the training at its
    next log call, by the waiting policy of every tracking call (`pipeline.tracking.wait_for_tracking`:
    retried every few seconds for up to $INCEPTION_TRACKING_WAIT_S, default 900 s), then the replica
    fails with one line saying so; its checkpoints are intact and the same command resumes it."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.client, self.uri, self._step_floor, self._monitor = None, uri, None, None
        if uri and run_id:
            from pipeline.tracking import PatientClient

            self.client, self.run_id = PatientClient(uri, who="training"), run_id

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)

    def log_steps(self, metrics: dict[str, float], step: int) -> None:
        """Per-step training metrics at a global step, each (key, step) once: after a resume the steps of
        a re-run epoch that MLflow already holds are not logged again."""
        if self.client is None:
            return
        if self._step_floor is None:  # read once: the last step logged before this process started
            self._step_floor = max(self.logged_steps("train/step_loss"), default=-1)
        if step <= self._step_floor:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                                for k, v in metrics.items()])

    def start_system_metrics(self, every_s: float) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_*,
        system/gpu_* where a GPU is visible) for this run, every `every_s` seconds, by MLflow's own monitor
        (what `mlflow.start_run(log_system_metrics=True)` starts), continuing the steps the run has. The
        run's status is not touched: it is the ensemble driver's, which may have ended the run (a stopped
        job) while Ray was still starting this worker; reopening it would leave it RUNNING for good. The
        monitor ends by itself once the run is no longer RUNNING."""
        if self.client is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.uri)
            # (the recipe's interval, also where MLFLOW_SYSTEM_METRICS_* variables are set: they would win)
            monitor.sampling_interval, monitor.samples_before_logging = every_s, 1
            monitor.start()
            self._monitor = monitor
        except Exception as e:  # never stop training for a monitor
            print(f"system metrics not logged: {type(e).__name__}: {e}", flush=True)
            self._monitor = None

    def stop_system_metrics(self) -> None:
        """Stop the monitor (its last samples logged); the run stays as it is: its final status (FINISHED
        once the weights are logged, FAILED, KILLED) is the ensemble driver's to set."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()

    def artifact(self, path: str, folder: str) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, path, artifact_path=folder)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_epochs(self, epochs: list[dict]) -> list[int]:
        """Log each {"epoch": e, metric: value...} at step e for the keys MLflow lacks at that step;
        returns the epochs that got anything."""
        if self.client is None or not epochs:
            return []
        from mlflow.entities import Metric

        keys = sorted({k for m in epochs for k in m if k != "epoch"})
        have = {k: self.logged_steps(k) for k in keys}
        now = int(time.time() * 1000)
        todo = [Metric(k, float(v), now, int(m["epoch"])) for m in epochs for k, v in m.items()
                if k != "epoch" and int(m["epoch"]) not in have[k]]
        for i in range(0, len(todo), 900):  # MLflow takes at most 1,000 metrics per batch
            self.client.log_batch(self.run_id, metrics=todo[i:i + 900])
        return sorted({m.step for m in todo})
