"""The per-worker training loop of one replica. The same function runs in-process (tests, debugging)
and inside a Ray Train worker (the ensemble driver), where it is data-parallel over the replica's
workers (DDP) and reports metrics and checkpoints through `ray.train.report`.

Recipe (paper sec. 5-6): SGD with momentum, the step schedule of `lr_at` (x0.96 every 8 epochs),
auxiliary losses weighted 0.3, Polyak-averaged weights kept beside the model and used for validation
and as the final model; bf16 autocast and channels_last on GPU. Only rank 0 logs and checkpoints.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.model.googlenet import GoogLeNet, googlenet_loss
from pipeline.train.schedule import PolyakAverage, lr_at

CHECKPOINT_FILE = "state.pt"


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

    def __init__(self, local_dir: str | None):
        self.local_dir = local_dir
        try:
            import ray.train

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.ray = True
        except Exception:  # not in a Ray Train worker
            self.rank, self.world, self.ray = 0, 1, False

    def load(self) -> dict | None:
        if self.ray:
            import ray.train

            ckpt = ray.train.get_checkpoint()
            if ckpt is None:
                return None
            with ckpt.as_directory() as d:
                return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        path = Path(self.local_dir or "") / CHECKPOINT_FILE
        return torch.load(path, map_location="cpu", weights_only=False) if self.local_dir and path.exists() else None

    def report(self, metrics: dict, state: dict | None) -> None:
        if not self.ray:
            if state is not None and self.local_dir:
                os.makedirs(self.local_dir, exist_ok=True)
                tmp = Path(self.local_dir) / (CHECKPOINT_FILE + ".tmp")
                torch.save(state, tmp)
                os.replace(tmp, Path(self.local_dir) / CHECKPOINT_FILE)
            return
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _all_reduce(values: list[float], device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def build_model(cfg: TrainConfig, num_classes: int) -> GoogLeNet:
    return GoogLeNet(num_classes, variant=cfg.model.variant, aux_logits=cfg.model.aux_logits,
                     dropout=cfg.model.dropout, aux_dropout=cfg.model.aux_dropout)


def train_replica(config: dict) -> dict:
    """Train one replica. `config`: {"train": TrainConfig as dict, "replica": i, "strategy": name,
    "seed": int, "mlflow_uri": str | None, "mlflow_run_id": str | None, "local_dir": str | None
    (checkpoints when not under Ray Train), "log_every": steps between progress lines}."""
    from pipeline.data.dali import DALIEvalLoader, DALITrainLoader, TrainPipelineConfig
    from pipeline.data.sampling import get_strategy
    from pipeline.data.shards import image_profile, open_split

    cfg = config_from_dict(config["train"])
    replica, seed = config["replica"], config["seed"]
    ctx = _Context(config.get("local_dir"))
    cuda = torch.cuda.is_available() and cfg.ensemble.gpus_per_worker > 0
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    # channels_last: faster on GPUs (tensor cores) and, measured here, on CPU too (GoogLeNet-bn at 32 px,
    # one thread: x1.35 for a training step, x1.7 for inference; benchmarks/model_throughput.py).
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    label = f"replica {replica} ({config['strategy']})"

    shards = Path(cfg.data.shards)
    train_split, val_split = open_split(shards / cfg.data.train_split), open_split(shards / cfg.data.val_split)
    num_classes = len(train_split.classes)
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes).to(device, memory_format=fmt)
    eval_model = build_model(cfg, num_classes).to(device, memory_format=fmt).eval()
    ema = PolyakAverage(model, cfg.schedule.ema_decay)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    history: list[dict] = []
    start_epoch = 0
    state = ctx.load()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start_epoch, history = state["epoch"], state["history"]
        if ctx.rank == 0:
            print(f"{label}: resuming after epoch {start_epoch} from its checkpoint", flush=True)
    train_model = model
    if ctx.world > 1:
        import ray.train.torch

        train_model = ray.train.torch.prepare_model(model, move_to_device=False)

    strategy = get_strategy(config["strategy"], cfg.data.input_size).for_source(*image_profile(train_split))
    if ctx.rank == 0:
        print(f"{label}: sampling {strategy}", flush=True)
    loader = DALITrainLoader(train_split, TrainPipelineConfig(
        strategy, batch_size=cfg.data.batch_size, shard_id=ctx.rank, num_shards=ctx.world, seed=seed,
        device=cfg.data.device, num_threads=cfg.data.num_threads))
    steps = len(loader)
    if cfg.data.limit_train:
        steps = min(steps, max(1, cfg.data.limit_train // (cfg.data.batch_size * ctx.world)))
    val_loader = DALIEvalLoader(val_split, n_crops=1, input_size=cfg.data.input_size, batch_size=cfg.data.batch_size,
                                rank=ctx.rank, world_size=ctx.world, device=cfg.data.device, limit=cfg.data.limit_val,
                                num_threads=cfg.data.num_threads)
    from pipeline.data.dali import Normalizer

    normalize = Normalizer(device)
    mlflow = _MlflowLogger(config.get("mlflow_uri"), config.get("mlflow_run_id")) if ctx.rank == 0 else None
    log_every = config.get("log_every", 20)

    if start_epoch and mlflow:
        mlflow.tag("resumed_from_epoch", str(start_epoch))
    if mlflow and ctx.ray:
        import ray

        mlflow.tag("ray_node_id", ray.get_runtime_context().get_node_id())
    sch = cfg.schedule

    def lr_of(e: float) -> float:
        return lr_at(e, cfg.optim.lr, sch.lr_decay, sch.decay_every, sch.warmup_epochs, sch.shape, sch.epochs)

    fail_once = config.get("fail_once")  # test hook: {"epoch": e, "marker": path} fails epoch e once
    for epoch in range(start_epoch, cfg.schedule.epochs):
        if fail_once and fail_once["epoch"] == epoch and not os.path.exists(fail_once["marker"]):
            Path(fail_once["marker"]).touch()
            raise RuntimeError(f"{label}: injected failure at the start of epoch {epoch + 1} (test hook)")
        loader.set_epoch(epoch)
        train_model.train()
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        step = 0
        for x, y in loader:
            if step == steps:
                break
            lr = lr_of(epoch + step / steps)
            for g in opt.param_groups:
                g["lr"] = lr
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = train_model(x)
                loss = googlenet_loss(out, y, cfg.schedule.aux_weight, cfg.schedule.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (out.logits.argmax(1) == y).sum().item()
            seen += len(y)
            if ctx.rank == 0 and log_every and step % log_every == 0:
                rate = seen * ctx.world / (time.perf_counter() - t0)
                eta = (steps - step) * cfg.data.batch_size * ctx.world / max(rate, 1e-9)
                print(f"{label} epoch {epoch + 1}/{cfg.schedule.epochs} step {step}/{steps} loss {loss_sum / seen:.3f} "
                      f"err {1 - correct / seen:.3f} lr {lr:.4g} {rate:,.0f} img/s eta {eta:,.0f}s", flush=True)
        train_s = time.perf_counter() - t0
        loss_sum, correct, seen = _all_reduce([loss_sum, correct, seen], device)
        ema.copy_to(eval_model)
        v_top1 = v_top5 = v_n = 0.0
        with torch.inference_mode():
            for x, y in val_loader:
                x = normalize(x[:, 0])  # [B, 1 crop, 3, S, S] uint8 -> normalised [B, 3, S, S]
                y = y.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    logits = eval_model(x.contiguous(memory_format=fmt))
                top5 = logits.float().topk(min(5, num_classes), dim=1).indices
                v_top1 += (top5[:, 0] == y).sum().item()
                v_top5 += (top5 == y[:, None]).any(1).sum().item()
                v_n += len(y)
        v_top1, v_top5, v_n = _all_reduce([v_top1, v_top5, v_n], device)
        epoch_s = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "train/loss": loss_sum / max(seen, 1), "train/top1_err": 1 - correct / max(seen, 1),
                   "val/top1_err": 1 - v_top1 / max(v_n, 1), "val/top5_err": 1 - v_top5 / max(v_n, 1),
                   "train/lr": lr_of(epoch),
                   "data/images_per_s": seen / max(train_s, 1e-9), "train/epoch_s": epoch_s,
                   "data/skipped_images": len(loader.skipped)}
        history.append(metrics)
        if ctx.rank == 0:
            print(f"{label} epoch {epoch + 1}/{cfg.schedule.epochs} done: loss {metrics['train/loss']:.3f} "
                  f"train err {metrics['train/top1_err']:.3f} val top1 err {metrics['val/top1_err']:.3f} "
                  f"top5 err {metrics['val/top5_err']:.3f} | {metrics['data/images_per_s']:,.0f} img/s | "
                  f"{epoch_s:,.0f}s/epoch, eta {(cfg.schedule.epochs - epoch - 1) * epoch_s:,.0f}s", flush=True)
            if mlflow:
                mlflow.log(metrics, step=epoch + 1)
            state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "ema": ema.state_dict(), "history": history, "num_classes": num_classes,
                     "strategy": config["strategy"], "replica": replica}
            ctx.report(metrics, state)
        else:
            ctx.report(metrics, None)
    return {"history": history, "num_classes": num_classes}  # no tensors: Ray Train cannot return them


class _MlflowLogger:
    def __init__(self, uri: str | None, run_id: str | None):
        self.client = None
        if uri and run_id:
            import mlflow

            self.client, self.run_id = mlflow.MlflowClient(uri), run_id

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                    if k != "epoch"])
