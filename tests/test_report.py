"""report.py: a run's page and several runs' curves, from real MLflow runs that train.py logged."""

import numpy as np
import pytest

import report
import train
from checkpoint import load_checkpoint
from conftest import fresh_store


@pytest.fixture
def runs(cifar_dir, tmp_path, monkeypatch, mlflow_tables):
    """Two short runs in a fresh tracking store; returns their run ids, oldest first."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(mlflow_tables, tmp_path))
    monkeypatch.chdir(tmp_path)
    ids = []
    for lr in ("11.5", "3"):
        out = tmp_path / f"lr{lr}.pt"
        assert train.main(["--data-dir", str(cifar_dir), "--epochs", "2", "--batch-size", "64", "--out", str(out),
                           "--tta", "0", "--lr", lr, "--no-register", "--run-name", f"lr-{lr}"]) == 0
        ids.append(load_checkpoint(out)[1]["mlflow_run_id"])
    return ids


@pytest.mark.full
def test_report_of_the_latest_run_and_a_comparison(runs, tmp_path, capsys):
    assert report.main(["--out", str(tmp_path / "reports")]) == 0
    folder = tmp_path / "reports" / runs[-1]  # the latest run by default
    page = (folder / "index.html").read_text()
    assert "Run lr-3" in page and "Loss and accuracy per epoch" in page and "most confidently wrong" in page.lower()
    assert "<th>batch_size</th><td>64</td>" in page and "<th>val_acc</th>" in page
    for picture in ("curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png", "per_class.png",
                    "mistakes.png"):
        assert (folder / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
        assert f'src="{picture}"' in page
    assert str(folder / "index.html") in capsys.readouterr().out

    assert report.main(["--run", runs[0], "--out", str(tmp_path / "reports")]) == 0
    assert "Run lr-11.5" in (tmp_path / "reports" / runs[0] / "index.html").read_text()

    assert report.main(["--compare", *runs, "--out", str(tmp_path / "reports")]) == 0
    compared = next((tmp_path / "reports").glob("compare-*"))
    assert (compared / "comparison.png").stat().st_size > 10_000
    assert all(run_id in (compared / "index.html").read_text() for run_id in runs)


def test_unknown_run_or_empty_store_is_a_clear_error(tmp_path, monkeypatch, capsys, mlflow_tables):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(mlflow_tables, tmp_path))
    assert report.main(["--out", str(tmp_path)]) == 2
    assert "no runs in experiment" in capsys.readouterr().err
    assert report.main(["--run", "abc123", "--out", str(tmp_path)]) == 2
    assert "no run 'abc123'" in capsys.readouterr().err


def test_mistakes_grid_takes_grey_colour_and_none(tmp_path):
    grey, colour = np.zeros((28, 28), np.uint8), np.zeros((32, 32, 3), np.uint8)
    report.plot_mistakes([grey, colour], ["a", "b"], ["b", "a"], [0.9, 0.8], tmp_path / "two.png")
    report.plot_mistakes([], [], [], [], tmp_path / "none.png")
    assert (tmp_path / "two.png").stat().st_size > 0 and (tmp_path / "none.png").stat().st_size > 0
