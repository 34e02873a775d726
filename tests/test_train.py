import json
import math
import os
import signal
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch

import evaluate
import finish
import resume
import train
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from config import DataConfig, ModelConfig, TrainConfig, flat_params
from conftest import free_port, fresh_store
from model import CnnClassifier, build_model
from tracking import metric_names


def stop_after_epoch(epoch: int):
    """A train.save_last that writes the last checkpoint, then stops the run as Ctrl-C would after that epoch."""
    def save_then_stop(path, **state):
        resume.save_last(path, **state)
        if state["epoch"] == epoch:
            raise KeyboardInterrupt
    return save_then_stop


@pytest.fixture
def tracking(tmp_path, monkeypatch, mlflow_tables):
    uri = fresh_store(mlflow_tables, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a short run still gets samples
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in tmp_path
    return mlflow.MlflowClient(uri)


def test_train_logs_run_and_writes_loadable_checkpoint(cifar_dir, tmp_path, tracking):
    out = tmp_path / "models" / "cnn.pt"
    code = train.main(["--data-dir", str(cifar_dir), "--epochs", "2", "--batch-size", "64", "--out", str(out),
                       "--experiment", "test-exp", "--tta", "1", "--precision", "fp32"])
    assert code == 0
    model, meta = load_checkpoint(out)
    assert meta["classes"][0] == "airplane" and meta["image_size"] == 32
    assert {"val_acc", "val_acc_tta", "best_epoch", "train_seconds", "val_ece", "val_ece_uncalibrated",
            "val_ece_held_out"} <= set(meta["metrics"])
    assert meta["temperature"] == meta["metrics"]["temperature"] > 0  # fitted on validation, served from the checkpoint
    fitted = {"1": meta["metrics"]["temperature_tta"]} if "temperature_tta" in meta["metrics"] else {}
    assert meta["tta_temperatures"] == fitted  # and at the --tta level, where validation has mistakes enough to fit
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    run = tracking.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["preset"] == "fast" and run.data.params["epochs"] == "2.0"
    assert {"git_commit", "device", "torch_version"} <= set(run.data.tags)
    history = tracking.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history[:2]] == [1, 2]
    for name in ("train_loss", "learning_rate", "epoch_seconds", "images_per_s", "val_loss", "val_macro_f1", "final_val_acc",
                 "final_val_macro_f1", "final_temperature", "final_val_ece", "final_val_ece_uncalibrated", "val_f1_airplane", "val_precision_truck", "val_recall_ship"):
        assert name in run.data.metrics
    assert tracking.get_metric_history(run.info.run_id, "final_val_acc")[0].step == meta["metrics"]["best_epoch"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    artifacts = {a.path for a in tracking.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix_normalized.png", "curves.png", "per_class.png", "mistakes.png",
            "per_class_metrics.json",
            "checkpoint"} <= artifacts


def test_baseline_learns_the_toy_data(cifar_dir, tmp_path):
    out = tmp_path / "cnn.pt"
    assert train.main(["--preset", "baseline", "--data-dir", str(cifar_dir), "--epochs", "8", "--batch-size", "32",
                       "--out", str(out), "--no-mlflow", "--val-fraction", "0.2"]) == 0
    _, meta = load_checkpoint(out)
    assert meta["metrics"]["val_acc"] >= 0.5  # chance is 0.1


def test_folder_dataset_trains_streaming(folder_dir, tmp_path):
    out = tmp_path / "cnn.pt"
    assert train.main(["--dataset", "folder", "--data-dir", str(folder_dir), "--no-in-memory", "--workers", "0",
                       "--image-size", "24", "--epochs", "1", "--batch-size", "16", "--out", str(out), "--no-mlflow"]) == 0
    _, meta = load_checkpoint(out)
    assert meta["classes"] == ["crack", "ok", "scratch"] and meta["image_size"] == 24
    assert "test_acc" in meta["metrics"]


def test_progressive_resizing_trains_small_first_and_keeps_the_full_size(cifar_dir, tmp_path, monkeypatch):
    seen = []  # the side of every batch the net trains on

    def recording(*args, **kwargs):
        net = build_model(*args, **kwargs)
        net.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].shape[-1]) if m.training else None)
        return net

    monkeypatch.setattr(train, "build_model", recording)
    out = tmp_path / "cnn.pt"
    assert train.main(["--data-dir", str(cifar_dir), "--epochs", "4", "--batch-size", "32", "--out", str(out),
                       "--no-mlflow", "--tta", "0", "--precision", "fp32", "--progressive", "0.5"]) == 0
    model, meta = load_checkpoint(out)
    assert [m["train_size"] for m in meta["history"]] == [16, 24, 24, 32]
    steps = len(seen) // 4
    assert [sorted(set(seen[i * steps:(i + 1) * steps])) for i in range(4)] == [[16], [24], [24], [32]]
    assert meta["image_size"] == 32 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_progressive_resizing_is_refused_for_a_net_sized_for_one_input(cifar_dir, capsys):
    assert train.main(["--data-dir", str(cifar_dir), "--preset", "baseline", "--epochs", "2", "--no-mlflow",
                       "--progressive", "0.5"]) == 2
    assert "--progressive 0.5: this net cannot take the 16px images" in capsys.readouterr().err


