"""Typed, validated configs. Validation raises ConfigError naming the field, before any work starts."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field


class ConfigError(ValueError):
    pass


def env_int(name: str, default: int, minimum: int, unit: str = "") -> int:
    """A whole number from the environment variable `name` (unset or empty: `default`), at least
    `minimum`; a ValueError naming the variable otherwise."""
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number" + (f" of {unit}" if unit else "")) from None
    if value < minimum:
        raise ValueError(f"{name}={value}: at least {minimum}" + (f" {unit}" if unit else ""))
    return value


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


def check_plain_name(field_name: str, value) -> None:
    """Names that become folder names, run names and MLflow search values: letters, digits, '-' and '_'
    (no '/', '.', quotes or spaces), at most 100 characters."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
        raise ConfigError(f"{field_name}: {value!r} must be a plain name: letters, digits, '-' and '_', "
                          "starting with a letter or digit, at most 100 characters")


def in_ray_job() -> bool:
    """True inside a job submitted with `ray job submit`, which runs in a temporary copy of --working-dir."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def durable_path(field_name: str, value: str) -> str:
    """A local path a job writes for later (shards, checkpoints): `~` expanded; a relative path is refused
    inside a Ray job (it would land in the job's temporary copy of the working directory and vanish with
    it), and made absolute elsewhere."""
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        if in_ray_job():
            raise ConfigError(f"{field_name}: '{value}' is relative; inside a Ray job use an absolute path "
                              "(a relative one resolves inside the job's temporary copy of the working "
                              "directory, which is deleted with it)")
        path = os.path.abspath(path)
    return path


FINGERPRINT_DEFAULTS = {"max_file_mb": 64, "max_megapixels": 50}  # ShardConfig's input caps, by default


@dataclass
class ShardConfig:
    """Settings of the shard job (jobs/shard_dataset.py); docs/reference/cli.md lists each one."""

    source: str = "fashion-mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    out: str = "shards"
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    samples_per_shard: int = 5000
    seed: int = 0
    limit: int | None = None
    workers: int | None = None  # None: one task per CPU of the cluster
    max_side: int | None = None
    full_decode: bool = False
    max_file_mb: int = FINGERPRINT_DEFAULTS["max_file_mb"]  # an input file larger than this is skipped unread
    max_megapixels: int = FINGERPRINT_DEFAULTS["max_megapixels"]  # a header declaring more: skipped (or downscaled)
    overwrite: bool = False
    name: str | None = None  # dataset folder name; default: source (+ "-max<N>" when resizing)
    val_labels: str | None = None
    mlflow_uri: str | None = None  # None: MLFLOW_TRACKING_URI if set, else not logged
    experiment: str = "inception-pipeline"
    # source fashion-mnist-scenes only (pipeline.shards.scenes); None: the source's default. Recorded with
    # the shards (in the manifest's job.source_info), so output drawn with other values is refused.
    scene_canvas: int | None = None  # scene side in px (default 96)
    scene_scale: list[float] | None = None  # [min, max] garment side / canvas side, log-uniform (default [0.25, 0.9])
    scene_aspect: list[float] | None = None  # [min, max] width/height stretch, log-uniform (default [0.75, 1.333])
    scene_seed: int | None = None  # seed of the scenes' random draw (default 0), apart from `seed`

    SCENE_FIELDS = ("scene_canvas", "scene_scale", "scene_aspect", "scene_seed")

    def scene_settings(self):
        """The scenes source's settings (`pipeline.shards.scenes.SceneSettings`), defaults where unset;
        ConfigError naming the flag of a bad one."""
        from pipeline.shards.scenes import SceneSettings

        given = {k.removeprefix("scene_"): getattr(self, k) for k in self.SCENE_FIELDS if getattr(self, k) is not None}
        for k in ("scale", "aspect"):
            if k in given:
                v = given[k]
                if isinstance(v, str) or not isinstance(v, list | tuple) or len(v) != 2 \
                        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
                    raise ConfigError(f"--scene-{k} {v!r}: expected two numbers MIN,MAX")
                given[k] = (float(v[0]), float(v[1]))
        try:
            return SceneSettings(**given).validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def validate(self) -> ShardConfig:
        from pipeline.shards.sources import SOURCES

        if self.source not in SOURCES:
            raise ConfigError(f"source: '{self.source}' is not one of {sorted(SOURCES)}")
        if not self.splits or any(not s or "/" in s or "\\" in s or s.startswith(".") for s in self.splits):
            raise ConfigError(f"splits: expected a comma-separated list like train,val, got {self.splits}")
        if len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"splits: {self.splits} lists a split twice")
        for name in ("samples_per_shard", "limit", "workers", "max_side", "max_file_mb", "max_megapixels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if self.max_side is not None and self.max_side < 16:
            raise ConfigError(f"max_side: {self.max_side} px is too small to train on (minimum 16)")
        if self.source == "fashion-mnist-scenes":
            self.scene_settings()
        else:
            given = [k for k in self.SCENE_FIELDS if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"--{given[0].replace('_', '-')}: only for --source fashion-mnist-scenes "
                                  f"(the source is {self.source})")
        if self.name is not None:
            check_plain_name("name", self.name)
        if "://" in self.out:  # object storage: s3:// (pipeline.shards.storage.s3)
            from pipeline.shards.storage.objstore import check_uri

            try:
                check_uri(self.out, "out")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif in_ray_job():
            # A submitted job runs in a temporary copy of --working-dir: a relative --out would
            # write the shards there and they would vanish with it.
            self.out = durable_path("out", self.out)
        return self

    @property
    def dataset(self) -> str:
        if self.name:
            return self.name
        return self.source + (f"-max{self.max_side}" if self.max_side else "")

    def fingerprint(self) -> dict:
        """What must match for an existing output to be resumed instead of refused. The input caps count
        only where they differ from their defaults (shards made before they were settings used those):
        `FINGERPRINT_DEFAULTS` is what a missing one means."""
        return {k: v for k, v in asdict(self).items()
                if k in ("source", "samples_per_shard", "seed", "limit", "max_side", "full_decode")
                or (k in FINGERPRINT_DEFAULTS and v != FINGERPRINT_DEFAULTS[k])}


# ------------------------------------------------------------------------------------------ training

@dataclass
class DataConfig:
    shards: str = ".run/shards/fashion-mnist"  # a shard job output folder holding <train_split>/ and <val_split>/
    train_split: str = "train"  # the split trained on (a folder under data.shards)
    val_split: str = "val"  # the split validated on each epoch (the first data.limit_val images)
    input_size: int = 224  # crop side in px the network sees (paper: 224; at least 32)
    batch_size: int = 64  # per worker
    limit_train: int | None = None  # samples per epoch per replica (None: the whole split)
    limit_val: int | None = None  # validation images per epoch (None: the whole split)
    num_threads: int | None = None  # DALI threads; None: the CPUs Ray gave the worker
    device: str = "auto"  # DALI: auto | cpu | gpu


@dataclass
class ModelConfig:
    variant: str = "paper"  # paper: Table 1 with LRN (BVLC); bn: BatchNorm, torchvision-compatible
    aux_logits: bool = True  # the two auxiliary classifiers during training (sec. 5); never at inference
    dropout: float | None = None  # None: the variant's (0.4 paper, 0.2 bn)
    aux_dropout: float = 0.7  # dropout of the auxiliary classifiers (paper: 70%)
    channels_last: bool = True  # NHWC memory format (faster on GPU and, measured, on CPU)


@dataclass
class OptimConfig:
    lr: float = 0.01  # base learning rate of SGD (at optim.reference_batch when that is set)
    momentum: float = 0.9  # paper sec. 6
    weight_decay: float = 0.0002  # L2 penalty (BVLC solver: 0.0002)
    nesterov: bool = False  # Nesterov momentum instead of classical
    # BVLC's GoogLeNet solver (train_val.prototxt): biases learn at 2x the rate, without weight decay.
    bias_lr_mult: float = 1.0  # learning-rate multiplier of the biases (BVLC: 2)
    bias_decay: bool = True  # weight decay on the biases too (BVLC: false)
    # The global batch (data.batch_size x ensemble.workers_per_replica) that `lr` is meant for. When set,
    # the learning rate follows the global batch linearly (Goyal et al., 2017): the effective LR is
    # lr x global batch / reference_batch, printed at start and logged as `optim.effective_lr`. None: lr
    # as given, whatever the batch.
    reference_batch: int | None = None


@dataclass
class ScheduleConfig:
    epochs: int = 10  # passes over data.limit_train images (the whole split when unset)
    lr_decay: float = 0.96  # paper sec. 6: "decreasing the learning rate by 4% every 8 epochs"
    decay_every: int = 8  # epochs between learning-rate decays (step shape)
    warmup_epochs: float = 0  # linear warm-up from lr/10 (large batches)
    shape: str = "step"  # step: the paper's x lr_decay every decay_every epochs; cosine: to 0 at the last epoch
    ema_decay: float = 0.999  # Polyak averaging of the weights, per optimiser step
    aux_weight: float = 0.3  # paper sec. 5
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0: off, as in the paper)


@dataclass
class EnsembleConfig:
    replicas: int = 7  # ensemble size; replica i samples with ensemble.strategies[i] (paper sec. 7)
    # One sampling strategy per replica: presets (pipeline/data/sampling.py) or names defined in
    # custom_strategies; None: the paper's seven presets in order. Fingerprinted (with the definitions of
    # the custom ones it names) where it differs from that default.
    strategies: list[str] | None = None
    # Strategies defined in the recipe: name -> {kind, area, aspect, shorter_side, flip, photometric, interpolations}
    custom_strategies: dict | None = None
    allow_repeats: bool = False  # a strategy named twice (or more than 7 replicas without a list) is refused unless true
    workers_per_replica: int = 1  # data-parallel Ray Train workers of one replica
    gpus_per_worker: float = 0.0  # GPUs per worker; a fraction below 1 shares a GPU (0: CPU only)
    cpus_per_worker: float = 1.0  # CPUs per worker (also DALI's threads when data.num_threads is unset)
    # Replicas trained at once. auto: as many as the cluster's CPUs, GPUs and memory hold (the placement plan,
    # memory_per_worker below); a number: at most that many (and never more than fit); None: every replica
    # submitted at once, Ray starting each as resources free up (paced by the plan when memory is reserved).
    max_concurrent: int | str | None = None
    # Memory each worker reserves on its node (Ray's `memory` resource), so that no node takes more workers
    # than it holds. auto: measured, the peak of a few real training steps in a fresh worker process + 20% +
    # 0.25 GiB (pipeline.train.memory; cached per machine); a number: that many GiB; None: not reserved.
    memory_per_worker: float | str | None = None
    seed: int = 0  # base of every replica's initialisation and data-order seeds
    # The paper's seven models started from the same initial weights ("mainly because of an oversight",
    # sec. 7) and differed in sampling and data order only; false gives each replica its own init.
    same_init: bool = False
    # Refuse, before training, a request the cluster's nodes can never hold (false: an autoscaling
    # cluster whose GPU nodes are not up yet).
    check_resources: bool = True
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    # Checkpoints: an absolute path every node sees (a shared filesystem on a cluster) or s3://. The default
    # is Ray Train's own, ~/ray_results, which holds on one machine only.
    storage_path: str = "~/ray_results"
    name: str | None = None  # stable run name (resume key), a plain name; default: ensemble-<recipe>
    # Wall-clock minutes for the whole ensemble's training: a warm-up measures this cluster's images/s and
    # data.limit_train (images per epoch) is sized to fit, at most the recipe's, at least budget_min_images
    # per replica over the run (pipeline.train.budget). Chosen once: a resubmission keeps the first choice.
    budget_minutes: float | None = None
    budget_min_images: int = 30000  # with budget_minutes: the fewest images a replica trains on
    # With fewer replicas left than slots (7 replicas, 2 at a time: the 7th alone), each remaining replica
    # takes the free slots' CPUs (more threads) when one node holds them (CPU-only, one worker per replica).
    widen_tail: bool = True


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI
    experiment: str = "inception-pipeline"  # MLflow experiment of the ensemble's runs
    register_model: str | None = "googlenet-replica"  # registered model of each replica's weights (None: none)
    register_ensemble: str | None = "googlenet-ensemble"  # the finished ensemble as one pyfunc (pipeline.serving)
    log_every: int = 20  # a progress line and train/step_* metrics (loss, error, lr, images/s) every N steps; 0: none
    system_metrics_s: float = 10  # MLflow system metrics (CPU, memory, GPU) every N seconds on each replica; 0: off
    profile_steps: int = 0  # a torch profiler trace of this many training steps of one replica, an MLflow artifact; 0: off
    profile_replica: int = 0  # the replica whose steps tracking.profile_steps traces


@dataclass
class TrainConfig:
    recipe: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> TrainConfig:
        positive_int = [("data.input_size", self.data.input_size), ("data.batch_size", self.data.batch_size),
                        ("schedule.epochs", self.schedule.epochs), ("schedule.decay_every", self.schedule.decay_every),
                        ("ensemble.replicas", self.ensemble.replicas),
                        ("ensemble.workers_per_replica", self.ensemble.workers_per_replica),
                        ("data.limit_train", self.data.limit_train), ("data.limit_val", self.data.limit_val),
                        ("ensemble.max_concurrent", self.ensemble.max_concurrent),
                        ("ensemble.budget_min_images", self.ensemble.budget_min_images),
                        ("optim.reference_batch", self.optim.reference_batch)]
        for name, v in positive_int:
            if name == "ensemble.max_concurrent" and v == "auto":
                continue
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name}: must be a positive integer" + (", auto or null" if name ==
                                  "ensemble.max_concurrent" else "") + f", got {v!r}")
        mem = self.ensemble.memory_per_worker
        if mem is not None and mem != "auto" and (isinstance(mem, bool) or not isinstance(mem, (int, float))
                                                  or not 0 < mem < 1e6):
            raise ConfigError(f"ensemble.memory_per_worker: must be auto, a positive number of GiB or null, got {mem!r}")
        if self.data.input_size < 32:
            raise ConfigError(f"data.input_size: GoogLeNet needs >= 32 px, got {self.data.input_size}")
        if self.model.variant not in ("paper", "bn"):
            raise ConfigError(f"model.variant: must be paper or bn, got {self.model.variant!r}")
        if "://" in self.data.shards:  # s3://: each node reads a verified local copy (pipeline.shards.cache)
            from pipeline.shards.storage.objstore import check_uri

            try:
                check_uri(self.data.shards, "data.shards")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        scheme = self.ensemble.storage_path.split("://", 1)[0] if "://" in self.ensemble.storage_path else ""
        if scheme and scheme not in STORAGE_SCHEMES:
            raise ConfigError(f"ensemble.storage_path: '{scheme}://' is not supported; use a path or one of "
                              + ", ".join(f"{s}://" for s in STORAGE_SCHEMES))
        if not scheme:  # workers, resubmissions and evaluation find the checkpoints only at an absolute path
            self.ensemble.storage_path = durable_path("ensemble.storage_path", self.ensemble.storage_path)
        if "://" not in self.data.shards:
            self.data.shards = durable_path("data.shards", self.data.shards)
        if self.ensemble.name is not None:
            check_plain_name("ensemble.name", self.ensemble.name)
        g = self.ensemble.gpus_per_worker
        if g > 1 and g != int(g):
            raise ConfigError(f"ensemble.gpus_per_worker: Ray takes a fraction below 1 or a whole number, got {g}")
        if self.ensemble.budget_minutes is not None and self.ensemble.workers_per_replica > 1:
            raise ConfigError("ensemble.budget_minutes: the warm-up measures one-worker replicas; with "
                              f"workers_per_replica {self.ensemble.workers_per_replica} set data.limit_train instead")
        if self.schedule.shape not in ("step", "cosine"):
            raise ConfigError(f"schedule.shape: must be step or cosine, got {self.schedule.shape!r}")
        if self.data.device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"data.device: must be auto, cpu or gpu, got {self.data.device!r}")
        checks = [("optim.lr", self.optim.lr > 0), ("optim.momentum", 0 <= self.optim.momentum < 1),
                  ("optim.weight_decay", self.optim.weight_decay >= 0),
                  ("optim.bias_lr_mult", self.optim.bias_lr_mult > 0),
                  ("schedule.lr_decay", 0 < self.schedule.lr_decay <= 1),
                  ("schedule.ema_decay", 0 <= self.schedule.ema_decay < 1),
                  ("schedule.warmup_epochs", 0 <= self.schedule.warmup_epochs < self.schedule.epochs),
                  ("schedule.aux_weight", self.schedule.aux_weight >= 0),
                  ("schedule.label_smoothing", 0 <= self.schedule.label_smoothing < 1),
                  ("ensemble.gpus_per_worker", self.ensemble.gpus_per_worker >= 0),
                  ("ensemble.cpus_per_worker", self.ensemble.cpus_per_worker > 0),
                  ("ensemble.max_failures", self.ensemble.max_failures >= 0),
                  ("ensemble.budget_minutes", self.ensemble.budget_minutes is None or self.ensemble.budget_minutes > 0),
                  ("tracking.log_every", self.tracking.log_every >= 0),
                  ("tracking.system_metrics_s", self.tracking.system_metrics_s >= 0),
                  ("tracking.profile_steps", self.tracking.profile_steps >= 0),
                  ("tracking.profile_replica", 0 <= self.tracking.profile_replica < self.ensemble.replicas)]
        from pipeline.data.sampling import replica_strategies

        try:
            replica_strategies(self.ensemble.replicas, self.ensemble.strategies, self.ensemble.custom_strategies,
                               self.ensemble.allow_repeats)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name, ok in checks:
            if not ok:
                section, key = name.split(".")
                raise ConfigError(f"{name}: value {getattr(getattr(self, section), key)!r} is out of range")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def global_batch(self) -> int:
        """Images per optimiser step of one replica: every worker's batch."""
        return self.data.batch_size * self.ensemble.workers_per_replica

    def effective_lr(self) -> float:
        """The learning rate training uses: optim.lr scaled linearly from optim.reference_batch to the
        global batch (optim.lr itself when no reference batch is set)."""
        if self.optim.reference_batch is None:
            return self.optim.lr
        return self.optim.lr * self.global_batch / self.optim.reference_batch

    def derived(self) -> dict[str, object]:
        """Values computed from the settings, printed and logged beside them."""
        return {"data.global_batch": self.global_batch, "optim.effective_lr": self.effective_lr()}

    def result_settings(self) -> dict[str, object]:
        """The settings that change what an ensemble learns (`section.field` -> value): data, model, optim,
        schedule, and the ensemble's seed, initialisation, replica count and data-parallel width (the
        global batch). Not where things are stored or how many run at once: resuming under other
        resources is fine, under other results-changing settings it would mix two experiments."""
        out = {k: v for k, v in self.flat().items()
               if k.split(".", 1)[0] in ("data", "model", "optim", "schedule") and k not in NOT_RESULT_SETTINGS
               or k in ("ensemble.seed", "ensemble.same_init", "ensemble.replicas", "ensemble.workers_per_replica")}
        # The learning rate training uses, however it is written (lr alone, or lr at a reference batch): an
        # ensemble recorded as optim.lr 0.16 resumes under optim.lr 0.16 at reference_batch 512 x 512.
        out["optim.lr"] = self.effective_lr()
        out.pop("optim.reference_batch", None)
        # What the workers compute in and where DALI augments (with data.device auto: the GPU where the
        # workers have one): bf16 autocast on GPUs, fp32 on CPUs; DALI's GPU and CPU operators differ.
        gpu = self.ensemble.gpus_per_worker > 0
        out["model.precision"] = "bf16" if gpu else "fp32"
        # The replicas' strategies where they are not the paper's seven presets in order (so that the
        # ensembles recorded before strategies were configurable keep their fingerprint), with the
        # definitions of those defined in the recipe.
        names = self.strategy_names()
        if names != [PRESET_ORDER[i % len(PRESET_ORDER)] for i in range(len(names))]:
            out["ensemble.strategies"] = names
            custom = self.ensemble.custom_strategies or {}
            for n in sorted(set(names) & set(custom)):
                out[f"ensemble.custom_strategies.{n}"] = custom[n]
        out["data.device"] = self.data.device if self.data.device != "auto" else ("gpu" if gpu else "cpu")
        return canonical_settings(out)

    def strategy_names(self) -> list[str]:
        """Each replica's sampling strategy (validated by `validate`)."""
        from pipeline.data.sampling import replica_strategies

        e = self.ensemble
        return replica_strategies(e.replicas, e.strategies, e.custom_strategies, e.allow_repeats)

    def flat(self) -> dict[str, object]:
        """section.field -> value, for MLflow params and printing."""
        return {f"{s}.{k}": v for s, sec in asdict(self).items() if isinstance(sec, dict) for k, v in sec.items()} \
            | {"recipe": self.recipe}


