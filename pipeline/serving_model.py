"""The model code MLflow logs for the `googlenet-ensemble` pyfunc (MLflow's models-from-code): loading the
model runs this file, which names the model class, instead of unpickling a Python object. The weights
and settings are the model's artifacts (`ensemble/`), read by `EnsembleModel.load_context`; the
`pipeline` package travels with the model as its code."""

import mlflow.models

from pipeline.serving import EnsembleModel

mlflow.models.set_model(EnsembleModel())