def test_missing_data_is_a_clear_cli_error(tmp_path, capsys):
    assert train.main(["--data-dir", str(tmp_path / "nowhere"), "--no-download", "--no-mlflow"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(warmup=0.25, lr_start=0.2, lr_end=0.1)
    factors = [train.lr_factor(s, 100, cfg) for s in range(101)]
    assert factors[0] == pytest.approx(0.2) and factors[25] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert factors.index(max(factors)) == 25


def test_sgd_hyperparameters_are_decoupled_from_batch_size():
    model = CnnClassifier(ModelConfig(), 10)
    small, large = (train.make_optimizer(model, TrainConfig(batch_size=b)) for b in (256, 1024))
    # summed loss: per-example step size is the same; weight decay per step grows with the batch
    assert small.param_groups[0]["lr"] == large.param_groups[0]["lr"]
    decay = lambda opt: opt.param_groups[0]["lr"] * opt.param_groups[0]["weight_decay"]  # noqa: E731
    assert decay(large) == pytest.approx(4 * decay(small))
    assert small.param_groups[1]["lr"] == pytest.approx(64 * small.param_groups[0]["lr"])


@pytest.mark.full
def test_muon_learns_the_toy_data_and_resumes_exactly(cifar_dir, tmp_path, monkeypatch):
    def flags(out, *extra):
        return ["--data-dir", str(cifar_dir), "--optimizer", "muon", "--epochs", "4", "--batch-size", "32", "--out",
                str(out), "--no-mlflow", "--tta", "0", "--val-fraction", "0.2", "--precision", "fp32", "--threads", "1",
                *extra]

    assert train.main(flags(tmp_path / "a" / "cnn.pt")) == 0
    _, straight = load_checkpoint(tmp_path / "a" / "cnn.pt")
    assert straight["metrics"]["val_acc"] >= 0.5  # chance is 0.1

    # Its momentum buffers travel in the last checkpoint: stopped after epoch 2 and resumed, it ends the same.
    out = tmp_path / "b" / "cnn.pt"
    monkeypatch.setattr(train, "save_last", stop_after_epoch(2))
    assert train.main(flags(out, "--resume")) == 0
    monkeypatch.setattr(train, "save_last", resume.save_last)
    assert train.main(flags(out, "--resume")) == 0
    _, resumed = load_checkpoint(out)
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in straight["history"]],
                                                                           rel=1e-6)


