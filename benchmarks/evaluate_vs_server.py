"""Does `make evaluate` score what the server answers? The same labelled folder through both, side by side.

1. `python evaluate.py --data-dir <folder> --model <checkpoint> --no-mlflow`, a real process: its metrics.json and
   predictions.csv (the report is kept in <logs>/evaluate-report/).
2. `python api.py` serving the same checkpoint on a free port, sent every image of the folder as one /predict
   request (16 at a time); each answer compared with the label (by class name) and with evaluate's answer.
Prints both accuracies and ECEs, their difference in points, and how many images got a different class or a
confidence more than 1e-4 apart.

    python benchmarks/evaluate_vs_server.py --data-dir /data/fashion-split --checkpoint models/cnn.pt
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import torch  # noqa: E402

from calibration import expected_calibration_error  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from evaluate import labelled_files  # noqa: E402
from machine import markdown_table  # noqa: E402
from serve_load import PORT, Server, start, stop  # noqa: E402


def run_evaluate(folder: Path, checkpoint: Path, out: Path) -> tuple[dict, dict[str, dict]]:
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--data-dir", str(folder), "--model", str(checkpoint),
                    "--out-dir", str(out), "--no-mlflow", "--tta", "0"], cwd=REPO, check=True)
    with open(out / "predictions.csv", newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    return json.loads((out / "metrics.json").read_text()), rows


def ask_server(checkpoint: Path, root: Path, paths: list[str], logs: Path) -> dict[str, dict]:
    """path (under root) -> the /predict answer."""
    env = {"CATER_MODEL_PATH": str(checkpoint), "CATER_PORT": PORT, "CATER_HOST": "127.0.0.1", "CATER_TTA": "0"}
    proc, base = start(Server("api", [sys.executable, str(REPO / "api.py")], env, "/ready", "/predict", "base64"),
                       logs / "evaluate_vs_server_api.log", timeout=180)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            def answer(path: str) -> dict:
                image = base64.b64encode((root / path).read_bytes()).decode()
                for _ in range(10):  # a 503 (the queue is full) says when to come back
                    r = client.post("/predict", json={"image_base64": image})
                    if r.status_code != 503:
                        break
                    time.sleep(float(r.headers.get("Retry-After", 1)))
                r.raise_for_status()
                return r.json()

            with ThreadPoolExecutor(16) as pool:
                return dict(zip(paths, pool.map(answer, paths)))
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="a labelled folder, as make evaluate takes it")
    parser.add_argument("--checkpoint", default="models/cnn.pt")
    parser.add_argument("--logs", default="bench-results", help="folder for the server's log")
    args = parser.parse_args(argv)
    checkpoint, logs = Path(args.checkpoint).resolve(), Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    metrics, rows = run_evaluate(Path(args.data_dir), checkpoint, logs / "evaluate-report")
    classes = load_checkpoint(checkpoint)[1]["classes"]
    folder = labelled_files(Path(args.data_dir), classes)[0]  # the folder evaluate scored (its test/, or itself)
    answers = ask_server(checkpoint, folder, sorted(rows), logs)
    right = torch.tensor([answers[p]["class_name"] == rows[p]["true"] for p in sorted(rows)])
    confidence = torch.tensor([answers[p]["confidence"] for p in sorted(rows)])
    other_class = sum(answers[p]["class_name"] != rows[p]["predicted"] for p in rows)
    other_confidence = sum(abs(answers[p]["confidence"] - float(rows[p]["confidence"])) > 1e-4 for p in rows)
    served_acc, served_ece = float(right.double().mean()), expected_calibration_error(confidence, right)
    print(markdown_table([
        ["how", "images", "accuracy", "ECE"],
        ["make evaluate", str(metrics["n"]), f"{metrics['accuracy']:.4f}", f"{metrics['ece']:.4f}"],
        ["api.py /predict, one request per image", str(len(answers)), f"{served_acc:.4f}", f"{served_ece:.4f}"],
    ]))
    print(f"accuracy difference: {100 * abs(served_acc - metrics['accuracy']):.2f} points; images answered with "
          f"another class: {other_class}, with a confidence more than 1e-4 apart: {other_confidence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
