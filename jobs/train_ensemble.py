"""Train the GoogLeNet ensemble (one replica per sampling strategy) on Ray, tracked in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_ensemble.py --recipe demo --set data.shards=$PWD/.run/shards/fashion-mnist
    python jobs/train_ensemble.py --recipe demo      # on a local Ray started for this process

Every recipe field can be overridden with --set section.field=value (repeatable) or the flags below.
Resubmitting the same recipe/name resumes each replica from its latest checkpoint; finished replicas
are not retrained. Exit status: 0 done, 2 bad configuration or input (before any training), 1 a
replica failed.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir's copy

from pipeline.config import ConfigError, list_recipes, load_recipe  # noqa: E402
from pipeline.shards.format import ShardError  # noqa: E402
from pipeline.tracking import TrackingError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default="demo",
                   help=f"named recipe ({', '.join(list_recipes())}) or a YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field (repeatable), e.g. --set schedule.epochs=3")
    p.add_argument("--replicas", type=int, default=None, help="ensemble.replicas (default: the recipe's, 7)")
    p.add_argument("--workers-per-replica", type=int, default=None, help="ensemble.workers_per_replica (default: recipe's)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="ensemble.gpus_per_worker (default: recipe's)")
    p.add_argument("--max-concurrent", type=int, default=None, help="ensemble.max_concurrent (default: recipe's)")
    p.add_argument("--mlflow-uri", default=None, help="tracking.uri (default: $MLFLOW_TRACKING_URI)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from pipeline.train.ensemble import EnsembleError, run_ensemble

    flags = {"ensemble.replicas": args.replicas, "ensemble.workers_per_replica": args.workers_per_replica,
             "ensemble.gpus_per_worker": args.gpus_per_worker, "ensemble.max_concurrent": args.max_concurrent,
             "tracking.uri": args.mlflow_uri}
    sets = args.sets + [f"{k}={v}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_recipe(args.recipe, sets)
        run_ensemble(cfg)
    except (ConfigError, TrackingError, ShardError) as e:
        print(f"train_ensemble: error: {e}", file=sys.stderr)
        return 2
    except EnsembleError as e:
        print(f"train_ensemble: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
