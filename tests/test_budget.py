"""--time-budget: durations read as people write them, the plan's arithmetic, and a run that ends within its budget."""

import time

import pytest
import torch

import settings
import train
from budget import SMALLEST_SIZE, Budget, budget_size
from config import parse_duration
from checkpoint import load_checkpoint


@pytest.mark.parametrize("text, seconds", [("900", 900), ("900s", 900), ("30m", 1800), (" 1.5H ", 5400), ("0.5m", 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "abc", "0", "-5m", "nan", "inf", "10d", "1e999"])
def test_what_is_not_a_duration(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_plan_leaves_time_for_the_final_report_and_each_epochs_validation():
    budget = Budget(100, started=0, views=2, test_share=1, world=1)  # report: val plain + 2 TTA views, test plain
    assert budget.final_seconds(eval_seconds=1) == 4
    assert budget.deadline(eval_seconds=1) == 96
    assert Budget(100, 0, 2, 1, world=2).final_seconds(1) == 8  # a shard was timed; the report runs on one process
    # from t=10, 86 s left; 10 steps of 1 s an epoch, then 2 s of validation and checkpoints: 12 s an epoch.
    # 3 steps into this epoch: 7 + 2 = 9 s finish it, 6 whole epochs take 72 s, 5 s are left: 3 steps + 2 s.
    assert budget.steps(now=10, step_seconds=1, steps_per_epoch=10, per_epoch=2, eval_seconds=1, done=3) == 7 + 60 + 3
    # the deadline falls inside this epoch: as many steps as leave time for its validation
    assert budget.steps(now=90, step_seconds=1, steps_per_epoch=10, per_epoch=2, eval_seconds=1) == 4
    assert budget.steps(now=95, step_seconds=1, steps_per_epoch=10, per_epoch=2, eval_seconds=1) == 0  # nothing fits


def test_fixed_stages_are_refused_where_there_are_no_pretrained_stages(cifar_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-dir", str(cifar_dir), "--fixed-stages", "2", "--no-mlflow"])  # the airbench net
    assert exit_info.value.code == 2
    assert "--fixed-stages keeps a pretrained timm backbone's early layers" in capsys.readouterr().err


def test_a_bad_budget_is_a_cli_error_naming_the_flag(cifar_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-dir", str(cifar_dir), "--time-budget", "soon", "--no-mlflow"])
    assert exit_info.value.code == 2
    assert "--time-budget must be a duration" in capsys.readouterr().err


@pytest.mark.full
def test_a_run_with_more_epochs_than_its_budget_holds_trains_fewer_and_ends_in_time(cifar_dir, tmp_path, capsys):
    out = tmp_path / "cnn.pt"
    start = time.perf_counter()
    code = train.main(["--data-dir", str(cifar_dir), "--epochs", "400", "--batch-size", "32", "--time-budget", "6s",
                       "--tta", "0", "--no-mlflow", "--out", str(out)])
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert code == 0
    assert "time budget 6s:" in printed and "of 400.0 epochs fit" in printed
    epochs_run = printed.count(" train loss ")
    assert 1 <= epochs_run < 400
    assert load_checkpoint(out)[1]["metrics"]["best_epoch"] <= epochs_run
    assert elapsed < 6 + 20  # loading and saving come on top of the budget, which covers training and the report


def test_a_budget_that_holds_too_few_epochs_lowers_the_input_size():
    # 1000 steps of 1 s: 100% of them fit in 1250 s (80% of it is for training steps), so the size stays
    assert budget_size(1250, 224, 1.0, 1000) == 224
    assert budget_size(625, 224, 1.0, 1000) == 224  # half of them fit: the budget trims epochs instead
    # a quarter fit: half the pixels would hold half of them -> 224 / sqrt(2) = 158 -> 128 in steps of 32
    assert budget_size(312.5, 224, 1.0, 1000) == 128
    assert budget_size(1, 224, 1.0, 1000) == SMALLEST_SIZE  # never below it
    assert budget_size(1, 64, 1.0, 1000) == 64  # nor raised to it


@pytest.mark.full
def test_a_folder_run_under_a_budget_measures_its_steps_and_prints_the_size_it_chose(tmp_path):
    from test_folder_defaults import write_folder

    folder = write_folder(tmp_path / "big", (40, 40), (200, 200), "L")
    data_cfg, _, _, reasons = settings.decide(["--data-dir", str(folder), "--time-budget", "1s", "--device", "cpu"])
    assert data_cfg.image_size == SMALLEST_SIZE
    assert any(r.startswith(f"image_size={SMALLEST_SIZE}: time budget 1s: 120 steps at 192px take about") for r in reasons)
    data_cfg, _, _, reasons = settings.decide(["--data-dir", str(folder), "--time-budget", "100h", "--device", "cpu"])
    assert data_cfg.image_size == 192 and any(r.startswith("image_size=192: time budget 100h") for r in reasons)
    data_cfg, _, _, reasons = settings.decide(["--data-dir", str(folder), "--time-budget", "1s", "--device", "cpu",
                                               "--image-size", "160"])
    assert data_cfg.image_size == 160 and not any("budget" in r for r in reasons)  # a given size is kept


def test_a_resumed_run_keeps_the_size_its_budget_chose(tmp_path):
    from test_folder_defaults import write_folder

    from resume import last_path

    folder = write_folder(tmp_path / "big", (40, 40), (200, 200), "L")
    out = tmp_path / "cnn.pt"
    torch.save({"settings": {"image_size": 128}}, last_path(out))  # what the budget chose when the run began
    flags = ["--data-dir", str(folder), "--time-budget", "1s", "--device", "cpu", "--out", str(out)]
    data_cfg, _, _, reasons = settings.decide(flags + ["--resume"])
    assert data_cfg.image_size == 128 and any(r.startswith("image_size=128: the size the run being resumed") for r in reasons)
    assert settings.decide(flags).data.image_size == SMALLEST_SIZE  # not resuming: measured again
