"""predict.py over a folder: every file a row, broken files reported and skipped, the server's predictions."""

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from conftest import tiny_checkpoint
from predictor import TorchPredictor
from transforms import pil_to_uint8

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["crack", "ok", "scratch"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("predict-ckpt") / "cnn.pt", CLASSES)


def image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Good images at three depths and in three formats, a truncated PNG, a text file, an empty file, hidden junk."""
    root = tmp_path / "incoming"
    (root / "line1" / "cam2").mkdir(parents=True)
    image(0).save(root / "a.png")
    image(1, mode="L").save(root / "line1" / "b.jpg")
    image(2, (300, 200)).save(root / "line1" / "cam2" / "c.webp")
    buf = io.BytesIO()
    image(3).save(buf, "PNG")
    (root / "line1" / "broken.png").write_bytes(buf.getvalue()[:200])
    (root / "notes.txt").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")
    (root / ".DS_Store").write_bytes(b"junk")
    return root


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_every_file_gets_a_row_with_the_servers_answer_or_why_not(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    assert predict.main(["--data-dir", str(folder), "--model", str(checkpoint), "--out", str(out),
                         "--review-below", "0.4", "--device", "cpu"]) == 0
    rows = read_rows(out)
    assert sorted(rows) == ["a.png", "empty.jpg", "line1/b.jpg", "line1/broken.png", "line1/cam2/c.webp", "notes.txt"]
    assert re.search(r"3 images classified in [\d.]+ s \(\d+ images/s\), 3 files could not be read",
                     capsys.readouterr().out)
    for name in ("line1/broken.png", "notes.txt", "empty.jpg"):
        assert rows[name]["error"] and rows[name]["class_name"] == ""
    served = TorchPredictor(checkpoint, torch.device("cpu"))
    for name in ("a.png", "line1/b.jpg", "line1/cam2/c.webp"):
        row = rows[name]
        expected = served.probabilities(pil_to_uint8(Image.open(folder / name), 32).unsqueeze(0), 0)[0]
        probs = torch.tensor([float(row[f"p_{c}"]) for c in CLASSES])
        assert torch.allclose(probs, expected, atol=1e-5) and row["error"] == ""
        assert row["class_name"] == CLASSES[int(expected.argmax())] == row["top1_class"]
        assert int(row["class_index"]) == int(expected.argmax())
        assert float(row["confidence"]) == pytest.approx(float(expected.max()), abs=1e-5)
        assert row["review"] == str(float(expected.max()) < 0.4).lower()


def test_no_readable_image_is_an_error_and_bad_flags_name_themselves(checkpoint, tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "p.csv"
    assert predict.main(["--data-dir", str(tmp_path / "junk"), "--model", str(checkpoint), "--out", str(out)]) == 1
    assert "no image" in capsys.readouterr().err and len(read_rows(out)) == 1
    assert predict.main(["--data-dir", str(tmp_path / "junk"), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "--model" in capsys.readouterr().err
    for argv, flag in ((["--data-dir", str(tmp_path / "nothere")], "--data-dir"),
                       (["--data-dir", str(tmp_path), "--review-below", "2"], "--review-below")):
        with pytest.raises(SystemExit):
            predict.main(argv + ["--model", str(checkpoint)])
        assert flag in capsys.readouterr().err


def test_make_predict_runs_as_a_real_process_under_1024_open_files(checkpoint, folder, tmp_path):
    """Many more files than open-file slots: they are streamed, never held open together."""
    for i in range(1100):
        image(10 + i % 7, (16, 16)).save(folder / f"many{i:04}.png")
    out = tmp_path / "preds.csv"
    done = subprocess.run(["bash", "-c", f"ulimit -n 1024 && make -s predict DATA_DIR={folder} MODEL={checkpoint} "
                                         f"OUT={out} PYTHON={sys.executable} VENV={Path(sys.executable).parents[1]}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 1106 and sum(1 for r in rows.values() if r["error"]) == 3


def test_an_onnx_export_predicts_as_its_checkpoint(checkpoint, folder, tmp_path):
    """With a calibration temperature (3), which both must apply."""
    import export
    from checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(checkpoint)
    calibrated = save_checkpoint(tmp_path / "calibrated.pt", model, model_config=model.cfg, classes=meta["classes"],
                                 mean=meta["mean"], std=meta["std"], image_size=32, metrics={}, temperature=3.0)
    onnx_path = export.export(calibrated, ["onnx"], tmp_path)["onnx"]
    for model_path, out in ((calibrated, "pt.csv"), (onnx_path, "onnx.csv")):
        assert predict.main(["--data-dir", str(folder), "--model", str(model_path), "--out", str(tmp_path / out),
                             "--device", "cpu"]) == 0
    from_pt, from_onnx = read_rows(tmp_path / "pt.csv"), read_rows(tmp_path / "onnx.csv")
    assert from_pt.keys() == from_onnx.keys()
    for name, row in from_pt.items():
        assert from_onnx[name]["class_name"] == row["class_name"] and from_onnx[name]["error"] == row["error"]
        if not row["error"]:
            assert float(from_onnx[name]["confidence"]) == pytest.approx(float(row["confidence"]), abs=1e-4)


def test_the_defaults_are_what_make_serve_would_do(checkpoint, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CATER_MODEL_PATH", str(checkpoint))
    monkeypatch.setenv("CATER_REVIEW_BELOW", "1.0")
    assert predict.main(["--data-dir", str(folder), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    rows = [r for r in read_rows(tmp_path / "p.csv").values() if not r["error"]]
    assert len(rows) == 3 and all(r["review"] == "true" for r in rows)
    monkeypatch.setenv("CATER_TTA", "7")
    with pytest.raises(SystemExit):
        predict.main(["--data-dir", str(folder)])
    assert "CATER_TTA" in capsys.readouterr().err
