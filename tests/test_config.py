import pytest

import runtime
from config import PRESETS, ConfigError
from serve_config import ServeConfig
from settings import decide


def parse_args(argv):
    return decide(argv)[:3]


def test_defaults_follow_the_fast_preset():
    data_cfg, model_cfg, train_cfg = parse_args([])
    assert train_cfg.preset == "fast"
    assert model_cfg.arch == "airbench" and model_cfg.widths == PRESETS["fast"]["widths"]
    assert data_cfg.val_fraction == 0.1


def test_explicit_flags_override_the_preset():
    _, model_cfg, train_cfg = parse_args(["--preset", "baseline", "--epochs", "3", "--widths", "16", "32"])
    assert model_cfg.arch == "baseline" and model_cfg.widths == (16, 32)
    assert train_cfg.epochs == 3 and train_cfg.optimizer == "adam"


def test_smoke_leaves_the_trained_model_alone():
    assert parse_args(["--smoke"])[2].out == "models/smoke.pt"
    assert parse_args([])[2].out == "models/cnn.pt"
    assert parse_args(["--smoke", "--out", "models/cnn.pt"])[2].out == "models/cnn.pt"  # asked for


def test_smoke_sets_small_run_unless_given():
    data_cfg, _, train_cfg = parse_args(["--smoke", "--limit", "100"])
    assert train_cfg.max_steps == 3 and data_cfg.limit == 100


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--tta", "3"], "--tta"),
    (["--progressive", "0.1"], "--progressive"),
    (["--ema", "1"], "--ema"),
    (["--preset", "baseline", "--widths", "8", "8", "8"], "--widths"),
])
def test_bad_values_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--epochs", "many"], ["--optimizer", "rmsprop"]])
def test_unknown_flags_and_bad_types_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_decide_raises_config_error_for_unknown_preset():
    with pytest.raises(ConfigError, match="--preset"):
        decide(values={"preset": "huge"})


def test_serve_config_reads_environment_and_refuses_bad_values():
    assert ServeConfig.from_env({"CATER_PORT": "9001"}).port == 9001
    with pytest.raises(ConfigError, match="CATER_PORT"):
        ServeConfig.from_env({"CATER_PORT": "eighty"})


def test_cifar_refuses_other_image_sizes(capsys, folder_dir):
    with pytest.raises(SystemExit):
        parse_args(["--image-size", "64"])
    assert "--image-size 32" in capsys.readouterr().err
    assert parse_args(["--dataset", "folder", "--data-dir", str(folder_dir), "--preset", "fast",
                       "--image-size", "64"])[0].image_size == 64


def test_available_cores_without_affinity(monkeypatch):
    import os

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert runtime.available_cores() == (os.cpu_count() or 1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_naming_the_setting():
    from runtime import pick_device

    assert pick_device("auto", "--device").type == "cpu"
    with pytest.raises(ConfigError, match="--device=cuda"):
        pick_device("cuda", "--device")
    with pytest.raises(ConfigError, match="CATER_DEVICE=cuda:1"):
        pick_device("cuda:1", "CATER_DEVICE")


def fake_cgroup(tmp_path, proc: str, files: dict[str, str]) -> tuple[str, str]:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return str(tmp_path), str(tmp_path / "proc_cgroup")


@pytest.mark.parametrize("proc, files, cores", [
    ("0::/docker/abc\n", {"docker/abc/cpu.max": "150000 100000\n"}, 1.5),  # v2, the container's own group
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # v2 without a limit
    ("4:cpu,cpuacct:/x\n1:memory:/x\n", {"cpu,cpuacct/x/cpu.cfs_quota_us": "50000\n",
                                         "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
    ("4:cpu,cpuacct:/x\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/gone\n", {}, None),  # no files to read: no limit known
    ("0::/pod/app\n", {"pod/app/cpu.max": "max 100000\n", "pod/cpu.max": "200000 100000\n", "cpu.max": "max\n"}, 2.0),
])
def test_cgroup_cpu_quota(tmp_path, proc, files, cores):
    assert runtime.cgroup_cpu_quota(*fake_cgroup(tmp_path, proc, files)) == cores


def test_threads_follow_the_cpu_quota_not_the_host(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: 1.5)  # docker run --cpus 1.5 on a 16-core host
    assert runtime.available_cores() == 2
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: None)
    assert runtime.available_cores() == 16
