r"""Evaluate a trained ensemble with the paper's multi-crop protocol and reproduce its Table 3 in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate_ensemble.py --ensemble-run latest --crops 1,10,144 --limit 500

--dry-run resolves the ensemble, images, crops and models (reading MLflow only), prints them, and exits.
Exit status: 0 done, 2 bad arguments or input (one-line error, before any evaluation work), 1 the
evaluation failed after its MLflow run was created (the run is marked FAILED, the error in its `error`
tag), 143 stopped by SIGTERM (`ray job stop`; a created run is marked KILLED).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir's copy

from pipeline.cli import add_dry_run, parser  # noqa: E402


def ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--ensemble-run", default="latest", help="the ensemble's MLflow parent run id, its name (e.g. ensemble-demo), or latest")
    p.add_argument("--split", default="val", help="split of the ensemble's shards to evaluate")
    p.add_argument("--crops", type=ints, default=[1, 10, 144], help="crop schemes (1, 10, 144) (default: 1,10,144)")
    p.add_argument("--models", type=ints, default=None, help="ensemble sizes (default: 1 and all finished replicas)")
    p.add_argument("--limit", type=int, default=None, help="at most N images, from --offset on (default: all)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="fit the evaluation into this many minutes: a warm-up measures images/s, then as many images "
                        "(of --limit) as fit are scored, never fewer than 2,000 (what a 7-vs-1 comparison needs; "
                        "too slow a machine is told so and scores those anyway); default: no budget")
    p.add_argument("--budget-min-images", type=int, default=2000,
                   help="the fewest images a budgeted evaluation scores (default: 2,000, the demo's 7-vs-1 floor)")
    p.add_argument("--offset", type=int, default=None,
                   help="first image evaluated (default: after the ensemble's training-time validation images, "
                        "data.limit_val, when evaluating its validation split; else 0)")
    p.add_argument("--single-model", default="0",
                   help="the '1 model' row: a replica index fixed in advance (0: the paper's base sampling), or "
                        "best-val: the lowest training-time validation error (needs images disjoint from those); "
                        "default: 0")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="run every crop through the models, even those identical to another crop of the image "
                        "(default: identical crops are computed once)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="channels_last memory format for the models (auto: on; measured faster on CPU as on GPU)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (x crops x models forward passes)")
    p.add_argument("--workers", type=workers_arg, default=1, metavar="N|auto",
                   help="Ray tasks sharing the images (each loads every model); auto: as many as the cluster's CPUs "
                        "(GPUs with --device gpu) and memory hold, each reserving a measured peak (default: 1)")
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto", help="DALI and model device")
    p.add_argument("--shards", default=None, help="shard folder (default: the ensemble's data.shards)")
    p.add_argument("--allow-other-shards", action="store_true",
                   help="score a validation split whose shards differ from those training validated on (by "
                        "digest), with a warning; refused without this flag")
    p.add_argument("--mlflow-uri", default=None, help="tracking server (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", default="inception-pipeline", help="MLflow experiment of the ensemble")
    add_dry_run(p, " (the ensemble, images, crops and models)")
    return p.parse_args(argv)


def workers_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def main(args: argparse.Namespace) -> int:
    from pipeline.evaluate.run import EvaluationError, run_evaluation
    from pipeline.tracking import JobStopped, TrackingError

    try:
        run_evaluation(args.ensemble_run, args.split, args.crops, args.models, args.limit, args.batch_size,
                       args.workers, args.device, args.shards, args.mlflow_uri, args.experiment,
                       single_model=args.single_model, offset=args.offset, dedup=args.dedup,
                       channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
                       allow_other_shards=args.allow_other_shards, dry_run=args.dry_run,
                       budget_minutes=args.budget_minutes, budget_min_images=args.budget_min_images)
    except (EvaluationError, TrackingError) as e:
        print(f"evaluate_ensemble: error: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:
        print(f"evaluate_ensemble: stopped by {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("evaluate_ensemble: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