# Fields that do not change what is learnt: where the shards are (their content is fingerprinted by digest
# instead), DALI's thread count, the memory layout. (data.device is fingerprinted as resolved.)
NOT_RESULT_SETTINGS = ("data.shards", "data.num_threads", "data.device", "model.channels_last")
VARIANT_DROPOUT = {"paper": 0.4, "bn": 0.2}  # model.dropout None: the variant's
# The preset strategies' order (pipeline.data.sampling.list_strategies()): replica i's by default.
PRESET_ORDER = ("inception", "inception-photometric", "inception-large", "scale-jitter", "scale-jitter-narrow",
                "inception-wide-aspect", "inception-random-interp")


def canonical_settings(settings: dict) -> dict:
    """Result settings written one way, so that equal training compares equal: model.dropout None as the
    variant's value; under the cosine schedule, the step schedule's lr_decay and decay_every (unused)
    left out. Applied to recorded settings too, whatever version recorded them."""
    out = dict(settings)
    if out.get("model.dropout") is None and "model.dropout" in out:
        out["model.dropout"] = VARIANT_DROPOUT.get(out.get("model.variant", "paper"), out["model.dropout"])
    if out.get("schedule.shape") == "cosine":
        out.pop("schedule.lr_decay", None)
        out.pop("schedule.decay_every", None)
    return out


