"""api.py's model behind BentoML (1.4) instead of our own server, for benchmarks/serve_load.py.

The same checkpoint in the same backend (predictor.TorchPredictor: the frozen TorchScript graph, channels_last),
the same decoding, checks and preprocessing (upload.upload_bytes, upload.preprocess_upload) and the same answer
(api.postprocess); BentoML's adaptive batching (its CORK dispatcher) groups the requests of each worker process.
A batchable BentoML API takes a list per request, so a request is {"image_base64": ["..."]} and the answer a list
of one api.py answer. Settings, as BentoML's guides advise for a CPU model with adaptive batching: one worker per
core with the cores split among them for torch's threads, max_batch_size as api.py's CPU batch, concurrency equal to
the batch size, max_latency_ms as api.py's queue budget (BentoML answers 503 to requests that would wait past it).
It is the same work per image, not the same service: a bad image fails its whole batch with a 400.
serve_load.py sets them through the environment (BENTO_*), as BentoML reads the service's settings at import.

    BENTO_CHECKPOINT=models/cnn.pt bentoml serve benchmarks.bentoml_service:Classifier --port 8003
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, however this is started

import bentoml  # noqa: E402
import torch  # noqa: E402
from bentoml.exceptions import InvalidArgument  # noqa: E402

from api import postprocess  # noqa: E402
from predictor import TorchPredictor  # noqa: E402
from runtime import available_cores  # noqa: E402
from serve_config import ServeConfig  # noqa: E402
from upload import UploadError, preprocess_upload, upload_bytes  # noqa: E402

WORKERS = int(os.environ.get("BENTO_WORKERS", "0")) or available_cores()
MAX_BATCH_SIZE = int(os.environ.get("BENTO_MAX_BATCH_SIZE", "32"))
# 0 or unset: api.py's queue budget, from the same environment (CATER_QUEUE_BUDGET_MS, else its default)
MAX_LATENCY_MS = int(os.environ.get("BENTO_MAX_LATENCY_MS", "0")) or round(ServeConfig.from_env().queue_budget_ms)


@bentoml.service(workers=WORKERS, traffic={"timeout": 60, "concurrency": MAX_BATCH_SIZE},
                 logging={"access": {"enabled": False}})  # no access log, as api.py
class Classifier:
    def __init__(self):
        self.serve = ServeConfig.from_env()  # api.py's CATER_TOP_K, CATER_TTA, CATER_MAX_PIXELS: the same work
        torch.set_num_threads(max(1, available_cores() // WORKERS))
        self.predictor = TorchPredictor(os.environ.get("BENTO_CHECKPOINT", "models/cnn.pt"), torch.device("cpu"))
        self.meta = self.predictor.meta

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, image_base64: list[str]) -> list[dict]:
        try:
            images = torch.stack([preprocess_upload(upload_bytes(b), self.meta, self.serve.max_pixels)
                                  for b in image_base64])
        except UploadError as e:  # a 400 for every request of the batch, as LitServe does
            raise InvalidArgument(str(e)) from None
        probabilities = self.predictor.probabilities(images, self.serve.tta)
        return [postprocess(p, self.meta["classes"], self.serve.top_k, self.serve.tta,
                            self.serve.review_below).model_dump() for p in probabilities]
