"""The data checks on real Fashion-MNIST images (../shared) with planted problems: make check-data's findings, the
split that keeps copies on one side, the warnings before training, and cleanlab's likely label errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datacheck
from benchmarks.data_checks import SHARED, build_folder, duplicate_recall, flip_labels
from config import DataConfig
from conftest import fresh_store
from data import load_dataset
from fingerprint import near_pairs

REPO = Path(__file__).resolve().parents[1]
needs_images = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the real images in {SHARED}")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 real images per class (a tenth in test/), 50 planted copies of 5 kinds (same class, another class, test/),
    a broken file, a tiny and a tall image, and a class of 3 images."""
    folder = tmp_path_factory.mktemp("check") / "fmnist"
    copies = build_folder(SHARED, folder, per_class=40, copies=50)
    (folder / "train" / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
    Image.new("L", (8, 8), 128).save(folder / "train" / "coat" / "tiny.png")
    Image.new("L", (20, 200), 90).save(folder / "train" / "coat" / "tall.png")
    (folder / "train" / "rare").mkdir()
    for i, path in enumerate(sorted((SHARED / "sandal").iterdir())[1000:1003]):
        Image.open(path).rotate(90).save(folder / "train" / "rare" / f"{i}.png")
    return folder, copies


@needs_images
def test_check_data_finds_the_planted_problems(planted, tmp_path, capsys):
    folder, copies = planted
    assert datacheck.main(["--data-dir", str(folder), "--out-dir", str(tmp_path), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    recall, unplanted = duplicate_recall(tmp_path / "findings.csv", copies, folder)
    found, total = (sum(v[i] for v in recall.values()) for i in (0, 1))
    assert total == 50 and found / total >= 0.9, recall
    assert unplanted <= 1  # real Fashion-MNIST may hold a duplicate of its own; look-alikes must not be grouped
    rows = list(csv.DictReader(open(tmp_path / "findings.csv")))
    kinds = {os.path.basename(r["path"]): r["check"] for r in rows}
    for copy in copies:
        name = os.path.basename(copy["copy"])
        if name in kinds and copy["where"] == "other class":
            assert "conflicting labels" in kinds[name]
        if name in kinds and copy["where"] == "test":
            assert "across splits" in kinds[name]
    assert any(r["check"] == "unreadable" and r["path"].endswith("broken.png") for r in rows)
    odd = {os.path.basename(r["path"]): r["detail"] for r in rows if r["check"] == "odd size"}
    assert "under 16 px" in odd["tiny.png"] and "aspect ratio" in odd["tall.png"]
    assert any(r["check"] == "small class" and r["class"] == "rare" for r in rows)
    assert "unreadable: 1" in printed and "conflicting labels" in printed
    page = (tmp_path / "index.html").read_text()
    assert "data:image/png;base64," in page and "findings.csv" in page


def test_check_data_refuses_what_is_not_a_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        datacheck.main(["--data-dir", str(tmp_path / "missing")])
    assert stopped.value.code == 2 and "--data-dir" in capsys.readouterr().err
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    assert datacheck.main(["--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "out")]) == 2
    assert "no image files" in capsys.readouterr().err


@needs_images
@pytest.mark.parametrize("in_memory", [True, False])
def test_the_drawn_split_never_puts_copies_on_both_sides(planted, tmp_path, in_memory):
    folder, _ = planted
    clean = tmp_path / "clean"
    for path in (folder / "train").rglob("*"):
        if path.is_file() and path.name not in ("broken.png",) and path.parent.name != "rare":
            target = clean / path.relative_to(folder / "train")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    data = load_dataset(DataConfig(dataset="folder", data_dir=str(clean), image_size=28, channels=1, val_fraction=0.3,
                                   in_memory=in_memory, workers=0))
    assert len(near_pairs(data.val.prints, data.train.prints)) == 0
    assert len(data.train) + len(data.val) == sum(1 for p in clean.rglob("*") if p.is_file())
    assert any("moved to training" in line for line in data.checks)
    assert any("under two or more classes" in line for line in data.checks)  # the identical ones, at least


@needs_images
def test_small_jpegs_streamed_are_not_taken_for_copies(tmp_path):
    """--no-in-memory checks the files at 1 px; their fingerprints must not come from a 4 px JPEG draft."""
    for name in ("bag", "coat"):
        (tmp_path / "jpegs" / name).mkdir(parents=True)
        for path in sorted((SHARED / name).iterdir())[:60]:
            Image.open(path).save(tmp_path / "jpegs" / name / f"{path.stem}.jpg", quality=90)
    for in_memory in (True, False):
        data = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path / "jpegs"), image_size=28, channels=1,
                                       val_fraction=0.3, in_memory=in_memory, workers=0))
        assert len(data.val) == 36 and not data.checks, data.checks


@needs_images
def test_copies_across_folders_a_user_made_are_warned_about(planted):
    folder, _ = planted
    (folder / "train" / "bag" / "broken.png").rename(folder / "broken.bak")
    try:
        data = load_dataset(DataConfig(dataset="folder", data_dir=str(folder), image_size=28, channels=1, workers=0))
    finally:
        (folder / "broken.bak").rename(folder / "train" / "bag" / "broken.png")
    lines = "\n".join(data.checks)
    assert "of test/'s" in lines and "near-copy in train/ or val/" in lines
    assert "rare (2)" in lines and "make check-data" in lines  # 3 images, one drawn for validation


def test_label_issues_says_why_when_it_cannot_look():
    probs = np.full((3, 4), 0.25)
    assert datacheck.label_issues(probs, np.array([0, 1, 2])) == ([], "too few images (3) for 4 classes")


@needs_images
@pytest.mark.full
def test_training_ranks_flipped_labels_first(tmp_path, mlflow_tables):
    """5 % of 3,000 real labels flipped: cleanlab, on the validation split's out-of-sample probabilities of the run,
    ranks at least half of the flipped validation images among its top-ranked (as many as were flipped)."""
    folder = tmp_path / "noisy"
    build_folder(SHARED, folder, per_class=330, copies=0)
    flipped = flip_labels(folder, 0.05, seed=0)
    env = {**os.environ, "MLFLOW_TRACKING_URI": fresh_store(mlflow_tables, tmp_path)}
    subprocess.run([sys.executable, str(REPO / "train.py"), "--data-dir", str(folder), "--out", str(tmp_path / "cnn.pt"),
                    "--no-register", "--epochs", "8", "--val-fraction", "0.1", "--experiment", "data-checks"],
                   check=True, env=env, cwd=REPO)
    from benchmarks.data_checks import latest_label_issues, validation_files

    listed = [str(folder / row["image"]) for row in latest_label_issues(env["MLFLOW_TRACKING_URI"], tmp_path)]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("data-checks").experiment_id])[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"mistakes_why.png", "label_issues.png", "label_issues.csv"} <= logged  # the run's report shows them
    in_val = flipped & validation_files(folder)
    assert len(in_val) >= 8
    found = set(listed[:len(in_val)]) & set(in_val)
    assert len(found) >= 0.5 * len(in_val), (len(found), len(in_val))
