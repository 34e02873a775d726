"""--time-budget: durations read as people write them, the plan's arithmetic, and a run that ends within its budget."""

import time

import pytest

import train
from budget import Budget
from config import parse_duration
from checkpoint import load_checkpoint


@pytest.mark.parametrize("text, seconds", [("900", 900), ("900s", 900), ("30m", 1800), (" 1.5H ", 5400), ("0.5m", 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "abc", "0", "-5m", "nan", "inf", "10d", "1e999"])
def test_what_is_not_a_duration(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_plan_leaves_time_for_the_final_report_and_a_validation_pass_per_epoch():
    budget = Budget(100, started=0, eval_views=2, final_images=2)  # report: 2x the validation images, plain + 2 views
    assert budget.final_seconds(eval_seconds=1) == 6
    assert budget.deadline(eval_seconds=1) == 94
    # from t=10: 84 s left; a step takes 1 s and every 10 steps a 1 s validation pass: 1.1 s per step
    assert budget.steps(now=10, step_seconds=1, steps_per_epoch=10, eval_seconds=1) == 76
    assert budget.steps(now=200, step_seconds=1, steps_per_epoch=10, eval_seconds=1) == 1  # past it: one step, then stop


def test_a_bad_budget_is_a_cli_error_naming_the_flag(cifar_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-dir", str(cifar_dir), "--time-budget", "soon", "--no-mlflow"])
    assert exit_info.value.code == 2
    assert "--time-budget must be a duration" in capsys.readouterr().err


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