@pytest.mark.full
def test_ema_weights_are_the_ones_validated_saved_and_resumed(cifar_dir, tmp_path, monkeypatch):
    def flags(out, *extra):
        return ["--data-dir", str(cifar_dir), "--epochs", "4", "--batch-size", "32", "--out", str(out), "--no-mlflow",
                "--tta", "0", "--val-fraction", "0.2", "--precision", "fp32", "--threads", "1", *extra]

    written, lasts = {}, {}  # per epoch: the weights written to cnn.pt as the best so far; the last checkpoint

    def best_written(path, model, **info):
        if "epoch" in info["metrics"]:
            written[info["metrics"]["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}
        return save_checkpoint(path, model, **info)

    def last_written(path, **state):
        lasts[state["epoch"]] = {k: {n: t.clone() for n, t in state[k].items()} for k in ("ema", "model")}
        resume.save_last(path, **state)

    assert train.main(flags(tmp_path / "plain" / "cnn.pt")) == 0
    monkeypatch.setattr(train, "save_checkpoint", best_written)
    monkeypatch.setattr(train, "save_last", last_written)
    assert train.main(flags(tmp_path / "a" / "cnn.pt", "--ema", "0.9")) == 0
    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    assert written  # each new best epoch's file holds the average of that moment, not the trained weights
    for epoch, weights in written.items():
        ema, trained = lasts[epoch]["ema"], lasts[epoch]["model"]
        assert all(torch.equal(weights[k], ema[k]) for k in weights)
        assert not all(torch.equal(weights[k], trained[k]) for k in weights)
    _, plain = load_checkpoint(tmp_path / "plain" / "cnn.pt")
    _, straight = load_checkpoint(tmp_path / "a" / "cnn.pt")
    # The same training steps (the average only reads the weights), validated through other weights
    assert [h["train_loss"] for h in straight["history"]] == pytest.approx([h["train_loss"] for h in plain["history"]])
    assert [h["val_loss"] for h in straight["history"]] != pytest.approx([h["val_loss"] for h in plain["history"]])
    best = straight["history"][int(straight["metrics"]["best_epoch"]) - 1]
    assert straight["metrics"]["val_acc"] == pytest.approx(best["val_acc"])  # the checkpoint holds the average

    # The average travels in the last checkpoint: stopped after epoch 2 and resumed, validation scores the same.
    out = tmp_path / "b" / "cnn.pt"
    monkeypatch.setattr(train, "save_last", stop_after_epoch(2))
    assert train.main(flags(out, "--ema", "0.9", "--resume")) == 0
    monkeypatch.setattr(train, "save_last", resume.save_last)
    assert train.main(flags(out, "--ema", "0.9", "--resume")) == 0
    _, resumed = load_checkpoint(out)
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx([h["val_loss"] for h in straight["history"]],
                                                                         rel=1e-6)


def test_muon_is_refused_for_nets_without_batchnorm_after_every_conv(cifar_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a CLI error, before any data is read
        train.main(["--data-dir", str(cifar_dir), "--preset", "baseline", "--optimizer", "muon", "--no-mlflow"])
    assert exit_info.value.code == 2
    assert "--optimizer muon is for --arch airbench" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = CnnClassifier(ModelConfig(), 10)
    path = tmp_path / "cnn.pt"
    info = dict(model_config=model.cfg, classes=[str(i) for i in range(10)], mean=(0.5,) * 3, std=(0.2,) * 3, image_size=32)
    save_checkpoint(path, model, metrics={"val_acc": 0.5}, **info)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, metrics={"val_acc": 0.9}, **info)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.pt"]  # no temp file left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask, mode):
    # mkstemp's 0600 would keep a server running as another user (a container's) from reading the file
    model = CnnClassifier(ModelConfig(), 10)
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "cnn.pt", model, model_config=model.cfg, classes=[str(i) for i in range(10)],
                               mean=(0.5,) * 3, std=(0.2,) * 3, image_size=32, metrics={})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_bad_checkpoints_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="make train"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(junk)
    torch.save({"state_dict": {}}, junk)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(junk)


def test_interrupted_run_keeps_its_best_checkpoint(cifar_dir, tmp_path, tracking, monkeypatch):
    out = tmp_path / "cnn.pt"
    real_epoch = train.train_one_epoch
    calls = []

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupt_second_epoch)
    assert train.main(["--data-dir", str(cifar_dir), "--epochs", "3", "--batch-size", "64", "--out", str(out),
                       "--experiment", "test-exp", "--tta", "0"]) == 0
    _, meta = load_checkpoint(out)
    assert meta["metrics"]["best_epoch"] == 1
    run = tracking.get_run(meta["mlflow_run_id"])
    assert run.info.status == "KILLED" and "val_acc" in run.data.metrics


