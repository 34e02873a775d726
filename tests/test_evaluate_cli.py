"""evaluate.py's CLI (make evaluate): a model scored on a labelled folder through the serving path, its report, the
labels matched by class name, the folder errors, and the MLflow run with mlflow.models.evaluate's metrics."""

import base64
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import predict
from config import ModelConfig
from conftest import class_image, free_port, fresh_store, tiny_checkpoint
from model import CnnClassifier
from scores import class_scores

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["crack", "ok", "scratch"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("evaluate-ckpt") / "cnn.pt", CLASSES)


def labelled(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """root/<class>/ with counts[class] 16 px PNGs, every third one a folder deeper; returns root."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        for i in range(count):
            folder = root / name / ("day2" if i % 3 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = class_image(CLASSES.index(name) if name in CLASSES else i, rng, size=16)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 images of each class and one truncated PNG in ok/."""
    root = labelled(tmp_path_factory.mktemp("evaluate-data") / "parts", {name: 12 for name in CLASSES})
    (root / "ok" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(argv: list[str]) -> int:
    return evaluate.main([*argv, "--device", "cpu"])


def test_report_of_a_labelled_folder_agrees_with_predict_and_the_server(checkpoint, folder, tmp_path, capsys):
    from fastapi.testclient import TestClient

    import api
    from serve_config import ServeConfig

    out = tmp_path / "report"
    assert run(["--data-dir", str(folder), "--model", str(checkpoint), "--out-dir", str(out), "--no-mlflow"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip().splitlines()[-1].startswith(f"report: {out / 'index.html'}")
    assert "ok/broken.png" in printed.err and "1 unreadable" in printed.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 36 and metrics["unreadable"] == 1
    assert {"accuracy", "macro_f1", "ece", "n"} <= set(metrics) and 0 <= metrics["ece"] <= 1
    assert [metrics["per_class"][c]["support"] for c in CLASSES] == [12, 12, 12]
    # The headline numbers are scores.class_scores of the confusion matrix of the answers listed per image.
    rows = read_csv(out / "predictions.csv")
    confusion = torch.zeros(3, 3, dtype=torch.long)
    for row in rows:
        confusion[CLASSES.index(row["true"]), CLASSES.index(row["predicted"])] += 1
    expected = class_scores(confusion)
    assert len(rows) == 36 and metrics["confusion"] == confusion.tolist()
    assert metrics["accuracy"] == expected["acc"] and metrics["macro_f1"] == expected["macro_f1"]
    page = (out / "index.html").read_text()
    assert all(f"<td>{c}</td>" in page for c in CLASSES) and "ok/broken.png" in page and "ECE" in page
    for picture in ("confusion_matrix.png", "confusion_matrix_normalized.png", "reliability.png", "coverage.png",
                    "mistakes.png", "mistakes_why.png", "label_issues.png"):
        assert (out / picture).stat().st_size > 1000 and f'src="{picture}"' in page
    issues = read_csv(out / "label_issues.csv")  # cleanlab on these answers: every row a scored file, ranked
    assert "Likely label errors" in page and [int(r["rank"]) for r in issues] == list(range(1, len(issues) + 1))
    assert {r["path"] for r in issues} <= {r["path"] for r in rows}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind

    # The same answers as make predict's CSV and as api.py's /predict on each file.
    assert predict.main(["--data-dir", str(folder), "--model", str(checkpoint), "--out", str(tmp_path / "p.csv"),
                         "--device", "cpu"]) == 0
    answered = [r for r in read_csv(tmp_path / "p.csv") if not r["error"]]
    assert {r["path"]: r["predicted"] for r in rows} == {r["path"]: r["class_name"] for r in answered}
    right = sum(r["class_name"] == Path(r["path"]).parts[0] for r in answered)
    assert metrics["accuracy"] == right / len(answered)
    config = ServeConfig(model_path=str(checkpoint), device="cpu", threads=torch.get_num_threads())
    with TestClient(api.create_app(config)) as client:
        served = [client.post("/predict", json={"image_base64": base64.b64encode((folder / r["path"]).read_bytes())
                                                .decode()}).json()["class_name"] for r in answered]
    assert served == [r["class_name"] for r in answered]


@pytest.mark.full
def test_make_evaluate_in_a_real_process(checkpoint, folder, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "evaluate.py", "--data-dir", str(folder), "--model", str(checkpoint),
                           "--out-dir", str(out), "--no-mlflow", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith(f"report: {out / 'index.html'}")
    assert "accuracy" in done.stdout and "macro-F1" in done.stdout and "scratch" in done.stdout
    assert json.loads((out / "metrics.json").read_text())["n"] == 36
    make = subprocess.run(["make", "-n", "evaluate", f"DATA_DIR={folder}", f"MODEL={checkpoint}", f"OUT={out}",
                           "ARGS=--no-mlflow"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert (f"evaluate.py --data-dir {folder} --model {checkpoint} --out-dir {out} --no-mlflow"
            in make.stdout), make.stdout + make.stderr


def test_labels_are_matched_by_class_name_not_folder_order(tmp_path, capsys):
    """Model classes in a non-alphabetical order; the folder has two of them, with different counts."""
    model_classes = ["scratch", "ok", "crack"]
    checkpoint = tiny_checkpoint(tmp_path / "other.pt", model_classes)
    folder = labelled(tmp_path / "subset", {"crack": 5, "scratch": 9}, seed=3)
    out = tmp_path / "report"
    assert run(["--data-dir", str(folder), "--model", str(checkpoint), "--out-dir", str(out), "--no-mlflow"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == model_classes
    assert {c: metrics["per_class"][c]["support"] for c in model_classes} == {"scratch": 9, "ok": 0, "crack": 5}
    assert predict.main(["--data-dir", str(folder), "--model", str(checkpoint), "--out", str(tmp_path / "p.csv"),
                         "--device", "cpu"]) == 0
    rows = read_csv(tmp_path / "p.csv")
    assert metrics["accuracy"] == sum(r["class_name"] == Path(r["path"]).parts[0] for r in rows) / 14
    assert "ok" in capsys.readouterr().out  # the class without images is still in the table


def test_an_unknown_class_folder_is_named(checkpoint, tmp_path, capsys):
    folder = labelled(tmp_path / "data", {"crack": 2, "ok": 2, "dent": 2, "Scratch": 1})
    assert run(["--data-dir", str(folder), "--model", str(checkpoint), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "dent" in err and "Scratch" in err and "crack, ok, scratch" in err and "--data-dir" in err
    assert not (tmp_path / "r").exists()


def test_a_test_subfolder_is_scored_when_there_is_one(checkpoint, tmp_path, capsys):
    root = tmp_path / "dataset"
    labelled(root / "train", {name: 4 for name in CLASSES})
    labelled(root / "test", {"crack": 2, "ok": 3, "scratch": 1})
    assert run(["--data-dir", str(root), "--model", str(checkpoint), "--out-dir", str(tmp_path / "r"),
                "--no-mlflow"]) == 0
    assert f"scoring {root / 'test'}: the test split" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["n"] == 6 and [metrics["per_class"][c]["support"] for c in CLASSES] == [2, 3, 1]


def test_folder_and_flag_errors(checkpoint, tmp_path, capsys):
    (tmp_path / "empty" / "crack").mkdir(parents=True)
    assert run(["--data-dir", str(tmp_path / "empty"), "--model", str(checkpoint)]) == 2
    assert "no images" in capsys.readouterr().err
    (tmp_path / "junk" / "ok").mkdir(parents=True)
    (tmp_path / "junk" / "ok" / "x.png").write_bytes(b"\x89PNG broken")
    assert run(["--data-dir", str(tmp_path / "junk"), "--model", str(checkpoint),
                "--out-dir", str(tmp_path / "r")]) == 1
    assert "no image" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert run(["--data-dir", str(tmp_path / "junk"), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "--model" in capsys.readouterr().err
    for argv, flag in (([], "--data-dir"), (["--data-dir", str(tmp_path / "nothere")], "--data-dir"),
                       (["--data-dir", str(tmp_path), "--tta", "5"], "--tta")):
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(argv + ["--model", str(checkpoint)])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.full
def test_the_mlflow_run_holds_mlflows_evaluation_our_metrics_tags_and_report(checkpoint, folder, tmp_path,
                                                                              monkeypatch, capsys, mlflow_tables):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the sqlite store keeps its artifacts under ./mlruns
    uri = fresh_store(mlflow_tables, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert run(["--data-dir", str(folder), "--model", str(checkpoint), "--out-dir", "report"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("report: report/index.html") and "mlflow run" in out
    client = mlflow.MlflowClient(uri)
    (run_,) = client.search_runs([client.get_experiment_by_name("cater-evaluate").experiment_id])
    metrics, tags = run_.data.metrics, run_.data.tags
    ours = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(ours["accuracy"]) and metrics["n"] == 36 and metrics["unreadable"] == 1
    assert metrics["macro_f1"] == pytest.approx(ours["macro_f1"]) and metrics["ece"] == pytest.approx(ours["ece"])
    assert {f"f1_{c}" for c in CLASSES} <= set(metrics)
    # mlflow.models.evaluate's own numbers, over the model's classes, agree with scores.class_scores
    assert metrics["accuracy_score"] == pytest.approx(ours["accuracy"])
    assert metrics["f1_score"] == pytest.approx(ours["macro_f1"]) and metrics["example_count"] == 36
    assert tags["model"] == str(checkpoint) and tags["model_run_id"] == "run123" and tags["tta"] == "0"
    assert tags["data_dir"] == str(folder)
    logged = {a.path for a in client.list_artifacts(run_.info.run_id, "report")}
    assert {"report/index.html", "report/metrics.json", "report/reliability.png"} <= logged
    # A tracking server that does not answer: a warning, and the report all the same.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert run(["--data-dir", str(folder), "--model", str(checkpoint), "--out-dir", "report2"]) == 0
    printed = capsys.readouterr()
    assert "warning: no MLflow run" in printed.err and (tmp_path / "report2" / "index.html").exists()


def test_score_is_class_scores_of_the_answers_plus_calibration():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    result = evaluate.score(probs, labels, CLASSES)
    confusion = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    expected = class_scores(confusion)
    assert torch.equal(result["confusion"], confusion) and result["n"] == 5
    assert result["accuracy"] == expected["acc"] == 0.6 and result["macro_f1"] == expected["macro_f1"]
    assert result["predicted"].tolist() == [0, 1, 0, 2, 1] and evaluate.worst_mistakes(result) == [2, 4]
    assert result["coverage"][0] == {"review_below": 0.0, "coverage": 1.0, "accuracy": 0.6, "reviewed": 0}
    assert result["coverage"][1]["coverage"] == 0.8 and result["coverage"][1]["accuracy"] == 0.75  # p = 0.5
    assert sum(b["n"] for b in result["reliability"]) == 5 and 0 < result["ece"] < 1


def test_evaluation_batches_are_small_on_a_cpu_and_large_on_a_gpu():
    net, backbone = CnnClassifier(ModelConfig(), 10), torch.nn.Conv2d(3, 8, 3)  # a timm backbone is "not ours"
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [evaluate.eval_batch_size(net, 32, d) for d in (cpu, gpu)] == [100, 1000]
    assert [evaluate.eval_batch_size(backbone, 224, d) for d in (cpu, gpu)] == [8, 32]
    assert [evaluate.eval_batch_size(backbone, 512, d) for d in (cpu, gpu)] == [4, 8]  # never fewer
