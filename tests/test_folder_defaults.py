"""Settings chosen from a folder's images (autoconfig): small, large, grayscale and imbalanced folders."""

import numpy as np
import pytest
from PIL import Image

import autoconfig
import data
import settings
import train
from autoconfig import FolderStats, choose


def test_small_grayscale_balanced_folder_trains_from_scratch_like_cifar():
    chosen, reasons = choose(FolderStats(class_counts=(6000,) * 10, side=28, grayscale=True), {})
    assert chosen["channels"] == 1 and chosen["arch"] == "airbench" and chosen["image_size"] == 28
    assert chosen["batch_size"] == 1024 and chosen["epochs"] == 15 and chosen["val_fraction"] == 0.1
    assert chosen["balance"] == "none" and chosen["select_metric"] == "acc"
    assert "optimizer" not in chosen  # the CIFAR recipe's SGD stays
    assert any(r.startswith("arch=airbench") and "28px" in r for r in reasons)


def test_large_imbalanced_grayscale_folder_fine_tunes_a_pretrained_backbone():
    # like an inspection set: ~2,000 grayscale 300x300 crops, classes 57 / 27 / 11 / 4 %
    chosen, _ = choose(FolderStats(class_counts=(1131, 537, 222, 80), side=300, grayscale=True), {})
    assert chosen["arch"] == autoconfig.TRANSFER_ARCH and chosen["pretrained"] is True
    assert chosen["channels"] == 1 and chosen["image_size"] == autoconfig.TRANSFER_MAX_SIDE
    assert chosen["val_fraction"] == 0.15 and chosen["batch_size"] == 32
    n_train = round(1970 * 0.85)
    assert chosen["epochs"] == round(autoconfig.TRANSFER_IMAGES / n_train)
    assert n_train // chosen["batch_size"] >= 25  # every epoch has many optimizer steps, not one
    assert chosen["balance"] == "weights" and chosen["select_metric"] == "macro_f1"
    assert chosen["optimizer"] == "adam" and chosen["precision"] == "fp32" and chosen["fixed_stages"] == autoconfig.FIXED_STAGES
    on_gpu = choose(FolderStats((1131, 537, 222, 80), 300, True), {}, cuda=True)[0]
    assert "precision" not in on_gpu and "fixed_stages" not in on_gpu
    assert "fixed_stages" not in choose(FolderStats((1131, 537, 222, 80), 300, True), {"pretrained": False})[0]


def test_tiny_colour_folder_gets_small_batches_and_more_epochs():
    chosen, _ = choose(FolderStats(class_counts=(50, 50, 50), side=37, grayscale=False), {})
    assert chosen["channels"] == 3 and chosen["image_size"] == 38 and chosen["batch_size"] == 32
    assert chosen["epochs"] == 60


def test_big_colour_folder_fine_tunes_for_a_few_epochs():
    chosen, _ = choose(FolderStats(class_counts=(5000,) * 20, side=500, grayscale=False), {})
    assert chosen["image_size"] == 160 and chosen["epochs"] == 5 and chosen["channels"] == 3


def test_backbone_input_grows_to_224px_only_while_the_decoded_images_stay_small():
    inspection = choose(FolderStats(class_counts=(1131, 537, 222, 80), side=300, grayscale=True), {})[0]
    many_colour = choose(FolderStats(class_counts=(900,) * 10, side=300, grayscale=False), {})[0]
    assert inspection["image_size"] == 224 and many_colour["image_size"] == autoconfig.TRANSFER_BASE_SIDE
    assert 1674 * 224**2 <= autoconfig.DECODED_BYTES < 8100 * 3 * 224**2
    assert choose(FolderStats(class_counts=(300, 300), side=100, grayscale=False), {})[0]["image_size"] == 96


def test_explicit_values_win_and_steer_the_rest():
    stats = FolderStats(class_counts=(1131, 537, 222, 80), side=300, grayscale=True)
    chosen, reasons = choose(stats, {"arch": "airbench", "balance": "none", "channels": 3})
    assert "arch" not in chosen and "balance" not in chosen and "channels" not in chosen
    assert chosen["image_size"] == autoconfig.SMALL_SIDE  # the from-scratch net's cap, not the backbone's
    assert "optimizer" not in chosen and "pretrained" not in chosen
    assert not any(r.startswith("arch=") for r in reasons)


def test_folder_with_its_own_val_split_keeps_it():
    chosen, _ = choose(FolderStats(class_counts=(100, 100), side=32, grayscale=False, has_val=True), {})
    assert "val_fraction" not in chosen


