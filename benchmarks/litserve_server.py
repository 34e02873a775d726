"""api.py's model behind LitServe (Lightning AI) instead of our own server, for benchmarks/serve_load.py.

The same checkpoint in the same backend (predictor.TorchPredictor: the frozen TorchScript graph, channels_last),
the same decoding, checks and preprocessing (upload.upload_bytes, upload.preprocess_upload), the same answer
(api.postprocess) and the same request body ({"image_base64": ...}); LitServe's own dynamic batching
(max_batch_size, batch_timeout) groups the requests, and its inference worker process runs decoding and the
forward passes.

    python benchmarks/litserve_server.py --checkpoint models/cnn.pt --port 8002 --max-batch-size 32 --batch-timeout 0.005 --workers 2 --fast-queue
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, however this is started

import litserve as ls  # noqa: E402
import torch  # noqa: E402
from fastapi import HTTPException  # noqa: E402

from api import postprocess  # noqa: E402
from runtime import available_cores  # noqa: E402
from serve_config import ServeConfig  # noqa: E402
from predictor import TorchPredictor  # noqa: E402
from upload import UploadError, preprocess_upload, upload_bytes  # noqa: E402


class ClassifierAPI(ls.LitAPI):
    def __init__(self, checkpoint: str, serve: ServeConfig, max_batch_size: int, batch_timeout: float, threads: int):
        """serve: api.py's settings (CATER_TOP_K, CATER_TTA, CATER_MAX_PIXELS), so that both do the same work."""
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.checkpoint, self.serve, self.threads = checkpoint, serve, threads

    def setup(self, device):
        torch.set_num_threads(self.threads)  # the cores shared among the inference workers, as api.py sizes its own
        self.predictor = TorchPredictor(self.checkpoint, torch.device(device))
        self.meta = self.predictor.meta

    def decode_request(self, request):
        try:
            return preprocess_upload(upload_bytes(request["image_base64"]), self.meta, self.serve.max_pixels)
        except UploadError as e:
            raise HTTPException(e.status, str(e)) from None

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        return self.predictor.probabilities(x, self.serve.tta)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return postprocess(output, self.meta["classes"], self.serve.top_k, self.serve.tta,
                           self.serve.review_below).model_dump()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/cnn.pt")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds a batch waits to fill")
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes (workers_per_device)")
    parser.add_argument("--fast-queue", action="store_true", help="LitServer(fast_queue=True): ZeroMQ queues")
    args = parser.parse_args()
    api = ClassifierAPI(args.checkpoint, ServeConfig.from_env(), args.max_batch_size, args.batch_timeout,
                        max(1, available_cores() // args.workers))
    server = ls.LitServer(api, accelerator="cuda" if torch.cuda.is_available() else "cpu", devices=1,
                          workers_per_device=args.workers, fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")  # no access log, as api.py


if __name__ == "__main__":
    main()
