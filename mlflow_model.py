"""The MLflow model train.py logs: image files in (base64), class names and probabilities out.

Logged as a pyfunc "model from code" (this file, no pickled objects) with the self-describing checkpoint as its
artifact, so `mlflow models serve -m models:/<name>@champion` answers image requests with the same preprocessing as
training and api.py (transforms.pil_to_uint8 with the checkpoint's size, channels and resize policy):

    curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"]]}}'
    -> {"predictions": [{"class_index": 3, "class_name": "cat", "confidence": 0.61, "probabilities": [...]}]}

Each row's "image" is a base64-encoded PNG, JPEG, BMP, GIF or WebP file (a data:image/...;base64, prefix is
accepted). A bad row fails the request with a 400 naming the row.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from predictor import TorchPredictor
from upload import UploadError, preprocess_upload, upload_bytes

MAX_PIXELS = 16_000_000  # as api.py's default CATER_MAX_PIXELS


def decode_row(i: int, text: str, meta: dict) -> torch.Tensor:
    """One base64 image -> CxHxW uint8 as the checkpoint wants it, checked as api.py checks uploads; a clear 400
    naming the row for anything else."""
    if not isinstance(text, str) or not text:
        raise bad_row(i, "'image' must be a non-empty base64 string")
    try:
        return preprocess_upload(upload_bytes(text), meta, MAX_PIXELS)
    except UploadError as e:
        raise bad_row(i, str(e)) from None


def bad_row(i: int, why: str) -> MlflowException:
    return MlflowException(f"row {i}: {why}", error_code=INVALID_PARAMETER_VALUE)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = TorchPredictor(context.artifacts["checkpoint"], torch.device("cpu"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        meta = self.predictor.meta
        if "image" not in model_input:
            raise MlflowException("the input needs an 'image' column of base64-encoded image files",
                                  error_code=INVALID_PARAMETER_VALUE)
        images = [decode_row(i, text, meta) for i, text in enumerate(model_input["image"].tolist())]
        if not images:
            return pd.DataFrame(columns=["class_index", "class_name", "confidence", "probabilities"])
        probs = self.predictor.probabilities(torch.stack(images), tta=0)
        confidence, index = probs.max(dim=1)
        return pd.DataFrame({"class_index": index.tolist(), "class_name": [meta["classes"][i] for i in index.tolist()],
                             "confidence": confidence.tolist(), "probabilities": probs.tolist()})


mlflow.models.set_model(ImageClassifier())