def write_folder(root, counts, size, mode):
    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / "train" / f"class{c}" / f"{i}.png")
    return root


def test_summarize_folder_reads_counts_size_and_colour(tmp_path, folder_dir):
    gray = write_folder(tmp_path / "gray", (12, 3), (90, 60), "L")
    stats = data.summarize_folder(gray)
    assert stats.class_counts == (12, 3) and stats.grayscale and stats.side == round((90 * 60) ** 0.5)
    assert stats.imbalance == 4
    mixed = data.summarize_folder(folder_dir)  # RGB, RGBA and L images
    assert not mixed.grayscale and mixed.class_counts == (20, 20, 20) and mixed.side == 40


def test_train_cli_applies_chosen_settings_and_flags_override_them(tmp_path):
    folder = write_folder(tmp_path / "gray", (30, 6), (28, 28), "L")
    data_cfg, model_cfg, train_cfg, reasons = settings.decide(
        ["--dataset", "folder", "--data-dir", str(folder), "--batch-size", "8"])
    assert train_cfg.preset == "auto" and data_cfg.channels == 1 and data_cfg.image_size == 28
    assert train_cfg.batch_size == 8 and train_cfg.balance == "weights" and train_cfg.select_metric == "macro_f1"
    assert not any(r.startswith("batch_size") for r in reasons) and reasons
    # a named preset turns the choosing off; CIFAR-10 keeps its fast preset
    data_cfg, _, train_cfg, reasons = settings.decide(
        ["--dataset", "folder", "--data-dir", str(folder), "--preset", "fast", "--device", "cpu"])
    assert data_cfg.channels == 3 and train_cfg.preset == "fast"
    assert reasons[0].startswith(f"batch_size={autoconfig.CPU_BATCH_SIZE}: on a CPU")  # a preset's CPU batch ...
    # ... cut to the 27 + 5 training images (10% of each class held out), so every epoch has a step
    assert train_cfg.batch_size == 32 and reasons[1:] == ["batch_size=32: the training split holds only 32 images"]
    assert settings.decide([]).train.preset == "fast"


def test_a_chosen_batch_fits_a_small_training_split(tmp_path, capsys):
    folder = write_folder(tmp_path / "tiny", (15, 15), (28, 28), "L")  # 30 images: 15% held out, 26 left
    _, _, cfg, reasons = settings.decide(["--dataset", "folder", "--data-dir", str(folder)])
    assert cfg.batch_size == 16 and "batch_size=16: the training split holds only 26 images" in reasons
    _, _, cfg, _ = settings.decide(["--dataset", "folder", "--data-dir", str(folder), "--batch-size", "64"])
    assert cfg.batch_size == 64  # given: kept, and train.py refuses it, naming the flag
    assert train.main(["--dataset", "folder", "--data-dir", str(folder), "--batch-size", "64", "--no-mlflow",
                       "--out", str(tmp_path / "cnn.pt")]) == 2
    assert "--batch-size 64 is more than the 26 training images" in capsys.readouterr().err
    _, _, cfg, _ = settings.decide(["--smoke", "--device", "cpu"])  # 512 CIFAR-10 images: 461 to train on
    assert cfg.batch_size == 256


def test_the_from_scratch_net_takes_a_smaller_batch_on_a_cpu_unless_told(monkeypatch):
    """1024 images per step keeps a GPU busy; on a CPU 256 is faster per image and gives more steps per epoch."""
    for preset in ("fast", "best", "auto"):
        _, _, cfg, reasons = settings.decide(["--preset", preset, "--device", "cpu"])
        assert cfg.batch_size == 256 and cfg.preset == ("fast" if preset == "auto" else preset) and len(reasons) == 1
    _, _, cfg, reasons = settings.decide(["--device", "cpu", "--batch-size", "1024"])
    assert cfg.batch_size == 1024 and reasons == []
    for optimizer in ("muon", "adam"):  # step sizes per step, not per 1024 examples: their recipe keeps its batch
        _, _, cfg, reasons = settings.decide(["--device", "cpu", "--optimizer", optimizer])
        assert cfg.batch_size == 1024 and reasons == []
    _, _, cfg, reasons = settings.decide(["--device", "cpu", "--preset", "baseline"])  # its own recipe: batch 128
    assert cfg.batch_size == 128 and reasons == []
    _, _, cfg, reasons = settings.decide(["--device", "cpu", "--arch", "baseline", "--widths", "32", "64"])
    assert cfg.batch_size == 1024 and reasons == []
    monkeypatch.setattr(settings.torch.cuda, "is_available", lambda: True)
    _, _, cfg, reasons = settings.decide([])
    assert cfg.batch_size == 1024 and reasons == []
    _, _, cfg, reasons = settings.decide(["--device", "cpu"])  # a GPU there, but the run is told to use the CPU
    assert cfg.batch_size == 256


