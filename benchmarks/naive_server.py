"""The common tutorial pattern, as the baseline of benchmarks/serve_load.py: one forward pass per request.

Same request contract as api.py's POST /predict, same checkpoint, device (CUDA when present) and
transforms.eval_transform, but a sync handler (FastAPI runs it in its thread pool) with one image per forward pass,
torch's default threads, no batching.

    python benchmarks/naive_server.py --checkpoint models/cnn.pt --port 8001
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, however this is started

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from transforms import eval_transform  # noqa: E402


class PredictRequest(BaseModel):
    image_base64: str
    top_k: int = 3


def create_app(checkpoint: str) -> FastAPI:
    state = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, meta = load_checkpoint(checkpoint, device)
        state.update(model=model, device=device, classes=meta["classes"],
                     transform=eval_transform(meta["image_size"], meta["mean"], meta["std"], meta["channels"], meta["resize"]))
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(request: PredictRequest):
        image = Image.open(io.BytesIO(base64.b64decode(request.image_base64)))
        x = state["transform"](image).unsqueeze(0).to(state["device"])
        with torch.no_grad():
            probs = torch.softmax(state["model"](x), dim=1)[0]
        values, indices = probs.topk(request.top_k)
        top = [{"class_index": i, "class_name": state["classes"][i], "confidence": v}
               for v, i in zip(values.tolist(), indices.tolist())]
        return {**top[0], "top_k": top}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/cnn.pt")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.checkpoint), host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
