r"""Shard a raw image dataset into WebDataset tars (+ DALI index files and a manifest) with Ray.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/shard_dataset.py --source fashion-mnist --root /usr/share/datasets/fashion-mnist --out $PWD/shards
    python jobs/shard_dataset.py ...      # same, on a local Ray started for this process

Exit status: 0 done, 2 bad arguments or input (one-line error, nothing written), or a one-line error
after writing began: a full disk, object storage refusing or unreachable, another job writing the split or
having taken it over (finished shards are kept; the same command resumes).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir's copy

from pipeline.cli import add_dry_run, parser, settings_yaml  # noqa: E402
from pipeline.config import ConfigError, ShardConfig  # noqa: E402
from pipeline.shards.job import run  # noqa: E402
from pipeline.shards.plan import ShardJobError  # noqa: E402
from pipeline.shards.sources import SourceError  # noqa: E402
from pipeline.tracking import TrackingError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    d = ShardConfig()
    p = parser(__doc__)
    p.add_argument("--source", choices=["imagenet", "fashion-mnist", "fashion-mnist-scenes"], default=d.source,
                   help="dataset layout to read; fashion-mnist-scenes: the Fashion-MNIST files, each garment drawn "
                        "into a larger RGB scene at a random scale, aspect and position (the --scene-* flags)")
    p.add_argument("--root", default=d.root,
                   help="dataset root: the folder holding train/ and val/ (ImageNet) or the four IDX .gz files "
                        "(fashion-mnist, fashion-mnist-scenes)")
    p.add_argument("--out", default=d.out,
                   help="output folder or s3://bucket/prefix; shards go to OUT/<dataset>/<split>/ (absolute path when "
                        "submitted as a Ray job)")
    p.add_argument("--splits", default=",".join(d.splits), help="comma-separated splits to shard")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard, help="samples per tar")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sample -> shard shuffle")
    p.add_argument("--limit", type=int, default=d.limit,
                   help="keep only the first N samples of each split's shuffled order (demos); default: all")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="shards written concurrently (Ray tasks of 1 CPU); default: the cluster's CPUs")
    p.add_argument("--max-side", type=int, default=d.max_side,
                   help="resize images whose longer side exceeds PX (re-encodes them); default: off, original bytes")
    p.add_argument("--max-file-mb", type=int, default=d.max_file_mb,
                   help="skip input files larger than this many MiB unread (default: %(default)s)")
    p.add_argument("--max-megapixels", type=int, default=d.max_megapixels,
                   help="skip images whose header declares more pixels than this many million (a small file can "
                        "declare a huge image); with --max-side, JPEGs over it are downscaled while decoding "
                        "instead (default: %(default)s)")
    p.add_argument("--full-decode", action="store_true",
                   help="decode every image to validate it (default: header + end-marker check, full decode only "
                        "for suspicious files)")
    p.add_argument("--val-labels", default=d.val_labels,
                   help="Kaggle LOC_val_solution.csv for a flat val/; default: searched in and above --root")
    p.add_argument("--name", default=d.name, help="dataset folder name; default: the source (+ -max<PX>)")
    p.add_argument("--scene-canvas", type=int, default=d.scene_canvas, metavar="PX",
                   help="fashion-mnist-scenes: side of each square scene in px, 32-1024; default: 96")
    p.add_argument("--scene-scale", default=d.scene_scale, metavar="MIN,MAX",
                   help="fashion-mnist-scenes: the garment's side as a fraction of the scene's, drawn log-uniformly "
                        "from MIN to MAX (0 < MIN <= MAX <= 1); default: 0.25,0.9")
    p.add_argument("--scene-aspect", default=d.scene_aspect, metavar="MIN,MAX",
                   help="fashion-mnist-scenes: the garment's width/height stretch, drawn log-uniformly from MIN to "
                        "MAX (0.2-5); default: 0.75,1.333 (3/4 to 4/3)")
    p.add_argument("--scene-seed", type=int, default=d.scene_seed, metavar="N",
                   help="fashion-mnist-scenes: seed of the scenes' random draw (scale, position, colours, "
                        "background), apart from --seed, which shuffles samples into shards; default: 0")
    p.add_argument("--mlflow-uri", default=d.mlflow_uri,
                   help="MLflow tracking server to log the job to; default: $MLFLOW_TRACKING_URI, else not logged")
    p.add_argument("--experiment", default=d.experiment, help="MLflow experiment name")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing shards made with other settings (default: refuse, resume same settings)")
    add_dry_run(p, " and the output location")
    return p.parse_args(argv)


def dry_run(cfg: ShardConfig) -> int:
    """The checks a run makes before writing (settings, MLflow reachable, the source readable), then the
    resolved settings."""
    from dataclasses import asdict

    from pipeline.shards.sources import open_source
    from pipeline.tracking import require_server, resolve_uri

    cfg.validate()
    uri = resolve_uri(cfg.mlflow_uri)
    if uri:
        require_server(uri)
    open_source(cfg.source, cfg.root, cfg.val_labels, cfg.max_file_mb, cfg.max_megapixels, cfg.scene_settings())
    out = cfg.out if "://" in cfg.out else str(Path(cfg.out).resolve())
    print(settings_yaml({"shard": {**asdict(cfg), "out": out, "mlflow_uri": uri}}), end="")
    print(f"dry run: would write {out.rstrip('/')}/{cfg.dataset}/<split>/; nothing written, nothing logged to "
          f"MLflow ({uri or 'not logged: no tracking URI'}), no Ray task started")
    return 0


def scene_range(flag: str, text: str | None) -> list[float] | None:
    """MIN,MAX of a --scene-* flag as two numbers; ConfigError naming the flag otherwise."""
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",")]
    try:
        values = [float(t) for t in parts]
    except ValueError:
        values = []
    if len(values) != 2:
        raise ConfigError(f"{flag} {text!r}: expected two numbers MIN,MAX (e.g. {flag} 0.25,0.9)")
    return values


def main(args: argparse.Namespace) -> int:
    try:
        cfg = ShardConfig(source=args.source, root=args.root, out=args.out,
                          splits=[s.strip() for s in args.splits.split(",") if s.strip()],
                          samples_per_shard=args.samples_per_shard, seed=args.seed, limit=args.limit,
                          workers=args.workers, max_side=args.max_side, full_decode=args.full_decode,
                          max_file_mb=args.max_file_mb, max_megapixels=args.max_megapixels, overwrite=args.overwrite,
                          name=args.name, val_labels=args.val_labels, mlflow_uri=args.mlflow_uri,
                          experiment=args.experiment, scene_canvas=args.scene_canvas,
                          scene_scale=scene_range("--scene-scale", args.scene_scale),
                          scene_aspect=scene_range("--scene-aspect", args.scene_aspect), scene_seed=args.scene_seed)
    except ConfigError as e:
        print(f"shard_dataset: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            return dry_run(cfg)
        run(cfg)
    except (ConfigError, SourceError, ShardJobError, TrackingError) as e:
        print(f"shard_dataset: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the driver's own writes (job record, manifest): a full disk, a quota
        from pipeline.shards.job import os_error_advice

        where = f" ({e.filename})" if e.filename else ""
        print(f"shard_dataset: error: {e.strerror or e}{where}; finished shards are kept: {os_error_advice(e)}",
              file=sys.stderr)
        return 2
    where = f"{cfg.out.rstrip('/')}/{cfg.dataset}" if "://" in cfg.out else Path(cfg.out).resolve() / cfg.dataset
    print(f"shards written under {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
