"""Training and serving on a CUDA GPU: skipped on machines without one (CI); run on a GPU machine with
`python -m pytest tests/test_cuda.py`. Needs only torch, numpy, pillow and tqdm (no MLflow, no web stack)."""

from types import SimpleNamespace

import pytest
import torch

import train
from checkpoint import load_checkpoint
from predictor import TorchPredictor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("extra", [[], ["--compile"], ["--precision", "fp16"]], ids=["bf16-auto", "compile", "fp16"])
def test_training_on_cuda_writes_a_checkpoint_that_serves_the_same_on_cpu(cifar_dir, tmp_path, extra):
    out = tmp_path / "cnn.pt"
    assert train.main(["--data-dir", str(cifar_dir), "--epochs", "2", "--batch-size", "64", "--out", str(out),
                       "--no-mlflow", "--device", "cuda", "--tta", "2", *extra]) == 0
    model, meta = load_checkpoint(out)
    assert next(model.parameters()).device.type == "cpu"  # saved from the GPU, loads anywhere
    assert meta["metrics"]["val_acc"] > 0.2  # chance is 0.1 on the toy data

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for tta in (0, 2):
        on_gpu = TorchPredictor(out, torch.device("cuda")).probabilities(images, tta)
        on_cpu = TorchPredictor(out, torch.device("cpu")).probabilities(images, tta)
        assert on_gpu.device.type == "cpu" and on_gpu.shape == (16, 10)
        assert torch.allclose(on_gpu, on_cpu, atol=5e-3)  # TF32 convolutions on the GPU


def test_a_nan_loss_on_cuda_stops_the_run_within_a_few_steps(cifar_dir, tmp_path, monkeypatch, capsys):
    steps = []

    def nan_from_the_third_step(logits, y, **kwargs):
        loss = torch.nn.functional.cross_entropy(logits, y, **kwargs)
        if "label_smoothing" in kwargs:  # a training step
            steps.append(1)
            return loss * float("nan") if len(steps) >= 3 else loss
        return loss

    monkeypatch.setattr(train, "F", SimpleNamespace(cross_entropy=nan_from_the_third_step))
    code = train.main(["--data-dir", str(cifar_dir), "--epochs", "2", "--batch-size", "16", "--out", str(tmp_path / "cnn.pt"),
                       "--no-mlflow", "--device", "cuda", "--precision", "bf16"])
    assert code == 1 and "the training loss became nan at epoch 1" in capsys.readouterr().err
    assert len(steps) < 3 + 10  # the GPU's loss is read every 10 steps, not at the epoch's end
