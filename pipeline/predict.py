"""Classify image files with the registered ensemble, without a server.

    python -m pipeline.predict cat.jpg dog.png --model models:/googlenet-ensemble@latest-complete --crops 10

Prints the top-k classes with their probabilities for each file. The model is any MLflow model URI of
the `googlenet-ensemble` pyfunc (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN/ensemble`, a
local folder); `models:/` and `runs:/` need the tracking server (MLFLOW_TRACKING_URI or --mlflow-uri).
Each file is answered on its own: one that cannot be read or is not a usable image is reported, the
others are still answered, and the exit status is 1. A model that cannot be loaded: exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.serving import CROPS, LATEST_ALIAS
from pipeline.shards.sources import IMAGE_FORMATS
from pipeline.tracking import ENSEMBLE_MODEL

DEFAULT_MODEL = f"models:/{ENSEMBLE_MODEL}@{LATEST_ALIAS}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help=f"image files ({', '.join(IMAGE_FORMATS)}; other formats are refused, named)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"MLflow model URI (default {DEFAULT_MODEL})")
    p.add_argument("--crops", type=int, default=10, choices=CROPS, help="crops per image (default 10)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--mlflow-uri", default=None, help="tracking server for models:/ and runs:/ URIs "
                                                      "(default: MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top-k: at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import mlflow
    import pandas as pd

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.model.startswith(("models:/", "runs:/")):
        if not uri:
            print(f"error: {args.model} needs the MLflow tracking server: set MLFLOW_TRACKING_URI or --mlflow-uri",
                  file=sys.stderr)
            return 2
        mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as e:  # not found, no such alias, server down: one line, not a traceback
        print(f"error: cannot load {args.model}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}",
              file=sys.stderr)
        return 2
    failed = 0
    for path in args.images:
        try:
            with open(path, "rb") as f:
                data = f.read()
            out = model.predict(pd.DataFrame({"image": [data]}), params={"crops": args.crops, "top_k": args.top_k})
        except Exception as e:  # unreadable, or refused by the model (named why)
            reason = str(e).split(": ", 1)[-1] if "refused, none answered" in str(e) else str(e)
            print(f"{path}: not answered: {reason.removeprefix('row 0: ')}", file=sys.stderr, flush=True)
            failed += 1
            continue
        row = out.iloc[0]
        print(f"{path}: {row['label']}")
        for label, prob in zip(row["top_k_labels"], row["top_k_probs"], strict=True):
            print(f"  {prob:7.2%}  {label}")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
