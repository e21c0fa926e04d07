r"""Train the GoogLeNet ensemble (one replica per sampling strategy) on Ray, tracked in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_ensemble.py --recipe demo --set data.shards=$PWD/.run/shards/fashion-mnist
    python jobs/train_ensemble.py --recipe demo      # on a local Ray started for this process

Every recipe field can be overridden with --set section.field=value (repeatable) or the flags below.
Resubmitting the same recipe/name resumes each replica from its latest checkpoint; finished replicas
are not retrained; a resubmission that changes a setting that changes results (data, model, optim,
schedule, ensemble seed/init/replicas/workers, the shards' content) is refused, naming each field: set
another ensemble.name to start a new ensemble. --dry-run checks everything a run checks before
training, prints the resolved settings and the placement plan, and exits without writing to MLflow.

One driver per ensemble: a submission of an ensemble that another running job trains is refused,
naming that job (stop it, or wait, then submit again to resume).

Exit status: 0 done, 2 bad configuration or input, or another driver trains the ensemble (before any
training), 1 a replica failed, 143
stopped by SIGTERM (`ray job stop`; 130 for Ctrl-C): the parent and unfinished replica runs are marked
KILLED; resubmit to resume.
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir's copy

from pipeline.cli import add_dry_run, parser  # noqa: E402
from pipeline.config import ConfigError, TrainConfig, list_recipes, load_recipe  # noqa: E402
from pipeline.shards.format import ShardError  # noqa: E402
from pipeline.tracking import JobStopped, TrackingError  # noqa: E402


def recipe_fields() -> str:
    """Every field --set takes, by section."""
    sections = [f for f in fields(TrainConfig) if f.name != "recipe"]
    return "; ".join(f"{sec.name}.{{{', '.join(f.name for f in fields(sec.default_factory))}}}" for sec in sections)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--recipe", default="demo",
                   help=f"named recipe ({', '.join(list_recipes())}) or a YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field (repeatable), e.g. --set schedule.epochs=3. Fields: " + recipe_fields())
    p.add_argument("--replicas", type=int, default=None, help="ensemble.replicas (default: the recipe's)")
    p.add_argument("--workers-per-replica", type=int, default=None,
                   help="ensemble.workers_per_replica (default: the recipe's; the LR follows the global batch "
                        "when the recipe sets optim.reference_batch)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="ensemble.gpus_per_worker (default: the recipe's)")
    p.add_argument("--max-concurrent", default=None, metavar="N|auto",
                   help="ensemble.max_concurrent: replicas at once, or auto: as many as the cluster's CPUs, GPUs "
                        "and memory hold (default: the recipe's)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="ensemble.budget_minutes: train the whole ensemble in about this many minutes; a warm-up "
                        "measures the cluster and sizes data.limit_train (at most the recipe's, at least "
                        "ensemble.budget_min_images per replica); a resubmission keeps the first choice")
    p.add_argument("--profile", type=int, default=None, metavar="STEPS",
                   help="tracking.profile_steps: a torch profiler trace of this many training steps of replica "
                        "tracking.profile_replica (0 unless set), logged to its MLflow run as profile/trace.json")
    p.add_argument("--mlflow-uri", default=None, help="tracking.uri (default: $MLFLOW_TRACKING_URI)")
    add_dry_run(p, " and the placement plan on the cluster")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from pipeline.train.driverlock import EnsembleBusy
    from pipeline.train.ensemble import EnsembleError, PlacementError, run_ensemble

    flags = {"ensemble.replicas": args.replicas, "ensemble.workers_per_replica": args.workers_per_replica,
             "ensemble.gpus_per_worker": args.gpus_per_worker, "ensemble.max_concurrent": args.max_concurrent,
             "ensemble.budget_minutes": args.budget_minutes, "tracking.profile_steps": args.profile,
             "tracking.uri": args.mlflow_uri}
    sets = args.sets + [f"{k}={v}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_recipe(args.recipe, sets)
        run_ensemble(cfg, dry_run=args.dry_run)
    except (ConfigError, TrackingError, ShardError, PlacementError, EnsembleBusy) as e:
        print(f"train_ensemble: error: {e}", file=sys.stderr)
        return 2
    except EnsembleError as e:
        print(f"train_ensemble: {e}", file=sys.stderr)
        return 1
    except JobStopped as e:
        print(f"train_ensemble: stopped by {e}; resubmit the same command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("train_ensemble: interrupted; resubmit the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
