"""Typed, validated configs. Validation raises ConfigError naming the field, before any work starts."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field


class ConfigError(ValueError):
    pass


@dataclass
class ShardConfig:
    """Settings of the shard job (jobs/shard_dataset.py); the README's reference lists each one."""

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
    overwrite: bool = False
    name: str | None = None  # dataset folder name; default: source (+ "-max<N>" when resizing)
    val_labels: str | None = None
    mlflow_uri: str | None = None  # None: MLFLOW_TRACKING_URI if set, else not logged
    experiment: str = "inception-pipeline"

    def validate(self) -> ShardConfig:
        from pipeline.data.sources import SOURCES

        if self.source not in SOURCES:
            raise ConfigError(f"source: '{self.source}' is not one of {sorted(SOURCES)}")
        if not self.splits or any(not s or "/" in s for s in self.splits):
            raise ConfigError(f"splits: expected a comma-separated list like train,val, got {self.splits}")
        if len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"splits: {self.splits} lists a split twice")
        for name in ("samples_per_shard", "limit", "workers", "max_side"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if self.max_side is not None and self.max_side < 16:
            raise ConfigError(f"max_side: {self.max_side} px is too small to train on (minimum 16)")
        if self.name is not None and (not self.name or "/" in self.name or "." in self.name):
            raise ConfigError(f"name: '{self.name}' must be a plain folder name without '/' or '.'")
        if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and not os.path.isabs(self.out):
            # A submitted job runs in a temporary copy of --working-dir: a relative --out would
            # write the shards there and they would vanish with it.
            raise ConfigError(f"out: '{self.out}' is relative; inside a Ray job use an absolute path")
        return self

    @property
    def dataset(self) -> str:
        if self.name:
            return self.name
        return self.source + (f"-max{self.max_side}" if self.max_side else "")

    def fingerprint(self) -> dict:
        """What must match for an existing output to be resumed instead of refused."""
        return {k: v for k, v in asdict(self).items()
                if k in ("source", "samples_per_shard", "seed", "limit", "max_side", "full_decode")}