def test_missing_folder_is_a_clear_cli_error(tmp_path, capsys):
    assert train.main(["--dataset", "folder", "--data-dir", str(tmp_path / "nope"), "--no-mlflow"]) == 2
    assert "train/<class>" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--channels", "2"), ("--resize", "zoom"), ("--crop-scale", "2")])
def test_bad_new_flags_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        settings.decide(["--dataset", "folder", "--preset", "fast", flag, value])  # a preset: no folder read
    assert flag in capsys.readouterr().err


def test_choices_follow_limit_and_an_explicit_optimizer():
    stats = FolderStats(class_counts=(25_000, 25_000), side=300, grayscale=False)
    chosen, _ = choose(stats, {"limit": 1000})
    assert chosen["val_fraction"] == 0.15 and chosen["epochs"] == 24  # sized for the 1,000 images trained on
    chosen, _ = choose(stats, {"limit": 1000, "optimizer": "sgd"})
    assert "lr" not in chosen and "weight_decay" not in chosen
    assert chosen["warmup"] == pytest.approx(2 / chosen["epochs"], abs=1e-3)  # lasts one epoch past the head-only one


def test_baseline_arch_on_a_folder_gets_its_own_recipe(tmp_path):
    folder = write_folder(tmp_path / "f", (10, 10), (28, 28), "RGB")
    _, model_cfg, train_cfg, _ = settings.decide(["--dataset", "folder", "--data-dir", str(folder), "--arch", "baseline"])
    assert model_cfg.widths == (32, 64) and train_cfg.optimizer == "adam"


def test_empty_class_folder_and_tiny_classes(tmp_path):
    folder = write_folder(tmp_path / "f", (10, 2), (28, 28), "L")
    (folder / "train" / "class9").mkdir()
    with pytest.raises(data.DataError, match="class9"):
        data.summarize_folder(folder)
    (folder / "train" / "class9").rmdir()
    ds = data.load_dataset(data.DataConfig(dataset="folder", data_dir=str(folder), val_fraction=0.15, workers=0))
    assert sorted(ds.val.labels.tolist()) == [0, 0, 1]  # the 2-image class keeps one for validation


def test_weights_without_a_pretrained_backbone_is_refused(tmp_path, capsys):
    folder = write_folder(tmp_path / "f", (10, 10), (28, 28), "L")
    with pytest.raises(SystemExit) as exit_info:  # a CLI error, before any data is read
        train.main(["--dataset", "folder", "--data-dir", str(folder), "--weights", "w.pth", "--no-mlflow"])
    assert exit_info.value.code == 2
    assert "--weights" in capsys.readouterr().err


def test_a_data_dir_of_class_folders_is_read_as_a_folder_without_the_flag(tmp_path, cifar_dir):
    folder = write_folder(tmp_path / "own", (15, 15), (28, 28), "L")
    data_cfg, _, _, reasons = settings.decide(["--data-dir", str(folder)])
    assert data_cfg.dataset == "folder" and reasons[0] == f"dataset=folder: {folder} holds class folders, not CIFAR-10"
    assert data_cfg.channels == 1  # and the folder's own settings are chosen, as with --dataset folder
    assert settings.decide(["--data-dir", str(cifar_dir)]).data.dataset == "cifar10"
    assert settings.decide(["--data-dir", str(tmp_path / "absent")]).data.dataset == "cifar10"  # downloaded there
    (tmp_path / "shared" / "notes").mkdir(parents=True)  # a data root with other things in it: no image, no guess
    (tmp_path / "shared" / "notes" / "README.txt").write_text("x")
    assert settings.decide(["--data-dir", str(tmp_path / "shared")]).data.dataset == "cifar10"
    (tmp_path / "shared" / "notes" / ".ipynb_checkpoints").mkdir()  # images list_images would skip: still no guess
    Image.new("L", (8, 8)).save(tmp_path / "shared" / "notes" / ".ipynb_checkpoints" / "x.png")
    assert settings.decide(["--data-dir", str(tmp_path / "shared")]).data.dataset == "cifar10"