def settings_digest(settings: dict) -> str:
    """A short sha256 of settings (JSON, sorted keys): equal settings, equal digest."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_diff(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every field that differs (a field missing on one side shows as <unset>)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if a != b:
            out.append(f"{k}: {a} -> {b}")
    return out


# Checkpoint storage Ray Train reaches through pyarrow filesystems (besides local/shared paths).
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
RECIPES_DIR = os.path.join(os.path.dirname(__file__), "recipes")


def list_recipes() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))


def _section_types(section) -> dict[str, type]:
    import typing

    return typing.get_type_hints(type(section))


def _coerce(name: str, value, hint):
    """Check a YAML/CLI value against a field's type hint; ints are accepted for floats."""
    import typing

    args = typing.get_args(hint)
    allowed = [a for a in args if a is not type(None)] if args else [hint]
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name}: may not be null")
    for t in allowed:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
        if typing.get_origin(t) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if t is dict and isinstance(value, dict):
            return value
    want = " or ".join(getattr(t, "__name__", str(t)) for t in allowed) + (" or null" if type(None) in args else "")
    raise ConfigError(f"{name}: expected {want}, got {value!r}")


def apply_overrides(cfg: TrainConfig, values: dict[str, dict] | None = None, sets: list[str] | None = None) -> TrainConfig:
    """Apply a recipe-shaped dict, then `section.field=value` strings (values parsed as YAML)."""
    import yaml

    items = [(f"{s}.{k}", v) for s, sec in (values or {}).items() for k, v in (sec or {}).items()] \
        if values else []
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected section.field=value")
        key, raw = s.split("=", 1)
        items.append((key.strip(), yaml.safe_load(raw)))
    for key, value in items:
        section_name, _, field_name = key.partition(".")
        section = getattr(cfg, section_name, None)
        if section is None or section_name == "recipe" or not field_name:
            sections = [k for k in asdict(cfg) if k != "recipe"]
            raise ConfigError(f"{key}: unknown section; valid: {', '.join(sections)}")
        hints = _section_types(section)
        if field_name not in hints:
            raise ConfigError(f"{key}: unknown field; {section_name} has {', '.join(hints)}")
        setattr(section, field_name, _coerce(key, value, hints[field_name]))
    return cfg


def load_recipe(name_or_path: str, sets: list[str] | None = None) -> TrainConfig:
    """A named recipe (pipeline/recipes/<name>.yaml) or a YAML file, with `--set` overrides, validated."""
    import yaml

    path = name_or_path if name_or_path.endswith((".yaml", ".yml")) else os.path.join(RECIPES_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"recipe '{name_or_path}' not found; named recipes: {', '.join(list_recipes())}")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    name = os.path.splitext(os.path.basename(path))[0]
    cfg = apply_overrides(TrainConfig(recipe=name), values, sets)
    if cfg.ensemble.name is None:
        cfg.ensemble.name = f"ensemble-{name}"
    return cfg.validate()