@pytest.mark.parametrize("phase", ["load_dataset", "log_model"])
def test_ctrl_c_outside_an_epoch_ends_cleanly(phase, cifar_dir, tmp_path, tracking, monkeypatch, capsys):
    """A real SIGINT (the OS delivers it to this process) while the data loads, or while the model is logged."""
    out = tmp_path / "cnn.pt"
    module = train if phase == "load_dataset" else finish  # where each is called from
    real = getattr(module, phase)

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, phase, interrupted)
    # Python's own Ctrl-C handler, as train.py has when run from a shell (an earlier test may have left another)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = train.main(["--data-dir", str(cifar_dir), "--epochs", "1", "--batch-size", "64", "--out", str(out),
                           "--experiment", "test-exp", "--tta", "0"])
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    if phase == "load_dataset":
        assert "nothing was written" in err and not out.exists()
        assert tracking.search_experiments(filter_string="name = 'test-exp'") == []  # no run was started
    else:
        assert f"the checkpoint of epoch 1 stays at {out}" in err
        _, meta = load_checkpoint(out)
        run = tracking.get_run(meta["mlflow_run_id"])
        assert run.info.status == "KILLED" and "val_acc" in run.data.metrics


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_best_checkpoint(cifar_dir, tmp_path, tracking,
                                                                                monkeypatch, capsys):
    out = tmp_path / "cnn.pt"
    evaluated = []

    def nan_from_the_second_epoch(logits, y, **kwargs):
        loss = torch.nn.functional.cross_entropy(logits, y, **kwargs)
        if "label_smoothing" not in kwargs:  # evaluate.evaluate's call: the first epoch is over
            evaluated.append(1)
            return loss
        return loss * float("nan") if evaluated else loss  # the training step's loss, from epoch 2 on

    monkeypatch.setattr(train, "F", SimpleNamespace(cross_entropy=nan_from_the_second_epoch))
    monkeypatch.setattr(evaluate, "F", SimpleNamespace(cross_entropy=nan_from_the_second_epoch))
    code = train.main(["--data-dir", str(cifar_dir), "--epochs", "3", "--batch-size", "64", "--out", str(out),
                       "--experiment", "test-exp", "--tta", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "the training loss became nan at epoch 2" in err and "diverged" in err
    assert f"(epoch 1) stays at {out}" in err and "Traceback" not in err
    _, meta = load_checkpoint(out)
    assert meta["metrics"]["epoch"] == 1
    run = tracking.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FAILED" and "nan" in run.data.tags["stopped"]


@pytest.mark.parametrize("first, overflows, look, code", [  # 1 case quick, the rest full
    pytest.param(1, 3, 1, 0, marks=pytest.mark.full), (1, 11, 1, 1),  # read every step (the CPU)
    # read every 4 steps (as on a GPU, every 10): a run spanning reads
    pytest.param(3, 10, 4, 0, marks=pytest.mark.full), pytest.param(3, 11, 4, 1, marks=pytest.mark.full),
    # a run spanning the end of epoch 1 (16 steps) and the start of epoch 2
    pytest.param(11, 10, 4, 0, marks=pytest.mark.full), pytest.param(11, 11, 4, 1, marks=pytest.mark.full),
])
def test_fp16_rides_out_a_few_overflowing_steps_but_not_a_run_of_them(cifar_dir, tmp_path, monkeypatch, capsys,
                                                                       first, overflows, look, code):
    steps = []

    def overflow(logits, y, **kwargs):
        loss = torch.nn.functional.cross_entropy(logits, y, **kwargs)
        if "label_smoothing" in kwargs:  # a training step (evaluation passes no smoothing)
            steps.append(1)
            if first <= len(steps) < first + overflows:
                return loss * float("inf")  # the loss scaler skips the step and lowers its scale
        return loss

    monkeypatch.setattr(train, "F", SimpleNamespace(cross_entropy=overflow))
    monkeypatch.setattr(train, "LOOK_EVERY", {"cpu": look})
    # The fast preset's net at an eighth of its widths: the loss scaler's logic is the same, and fp16 on a CPU without
    # fp16 arithmetic took 1-3 minutes a case at full width (half the full tier's time on a 2-core Xeon)
    assert train.main(["--data-dir", str(cifar_dir), "--epochs", "2", "--batch-size", "16", "--out", str(tmp_path / "cnn.pt"),
                       "--no-mlflow", "--precision", "fp16", "--tta", "0", "--widths", "8", "16", "16"]) == code
    assert len(steps) == (32 if code == 0 else math.ceil((first + overflows - 1) / look) * look)  # 270 // 16 steps an epoch
    assert ("the training loss became" in capsys.readouterr().err) == (code == 1)


def test_a_real_divergence_is_caught_too(cifar_dir, tmp_path, capsys):
    out = tmp_path / "cnn.pt"
    code = train.main(["--data-dir", str(cifar_dir), "--epochs", "2", "--batch-size", "64", "--out", str(out),
                       "--lr", "1e30", "--no-mlflow"])
    assert code == 1 and "diverged" in capsys.readouterr().err and not out.exists()


def test_an_unwritable_output_or_a_silent_tracking_server_fails_before_training(cifar_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    started = []
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: started.append(1))
    assert train.main(["--data-dir", str(cifar_dir), "--out", str(blocker / "cnn.pt"), "--no-mlflow"]) == 2
    assert f"--out {blocker / 'cnn.pt'}: cannot write in {blocker}" in capsys.readouterr().err

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    assert train.main(["--data-dir", str(cifar_dir), "--out", str(tmp_path / "cnn.pt")]) == 2
    err = capsys.readouterr().err
    assert "no MLflow server answers" in err and "--no-mlflow" in err and time.monotonic() - start < 30
    assert not started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_gpu_is_a_cli_error(cifar_dir, capsys):
    assert train.main(["--data-dir", str(cifar_dir), "--device", "cuda", "--no-mlflow"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_checkpoint_of_an_unknown_format_version_is_refused(tmp_path):
    model = CnnClassifier(ModelConfig(), 10)
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, model, model_config=model.cfg, classes=[str(i) for i in range(10)], mean=(0.5,) * 3,
                    std=(0.2,) * 3, image_size=32, metrics={})
    meta = torch.load(path, weights_only=True)
    assert meta["format_version"] == 3 and meta["channels"] == 3 and meta["resize"] == "squash"
    assert meta["temperature"] == 1.0 and meta["tta_temperatures"] == {}
    meta["format_version"] = 99
    torch.save(meta, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    for bad in (float("nan"), 0.0, -1.0, "2"):  # a temperature that would make every answer NaN or nonsense
        torch.save({**meta, "format_version": 3, "temperature": bad}, path)
        with pytest.raises(CheckpointError, match="temperature"):
            load_checkpoint(path)
    del meta["channels"], meta["resize"], meta["temperature"], meta["tta_temperatures"]  # version 1: RGB, squashed
    meta["format_version"] = 1
    torch.save(meta, path)
    assert load_checkpoint(path)[1]["channels"] == 3 and load_checkpoint(path)[1]["temperature"] == 1.0


def test_class_metric_names_are_valid_in_mlflow_and_distinct():
    from mlflow.utils.validation import _validate_metric_name

    names = metric_names(["a:b", "a?b", "ok", "café", "x y", "rust/scratch"])
    assert names == ["a_b_0", "a_b_1", "ok", "café", "x y", "rust/scratch"]
    for name in names:
        _validate_metric_name(f"val_f1_{name}")


def test_failed_model_logging_keeps_the_run_and_checkpoint(cifar_dir, tmp_path, tracking, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("artifact store unreachable")

    monkeypatch.setattr(finish, "log_model", broken)
    out = tmp_path / "cnn.pt"
    assert train.main(["--data-dir", str(cifar_dir), "--epochs", "1", "--batch-size", "64", "--out", str(out),
                       "--experiment", "test-exp", "--precision", "fp32"]) == 0
    assert "could not log the MLflow model" in capsys.readouterr().err
    meta = load_checkpoint(out)[1]
    run = tracking.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "artifact store unreachable" in run.data.tags["model_logging_error"]
    assert "registered_model" not in run.data.tags


@pytest.mark.full
def test_resume_continues_the_same_run_where_it_stopped(cifar_dir, tmp_path, tracking, monkeypatch, capsys):
    """Stopped right after epoch 3's last checkpoint (before that epoch was logged), then resumed: the same MLflow
    run finishes with each epoch logged once, and epochs 4-5 train exactly as in a run that never stopped."""
    def flags(out, *extra):
        return ["--data-dir", str(cifar_dir), "--epochs", "5", "--batch-size", "64", "--out", str(out), "--tta", "0",
                "--precision", "fp32", "--threads", "1", "--experiment", "test-exp", "--no-register", *extra]

    assert train.main(flags(tmp_path / "a" / "cnn.pt")) == 0
    _, meta = load_checkpoint(tmp_path / "a" / "cnn.pt")
    straight = tracking.get_metric_history(meta["mlflow_run_id"], "train_loss")

    out = tmp_path / "b" / "cnn.pt"
    last = out.with_name("cnn.last.pt")
    monkeypatch.setattr(train, "save_last", stop_after_epoch(3))
    assert train.main(flags(out, "--resume")) == 0  # no last checkpoint yet: a new run
    assert "run the same command with --resume" in capsys.readouterr().err
    _, meta = load_checkpoint(out)
    run_id = meta["mlflow_run_id"]
    assert tracking.get_run(run_id).info.status == "KILLED" and last.exists()
    assert [m.step for m in tracking.get_metric_history(run_id, "val_acc")] == [1, 2]

    assert train.main(flags(out, "--resume", "--lr", "5")) == 2  # other settings: refused, nothing touched
    assert "--lr 5.0 (the run had 11.5)" in capsys.readouterr().err and last.exists()

    monkeypatch.setattr(train, "save_last", resume.save_last)
    assert train.main(flags(out, "--resume")) == 0
    assert "resumed after epoch 3 of 5" in capsys.readouterr().out
    _, meta = load_checkpoint(out)
    run = tracking.get_run(meta["mlflow_run_id"])
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["resumed"] == "after epoch 3"
    assert [m.step for m in tracking.get_metric_history(run_id, "val_acc")] == [1, 2, 3, 4, 5]
    resumed = tracking.get_metric_history(run_id, "train_loss")
    assert [m.value for m in resumed] == pytest.approx([m.value for m in straight], rel=1e-6)
    assert not last.exists()  # finished: a later --resume starts a new run


def test_a_last_checkpoint_older_than_a_flag_resumes_at_the_flags_default(tmp_path):
    settings = flat_params(DataConfig(), ModelConfig(), TrainConfig())
    older = {k: v for k, v in settings.items() if k not in ("ema", "progressive")}  # before those flags existed
    resume.save_last(tmp_path / "cnn.last.pt", epoch=1, settings=older)
    assert resume.load_last(tmp_path / "cnn.last.pt", settings)["epoch"] == 1
    with pytest.raises(resume.ResumeError, match=r"--ema 0.999 \(the run had 0.0\)"):
        resume.load_last(tmp_path / "cnn.last.pt", {**settings, "ema": 0.999})


def test_a_kill_right_after_a_better_epoch_keeps_its_weights(cifar_dir, tmp_path, monkeypatch, capsys):
    """Killed while the last checkpoint of an improved epoch is written: cnn.pt holds that epoch already (it is
    written first), and --resume would redo the epoch."""
    def killed_at_epoch_2(path, **state):
        if state["epoch"] == 2:
            raise SystemExit(137)  # no final report and no final save: what a SIGKILL leaves on disk
        resume.save_last(path, **state)

    monkeypatch.setattr(train, "save_last", killed_at_epoch_2)
    out = tmp_path / "cnn.pt"
    with pytest.raises(SystemExit):
        train.main(["--data-dir", str(cifar_dir), "--epochs", "3", "--batch-size", "64", "--out", str(out),
                    "--tta", "0", "--precision", "fp32", "--no-mlflow"])
    epochs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and epochs[1].startswith("epoch   2/3") and " *" in epochs[1]  # epoch 2 improved
    assert load_checkpoint(out)[1]["metrics"]["epoch"] == 2
    assert torch.load(out.with_name("cnn.last.pt"), weights_only=True)["epoch"] == 1


def test_ctrl_c_while_the_best_checkpoint_is_written_names_the_epoch_resume_goes_on_after(cifar_dir, tmp_path,
                                                                                           monkeypatch, capsys):
    def interrupted_at_epoch_2(path, model, **info):
        if info["metrics"].get("epoch") == 2:
            raise KeyboardInterrupt  # before the last checkpoint of epoch 2 is written
        return save_checkpoint(path, model, **info)

    monkeypatch.setattr(train, "save_checkpoint", interrupted_at_epoch_2)
    out = tmp_path / "cnn.pt"
    assert train.main(["--data-dir", str(cifar_dir), "--epochs", "3", "--batch-size", "64", "--out", str(out),
                       "--tta", "0", "--precision", "fp32", "--no-mlflow"]) == 0
    assert "to go on after epoch 1, run the same command with --resume" in capsys.readouterr().err
    assert torch.load(out.with_name("cnn.last.pt"), weights_only=True)["epoch"] == 1


def test_an_unreadable_last_checkpoint_is_a_clear_error(cifar_dir, tmp_path, capsys):
    out = tmp_path / "cnn.pt"
    out.with_name("cnn.last.pt").write_bytes(b"half a file")
    assert train.main(["--data-dir", str(cifar_dir), "--epochs", "1", "--out", str(out), "--no-mlflow", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "delete it to start over" in err and "Traceback" not in err


def test_the_test_split_gets_make_evaluates_report_in_the_run(folder_dir, tmp_path, tracking):
    out = tmp_path / "cnn.pt"
    assert train.main(["--dataset", "folder", "--data-dir", str(folder_dir), "--image-size", "24", "--epochs", "1",
                       "--batch-size", "16", "--out", str(out), "--no-register"]) == 0
    _, meta = load_checkpoint(out)
    assert {"test_acc", "test_ece", "test_ece_uncalibrated"} <= set(meta["metrics"])
    run_id = meta["mlflow_run_id"]
    logged = {a.path for a in tracking.list_artifacts(run_id, "test")}
    assert {f"test/{name}" for name in ("index.html", "metrics.json", "confusion_matrix.png", "reliability.png",
                                        "coverage.png", "mistakes.png")} <= logged
    metrics = json.loads(Path(tracking.download_artifacts(run_id, "test/metrics.json", str(tmp_path))).read_text())
    assert metrics["accuracy"] == pytest.approx(meta["metrics"]["test_acc"])
    assert metrics["ece"] == pytest.approx(meta["metrics"]["test_ece"])
    assert metrics["n"] == sum(metrics["per_class"][c]["support"] for c in meta["classes"])


def test_average_of_state_dicts_means_the_floats_and_keeps_the_counters():
    states = [{"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}, {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}]
    out = train.average(states)
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and out["n"].item() == 5


@pytest.mark.parametrize("averaged_score, kept", [(0.80, True), (0.70, False)])
def test_the_average_of_the_best_epochs_is_kept_only_when_validation_says_so(averaged_score, kept):
    model = torch.nn.Linear(2, 1)
    top = [(0.75, 3, {k: torch.full_like(v, 1.0) for k, v in model.state_dict().items()}),
           (0.72, 5, {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()})]
    state = train.FitState(best_score=0.75, best_epoch=3, best_state=top[0][2], top=top)
    scored = []

    def score(m):
        scored.append(m.weight.detach().clone())
        return {"acc": averaged_score, "macro_f1": 0.5}

    val = train.try_average(model, state, score, "acc")
    assert torch.equal(scored[0], torch.full((1, 2), 2.0))  # the validation pass saw the averaged weights
    assert (val is not None) == kept
    assert torch.equal(state.best_state["weight"], torch.full((1, 2), 2.0 if kept else 1.0))
    assert state.best_score == (0.80 if kept else 0.75) and state.best_epoch == 3


def test_average_best_runs_end_to_end_and_writes_the_kept_weights(cifar_dir, tmp_path, capsys):
    out = tmp_path / "cnn.pt"
    assert train.main(["--preset", "baseline", "--data-dir", str(cifar_dir), "--epochs", "4", "--batch-size", "32",
                       "--out", str(out), "--no-mlflow", "--val-fraction", "0.2", "--average-best", "3"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("average of epochs"))
    _, meta = load_checkpoint(out)
    if "(kept" in line:  # the file holds the average, scored as the line says
        assert f"val acc {meta['metrics']['val_acc']:.4f}" in line
    else:  # the file holds the best epoch alone, whose score the line gives
        assert line.endswith(f"alone acc {meta['metrics']['val_acc']:.4f})")
    assert len(line.split(":")[0].split(",")) == 3
