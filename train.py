"""Train: fit a classifier on the configured data, log the run to MLflow, keep the best model in models/cnn.pt.

    python train.py --help            every flag, generated from config.py
    python train.py --preset fast     the default: airbench-style net, ~93% on CIFAR-10
    python train.py --smoke           a few batches through every stage
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import copy
import dataclasses
import functools
import importlib.metadata
import io
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import autoconfig
import distributed
from checkpoint import save_checkpoint
from config import (ConfigError, DataConfig, ModelConfig, TrainConfig, available_cores, flat_params, parse_values,
                    pick_device, resolve)
from data import (DataError, Dataset, ImageSet, eval_batches, load_dataset, split_fingerprint, summarize_folder,
                  total_steps, train_loader)
from decode import open_image
from distributed import Ranks
from model import SCRATCH_ARCHS, CnnClassifier, build_model, init_whitening, predict_logits, whitening_layer
from optim import Lookahead, lr_factor, make_optimizer
from pretrained import WeightsError, load_pretrained, normalization
from registry import CHAMPION, DEFAULT_TRACKING_URI, default_name, register_and_promote
from report import plot_class_scores, plot_confusion, plot_curves, plot_mistakes
from resume import ResumeError, last_path, load_last, restore_rng, rng_states, save_last
from scores import class_scores, class_weights

REPO = Path(__file__).resolve().parent
LOOKAHEAD_START_EPOCH = 3  # let the weights move freely first; averaging early only slows learning
LOOKAHEAD_EVERY = 5
EVAL_PIXELS = 1000 * 32 * 32  # pixels per evaluation batch for our nets: 1000 CIFAR-sized images
BACKBONE_EVAL_PIXELS = 64 * 160 * 160  # and for an ImageNet backbone: 1000 images at 160 px peaked at 8.5 GB


def eval_batch_size(model: torch.nn.Module, image_size: int) -> int:
    """Evaluation batch size that keeps activation memory about constant whatever the input size."""
    pixels = EVAL_PIXELS if isinstance(model, CnnClassifier) else BACKBONE_EVAL_PIXELS
    return max(8, min(1000, pixels // image_size ** 2))


# ---------------------------------------------------------------- device and numerics

def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: where bf16 convolutions run faster than fp32 on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if choice == "auto":
        if device.type == "cuda":
            # Emulated bf16 (pre-Ampere GPUs) is slower than fp16 with loss scaling.
            choice = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            choice = "bf16" if cpu_has_bf16() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    ranks: Ranks = field(default_factory=Ranks)  # this process's place among torchrun's processes

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


# ---------------------------------------------------------------- the loop

@torch.no_grad()
def evaluate(model, batches, num_classes: int, rt: Runtime, tta: int = 0, across_ranks: bool = False,
             per_image: bool = False) -> dict:
    """Loss, confusion matrix (rows: true class, columns: predicted) and the scores.class_scores over batches;
    across_ranks: each rank holds a shard of the split, and the counts are summed over all ranks first;
    per_image: also each image's predicted class and its probability ("predicted", "confidence")."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, n = 0.0, 0
    kept = []
    for x, y in batches:
        with rt.autocast():
            logits = predict_logits(model, rt.prepare(x), tta)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        n += len(y)
        confusion += torch.bincount((y * num_classes + logits.argmax(1)).cpu(), minlength=num_classes ** 2).view(num_classes, num_classes)
        if per_image:
            kept.append(logits.float().softmax(1).max(1))
    if across_ranks:
        distributed.sum_across(confusion)
        loss_sum, n = distributed.sum_across(torch.tensor([loss_sum, n], dtype=torch.float64)).tolist()
    result = {"loss": loss_sum / max(n, 1), "confusion": confusion, **class_scores(confusion)}
    if per_image:
        result["confidence"] = torch.cat([k.values for k in kept]).cpu() if kept else torch.zeros(0)
        result["predicted"] = torch.cat([k.indices for k in kept]).cpu() if kept else torch.zeros(0, dtype=torch.long)
    return result


@dataclass
class FitState:
    step: int = 0
    total_steps: int = 0
    lookahead: Lookahead | None = None
    scaler: torch.amp.GradScaler | None = None
    history: list = field(default_factory=list)
    best_score: float = -1.0
    best_epoch: int = -1
    best_state: dict | None = None
    patience_left: int = 0
    stopped: str = ""
    diverged: bool = False  # stopped by a NaN or infinite loss
    nonfinite_steps: int = 0  # in a row
    saved_epochs: int = 0  # epochs the last checkpoint holds: where --resume goes on from


MAX_SKIPPED_FP16_STEPS = 10
LOOK_EVERY = {"cpu": 1}  # steps between reads of the loss: every step on the CPU, else 10


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite: the weights are no longer trustworthy."""


def train_one_epoch(model, loader, optimizer, scheduler, state: FitState, epoch: int, epochs: int,
                    cfg: TrainConfig, rt: Runtime, weights: torch.Tensor | None = None) -> dict:
    model.train()
    smoothing = cfg.label_smoothing
    reduction = "mean" if cfg.optimizer == "adam" else "sum"  # SGD and Muon: decoupled hyperparameters (optim.py)
    # DDP averages the ranks' gradients: a loss summed over the rank's shard is scaled back to the global batch's sum
    grad_scale = rt.ranks.world if reduction == "sum" else 1
    data_seconds = 0.0
    start = time.perf_counter()
    steps = min(len(loader), state.total_steps - state.step)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)
    batches = iter(loader)
    scaler = state.scaler
    # On a GPU the loop reads the loss back (a sync that stalls the GPU's queue) only every few steps; the sums, and
    # the run of non-finite steps, stay on the device in between. On the CPU every step is read (the progress bar).
    look_every = LOOK_EVERY.get(rt.device.type, 10)
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss sum, correct, seen (finite steps)
    streak = torch.tensor(float(state.nonfinite_steps), device=rt.device)  # non-finite steps in a row, now
    longest = streak.clone()  # and the longest such run since the last look
    allowed = MAX_SKIPPED_FP16_STEPS if scaler.is_enabled() else 0  # fp16's loss scaler skips a few overflows
    for i in range(steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        x, y = rt.prepare(x.to(rt.device, non_blocking=True)), y.to(rt.device, non_blocking=True)
        data_seconds += time.perf_counter() - t0

        with rt.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=weights, label_smoothing=smoothing, reduction=reduction)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss * grad_scale if grad_scale != 1 else loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.step += 1

        if cfg.lookahead and epoch >= LOOKAHEAD_START_EPOCH and state.step % LOOKAHEAD_EVERY == 0:
            if state.lookahead is None:
                state.lookahead = Lookahead.of(unwrap(model))
            else:
                # Average weakly while the weights still move fast, strongly near the end.
                state.lookahead.update(unwrap(model), decay=0.95 ** LOOKAHEAD_EVERY * (state.step / state.total_steps) ** 3)

        # Every step, summed over the ranks (on GPUs an all-reduce queued like any kernel): every rank sees the
        # global loss, so all of them stop together on a NaN instead of one waiting forever for the others.
        step = distributed.sum_across(torch.stack([loss.detach().float() * (1 if reduction == "sum" else len(y)),
                                                   (logits.argmax(1) == y).sum().float(),
                                                   y.new_full((), len(y), dtype=torch.float32)]))
        finite = torch.isfinite(step[0])
        totals += torch.where(finite, step.double(), 0.0)
        streak = torch.where(finite, 0.0, streak + 1)
        longest = torch.maximum(longest, streak)
        bar.update(1)
        if (i + 1) % look_every and i + 1 < steps:
            continue
        loss_sum, correct, seen, run, now = [*totals.tolist(), longest.item(), streak.item()]
        if run > allowed:
            last = step[0].item()  # on the CPU the step that failed; on a GPU the run may have begun a few steps back
            raise NonFiniteLoss(f"the training loss became {'NaN or infinite' if math.isfinite(last) else last} "
                                f"at epoch {epoch + 1}, by step {state.step}")
        longest.fill_(now)
        if seen:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    state.nonfinite_steps = int(streak.item())
    loss_sum, correct, seen = totals.tolist()
    bar.close()
    if state.lookahead is not None:
        state.lookahead.update(unwrap(model), decay=1.0)
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "epoch_seconds": seconds,
            "images_per_s": seen / seconds, "data_share": data_seconds / seconds, "learning_rate": max(scheduler.get_last_lr())}


def runtime(train_cfg: TrainConfig, ranks: Ranks) -> Runtime:
    """The device (this rank's GPU under torchrun, after joining the process group) and its numerics."""
    device = distributed.join(ranks, pick_device(train_cfg.device, "--device"))
    # channels_last is faster in fp32 too: 1.6x for the airbench net on CPU
    return Runtime(device, pick_precision(train_cfg.precision, device), train_cfg.channels_last, ranks)


def setup(model_cfg: ModelConfig, train_cfg: TrainConfig, data: Dataset, data_cfg: DataConfig, rt: Runtime):
    """The seeded model on its device (the same on every rank).

    A pretrained backbone brings its own normalization, which replaces the dataset's (data.mean, data.std).
    """
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, num_classes=len(data.classes), image_size=data_cfg.image_size, in_chans=data_cfg.channels)
    if model_cfg.weights and (model_cfg.arch in SCRATCH_ARCHS or not model_cfg.pretrained):
        raise ConfigError("--weights is for a pretrained timm backbone: drop it, or pick one with --arch (and --pretrained)")
    if train_cfg.optimizer == "muon" and model_cfg.arch != "airbench":
        # Muon rescales each filter bank to a fixed norm, which only a BatchNorm right after the conv makes harmless
        raise ConfigError("--optimizer muon is for --arch airbench (every conv followed by BatchNorm): use sgd or adam")
    if model_cfg.arch not in SCRATCH_ARCHS and model_cfg.pretrained:
        source = load_pretrained(model, model_cfg.arch, model_cfg.weights)
        data.mean, data.std = normalization(model, data_cfg.channels)
        print(f"pretrained weights: {source}")
    if whitening_layer(model) is not None:  # patch statistics of 5000 training images (a seeded sample: folders come class by class)
        picked = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(train_cfg.seed))[:5000]
        per_batch = max(1, 2_000_000 // data_cfg.image_size ** 2)  # bounds the patch matrix to ~100 MB at any size
        init_whitening(model, (x for index in picked.sort().values.split(per_batch)
                               for x, _ in eval_batches(data.train.subset(index), data.mean, data.std, per_batch,
                                                        data_cfg, torch.device("cpu"), workers=0)))
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def wrap(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    """What the loop runs: under torchrun DistributedDataParallel (its gradients summed across ranks), compiled
    with --compile. DDP syncs the parameters that train when it is built: fit wraps again when that set changes
    (the whitening bias stops, a frozen body starts), rather than searching every step for unused ones."""
    net = model
    if rt.ranks.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return torch.compile(net) if cfg.compile else net


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers (its state_dict has the plain names)."""
    while isinstance(net, torch.nn.parallel.DistributedDataParallel) or hasattr(net, "_orig_mod"):
        net = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net._orig_mod
    return net


def freeze_body(model: torch.nn.Module, frozen: bool) -> None:
    """Train only the classifier head (timm backbones) while frozen; BatchNorm statistics keep adapting."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad = not frozen


def fit(model, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig, rt: Runtime, on_epoch=None, on_best=None,
        last: Path | None = None, last_extra: dict | None = None, resumed: dict | None = None) -> FitState:
    """Train, evaluating on validation after each epoch and keeping the best weights; Ctrl-C stops cleanly.

    After each epoch rank 0 calls on_best(epoch, metrics) if the epoch improved, then writes the `last` checkpoint
    (resume.py; with last_extra in it), then calls on_epoch(epoch, metrics). In that order a kill between two of
    them loses nothing: before the `last` write, --resume redoes the epoch (and writes its best weights again);
    after it, the epoch was not logged yet, so it is logged once. `resumed` (what resume.load_last read) continues
    a run after its last finished epoch. Under torchrun every rank trains on its shard of each global batch and
    evaluates its shard of the validation split; gradients and counts are summed over the ranks.
    """
    ranks = rt.ranks
    loader = train_loader(data.train, data_cfg, cfg, data.mean, data.std, rt.device, (ranks.rank, ranks.world))
    # fp16 needs loss scaling against gradient underflow; with bf16 or fp32 the scaler does nothing.
    state = FitState(total_steps=total_steps(len(data.train), cfg.batch_size, cfg.epochs), patience_left=cfg.patience,
                     scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16))
    if cfg.max_steps:
        state.total_steps = min(state.total_steps, cfg.max_steps)
    weights = None
    if cfg.balance == "weights":
        weights = class_weights(data.train.labels, len(data.classes)).to(rt.device)
        tqdm.write("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(data.classes, weights.tolist())))
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, state.total_steps, cfg))
    whiten = whitening_layer(model)
    can_freeze = cfg.freeze_epochs > 0 and hasattr(model, "get_classifier")
    net, wrapped_for = None, None
    epochs = math.ceil(state.total_steps / len(loader))
    first_epoch = 0
    if resumed is not None:
        first_epoch = restore(resumed, model, optimizer, scheduler, state, loader, rt.device)
        tqdm.write(f"resumed after epoch {first_epoch} of {epochs} (step {state.step}) from {last}")
        if state.stopped:  # the run had stopped early: nothing left to train
            first_epoch = epochs
    eval_size = eval_batch_size(model, data_cfg.image_size)
    val_split = data.val.subset(torch.arange(ranks.rank, len(data.val), ranks.world)) if ranks.enabled else data.val
    sampler = getattr(loader, "sampler", None)
    start = time.perf_counter() - (state.history[-1]["elapsed_s"] if state.history else 0.0)
    try:
        state.saved_epochs = first_epoch
        for epoch in range(first_epoch, epochs):
            if whiten is not None:
                whiten.bias.requires_grad = epoch < cfg.whiten_bias_epochs
            if can_freeze:
                freeze_body(model, epoch < cfg.freeze_epochs)
            trainable = [p.requires_grad for p in model.parameters()]
            if net is None or (ranks.enabled and trainable != wrapped_for):
                net, wrapped_for = wrap(model, cfg, rt), trainable
            if isinstance(sampler, torch.utils.data.DistributedSampler):
                sampler.set_epoch(epoch)
            metrics = train_one_epoch(net, loader, optimizer, scheduler, state, epoch, epochs, cfg, rt, weights)
            # under DDP the bare model: DDP's forward would broadcast BatchNorm buffers, a collective that every
            # rank must join (they are in sync already: DDP broadcasts them before every training step)
            val = evaluate(model if ranks.enabled else net,
                           eval_batches(val_split, data.mean, data.std, eval_size, data_cfg, rt.device),
                           len(data.classes), rt, across_ranks=ranks.enabled)
            metrics.update(val_loss=val["loss"], val_acc=val["acc"], val_macro_f1=val["macro_f1"],
                           epoch=epoch + 1, elapsed_s=time.perf_counter() - start)
            state.history.append(metrics)
            score = val[cfg.select_metric]
            improved = score > state.best_score
            if improved:
                state.best_score, state.best_epoch = score, epoch + 1
                state.best_state = copy.deepcopy(model.state_dict())
                state.patience_left = cfg.patience
            else:
                state.patience_left -= 1
            tqdm.write(f"epoch {epoch + 1:>3}/{epochs}  train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.4f}"
                       f"  val loss {val['loss']:.4f} acc {val['acc']:.4f} macro-F1 {val['macro_f1']:.4f}{' *' if improved else '  '}"
                       f"  lr {metrics['learning_rate']:.2e}  {metrics['epoch_seconds']:.1f}s  {metrics['images_per_s']:.0f} img/s"
                       f"  data {100 * metrics['data_share']:.1f}%")
            if cfg.patience and state.patience_left <= 0:
                state.stopped = f"early stop: no better validation {cfg.select_metric} for {cfg.patience} epochs"
            if on_best and improved and ranks.main:
                on_best(epoch + 1, metrics)
            if ranks.main and last is not None:
                save_last(last, epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), scaler=state.scaler.state_dict(), step=state.step,
                          lookahead=state.lookahead.slow if state.lookahead else None, history=state.history,
                          best_score=state.best_score, best_epoch=state.best_epoch, best_state=state.best_state,
                          patience_left=state.patience_left, stopped=state.stopped, rng=rng_states(loader),
                          **(last_extra or {}))
                state.saved_epochs = epoch + 1
            if on_epoch and ranks.main:
                on_epoch(epoch + 1, metrics)
            if state.stopped:
                break
    except KeyboardInterrupt:
        state.stopped = "interrupted"
    except NonFiniteLoss as e:
        state.stopped, state.diverged = f"{e}: training diverged (a lower --lr, or --precision fp32, may help)", True
    if state.stopped and not state.diverged:  # main() reports a divergence as the error it is
        tqdm.write(state.stopped)
    if can_freeze:
        freeze_body(model, False)
    return state


def restore(saved: dict, model, optimizer, scheduler, state: FitState, loader, device: torch.device) -> int:
    """Put a last checkpoint's training state back; returns the number of epochs it had finished."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.step, state.history, state.patience_left = saved["step"], saved["history"], saved["patience_left"]
    state.best_score, state.best_epoch, state.best_state = saved["best_score"], saved["best_epoch"], saved["best_state"]
    state.stopped = saved["stopped"]
    if saved["lookahead"] is not None:
        state.lookahead = Lookahead({k: v.to(device) for k, v in saved["lookahead"].items()})
    restore_rng(saved["rng"], loader)
    return saved["epoch"]


# ---------------------------------------------------------------- reporting

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


class Tracker:
    """MLflow logging, or nothing when disabled; every call is a no-op without an active run."""

    def __init__(self, enabled: bool, experiment: str, run_name: str, parent_run: str = "", run_id: str = ""):
        """A new run, or with run_id the existing run reopened (a resumed training run)."""
        self.run = None
        self.mlflow = None
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=(REPO / "mlruns" / experiment.replace("/", "_")).as_uri())
        mlflow.set_experiment(experiment)
        # system metrics (CPU, memory, disk, GPU when present) sampled by MLflow in the background
        if run_id:
            try:
                self.run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
            except mlflow.exceptions.MlflowException as e:
                raise ResumeError(f"cannot reopen MLflow run {run_id} in {mlflow.get_tracking_uri()}: {e.message}. "
                                  "Set MLFLOW_TRACKING_URI as it was for that run") from None
        else:
            self.run = mlflow.start_run(run_name=run_name or None, parent_run_id=parent_run or None, log_system_metrics=True)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def __getattr__(self, name):
        # log_params, log_metrics, set_tags, log_artifact ... forwarded to mlflow while a run is open.
        if self.run is None:
            return lambda *args, **kwargs: None
        return getattr(self.mlflow, name)

    def end(self, status: str = "FINISHED") -> None:
        if self.run is not None:
            self.mlflow.end_run(status=status)
            self.run = None


# What the logged pyfunc model (mlflow_model.py) imports, copied into the model so it loads without this repo.
MODEL_CODE = ("mlflow_model.py", "predictor.py", "checkpoint.py", "atomic.py", "config.py", "model.py", "transforms.py",
              "decode.py")


def log_model(tracker: Tracker, checkpoint: Path, meta: dict):
    """The checkpoint as an MLflow pyfunc model that takes base64 image files (mlflow_model.py, logged as code, no
    pickles); returns the ModelInfo (its model_uri is what the registry registers), or None without a run."""
    if tracker.run is None:
        return None
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L" if meta["channels"] == 1 else "RGB", (meta["image_size"],) * 2).save(buf, "PNG")
    example = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("long", "class_index"), ColSpec("string", "class_name"), ColSpec("double", "confidence"),
                        ColSpec(Array("double"), "probabilities")]))
    versions = {name: importlib.metadata.version(name) for name in ("torch", "numpy", "pillow", "pandas", "timm", "tqdm")}
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(REPO / "mlflow_model.py"), artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(REPO / f) for f in MODEL_CODE[1:]], signature=signature, input_example=example,
        pip_requirements=[f"{name}=={version.split('+')[0]}" for name, version in versions.items()],
    )


def register(tracker: Tracker, model_uri: str, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig, score: float) -> None:
    """A registry version for this run's model; the champion alias moves to it only when it is better (registry.py).
    A registry that fails leaves the finished run and its checkpoint as they are, with a warning."""
    name = cfg.model_name or default_name(data_cfg.dataset, data_cfg.data_dir)
    try:
        result = register_and_promote(model_uri, name, metric=cfg.select_metric, score=score,
                                      split=split_fingerprint(data, data_cfg.data_dir))
    except Exception as e:  # a tracking server that refuses or is gone: the run itself is complete
        print(f"warning: could not register the model as {name!r}: {e.__class__.__name__}: {e}", file=sys.stderr)
        tracker.set_tag("registry_error", str(e)[:500])
        return
    tracker.set_tags({"registered_model": name, "model_version": result.version, "champion": str(result.promoted),
                      "champion_decision": result.reason})
    if result.previous_score is not None:
        tracker.log_metric("champion_previous_score", result.previous_score)
    state = f"now {CHAMPION}" if result.promoted else f"{CHAMPION} stays version {result.previous_version}"
    print(f"registered {name} version {result.version}, {state}: {result.reason}")


def preflight(cfg: TrainConfig) -> None:
    """What would otherwise fail after the training, checked before it: the output folder takes files, and a
    tracking server named by MLFLOW_TRACKING_URI answers."""
    folder = Path(cfg.out).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"--out {cfg.out}: cannot write in {folder}: {e.strerror or e}") from None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if cfg.mlflow and urlparse(uri).scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # a server answered (behind auth or a proxy, say): MLflow will say more if it is the wrong one
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, unresolvable, not HTTP at all
            reason = getattr(e, "reason", e)
            raise ConfigError(f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers ({reason}). Start it (make "
                              "mlflow-server), unset MLFLOW_TRACKING_URI to log to mlflow.db, or pass --no-mlflow") from None


def configure(argv: list[str] | None) -> tuple[DataConfig, ModelConfig, TrainConfig, list[str]]:
    """The three configs from the command line; for a folder without --preset, settings chosen from its images
    (autoconfig) fill in whatever was not given, and on a CPU the from-scratch net takes a smaller batch. Returns the
    reasons for those choices too."""
    parser, values = parse_values(argv)
    explicit = {k: v for k, v in values.items() if v is not None}
    cuda = torch.cuda.is_available() and explicit.get("device", "auto") != "cpu"
    chosen, reasons = {}, []
    if values.get("dataset") == "folder" and values.get("preset") in (None, "auto"):
        stats = summarize_folder(Path(values.get("data_dir") or DataConfig.data_dir))
        chosen, reasons = autoconfig.choose(stats, explicit, cuda=cuda)
    try:
        data_cfg, model_cfg, train_cfg = resolve(values, chosen)
        device_chosen, why = autoconfig.device_batch(model_cfg.arch, train_cfg.optimizer, train_cfg.batch_size,
                                                     {**chosen, **explicit}, cuda)
        return data_cfg, model_cfg, dataclasses.replace(train_cfg, **device_chosen), reasons + why
    except ConfigError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    try:
        data_cfg, model_cfg, train_cfg, reasons = configure(argv)
        ranks = distributed.from_env()
        distributed.check_restarts(ranks)
        if train_cfg.batch_size % ranks.world:
            raise ConfigError(f"--batch-size {train_cfg.batch_size} is the global batch: with {ranks.world} processes it "
                              f"must be a multiple of {ranks.world}")
        if not ranks.main:  # rank 0 speaks for all; the others still print their errors
            sys.stdout = open(os.devnull, "w")
            tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
        else:
            preflight(train_cfg)
        torch.set_num_threads(train_cfg.threads or max(1, available_cores() // ranks.local_world))
        rt = runtime(train_cfg, ranks)
        if reasons:
            print("settings chosen for this data and device (a flag overrides any of them):\n  " + "\n  ".join(reasons))
        if ranks.local_rank != 0:
            distributed.barrier()  # each machine's first process loads first: a CIFAR-10 download happens once
        data = load_dataset(data_cfg)
        if ranks.local_rank == 0:
            distributed.barrier()
        if len(data.val) < ranks.world:
            raise ConfigError(f"the validation split has {len(data.val)} images, fewer than the {ranks.world} processes: "
                              "use fewer processes or a larger --val-fraction")
        model = setup(model_cfg, train_cfg, data, data_cfg, rt)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"data: {data.source}  train {len(data.train)}  val {len(data.val)}"
              f"  test {len(data.test) if data.test else 0}  classes {len(data.classes)}"
              f"  {data_cfg.image_size}px x {data_cfg.channels} channel(s), {data_cfg.resize}")
        widths = f" widths {list(model_cfg.widths)}" if model_cfg.arch in SCRATCH_ARCHS else ""
        print(f"model: {model_cfg.arch}{widths}  {n_params / 1e6:.2f}M params  "
              f"device {rt.device}  precision {rt.dtype or 'fp32'}{' channels_last' if rt.channels_last else ''}"
              f"  threads {torch.get_num_threads()}" + (f"  x {ranks.world} processes" if ranks.enabled else ""))
        settings = flat_params(data_cfg, model_cfg, train_cfg)
        # what a resumed run must share with the saved one: every setting, and the numerics "auto" resolved to
        same = {**settings, "numerics": f"{rt.device.type} {rt.dtype or 'fp32'}"}
        last = last_path(train_cfg.out)
        resumed = distributed.share(load_last(last, same) if train_cfg.resume and ranks.main else None)
        tracker = Tracker(train_cfg.mlflow and ranks.main, train_cfg.experiment,
                          train_cfg.run_name or f"{train_cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
                          train_cfg.parent_run, run_id=(resumed or {}).get("mlflow_run_id") or "")
    except (DataError, ConfigError, WeightsError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started: nothing was written", file=sys.stderr)
        return 130
    status = "FAILED"
    saved = []  # epochs whose weights were written to train_cfg.out
    try:
        if not (resumed or {}).get("mlflow_run_id"):  # a new run (a reopened one has all this already)
            tracker.log_params(settings)
            tracker.set_tags({"git_commit": git_commit(), "device": str(rt.device), "torch_version": torch.__version__,
                              "precision": str(rt.dtype or "fp32"), "preset": train_cfg.preset,
                              "data_source": data.source, "params": n_params, "processes": ranks.world,
                              "chosen_settings": "; ".join(reasons) or "none (the preset as it is, or all given)"})
        if resumed is not None:
            log_missing_epochs(tracker, resumed["history"])
            earlier = tracker.run.data.tags.get("resumed") if tracker.run else None
            tracker.set_tag("resumed", ", ".join(filter(None, [earlier, f"after epoch {resumed['epoch']}"])))
        ckpt_info = dict(model_config=model_cfg, classes=data.classes, mean=data.mean, std=data.std,
                         image_size=data_cfg.image_size, channels=data_cfg.channels, resize=data_cfg.resize,
                         mlflow_run_id=tracker.run_id,
                         extra={"train_config": flat_params(train_cfg), "data_config": flat_params(data_cfg)})
        start = time.perf_counter() - (resumed["history"][-1]["elapsed_s"] if resumed and resumed["history"] else 0.0)

        def on_best(epoch, metrics):  # the best model so far is on disk at every moment of the run
            save_checkpoint(train_cfg.out, model, metrics={"val_acc": metrics["val_acc"],
                                                           "val_macro_f1": metrics["val_macro_f1"], "epoch": epoch},
                            **ckpt_info)
            saved.append(epoch)  # after the write: an interrupted write leaves the previous file

        def on_epoch(epoch, metrics):
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

        state = fit(model, data, data_cfg, train_cfg, rt, on_epoch, on_best, last=last, resumed=resumed,
                    last_extra={"mlflow_run_id": tracker.run_id, "settings": same})
        train_seconds = time.perf_counter() - start
        if state.diverged:
            kept = (f"the best checkpoint so far (epoch {state.best_epoch}) stays at {train_cfg.out}"
                    if state.best_state is not None else "no epoch finished, so no checkpoint was written")
            print(f"error: {state.stopped}; {kept}", file=sys.stderr)
            tracker.set_tags({"stopped": state.stopped})
            return 1
        if state.best_state is None:
            print("error: stopped before the first epoch finished; nothing to save", file=sys.stderr)
            status = "KILLED"
            return 130
        if not ranks.main:  # rank 0 reports, saves and logs the model alone
            status = "KILLED" if state.stopped == "interrupted" else "FINISHED"
            return 130 if state.stopped == "interrupted" else 0
        model.load_state_dict(state.best_state)
        report(model, data, data_cfg, train_cfg, rt, state, tracker, ckpt_info, train_seconds)
        if state.stopped == "interrupted":
            status = "KILLED"
            print(f"to go on after epoch {state.saved_epochs}, run the same command with --resume", file=sys.stderr)
        else:
            status = "FINISHED"
            last.unlink(missing_ok=True)  # the run is complete: a later --resume starts a new one
        return 0
    except DataError as e:  # an image that fails to decode mid-run, when streaming from a folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside an epoch (those stop training and go on to the report): stop here
        status = "KILLED"
        kept = f"the checkpoint of epoch {saved[-1]} stays at {train_cfg.out}" if saved else "no checkpoint was written"
        print(f"interrupted: {kept}; what was logged stays in the MLflow run, marked KILLED", file=sys.stderr)
        return 130
    finally:
        tracker.end(status)
        distributed.leave()


def log_missing_epochs(tracker: "Tracker", history: list[dict]) -> None:
    """Epochs a killed run had finished but not yet logged (it dies between writing the last checkpoint and
    logging): logged now, so that every epoch is in the run exactly once."""
    if tracker.run is None:
        return
    logged = {m.step for m in tracker.mlflow.MlflowClient().get_metric_history(tracker.run_id, "val_acc")}
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))


def metric_names(classes: list[str]) -> list[str]:
    """Class names as MLflow accepts them in metric names (letters, digits, _ - . / and space); names that come out
    alike ("a:b" and "a?b") get their class index appended, so no class overwrites another's metrics."""
    names = [re.sub(r"[^\w\-./ ]", "_", name) for name in classes]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def confident_mistakes(val: dict, split: ImageSet, classes: list[str], count: int = 16):
    """The validation images predicted wrong with the highest confidence: (images as HxW(xC) uint8 arrays at most
    128 px, true names, predicted names, confidences), for report.plot_mistakes."""
    wrong = (val["predicted"] != split.labels).nonzero().squeeze(1)
    picked = wrong[val["confidence"][wrong].argsort(descending=True)][:count].tolist()
    images = []
    for i in picked:
        if split.images is not None:
            image = split.images[i].permute(1, 2, 0).numpy()
        else:
            thumbnail = open_image(split.paths[i])
            thumbnail.thumbnail((128, 128))
            image = np.asarray(thumbnail.convert("RGB"))
        images.append(image[..., 0] if image.shape[-1] == 1 else image)
    return (images, [classes[int(split.labels[i])] for i in picked], [classes[int(val["predicted"][i])] for i in picked],
            [float(val["confidence"][i]) for i in picked])


def report(model, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig, rt: Runtime, state: FitState,
           tracker: Tracker, ckpt_info: dict, train_seconds: float) -> None:
    """Final evaluation of the best weights; checkpoint, plots, tables and model logged."""
    size = eval_batch_size(model, data_cfg.image_size)

    def batches(split, name: str):
        return tqdm(eval_batches(split, data.mean, data.std, size, data_cfg, rt.device), desc=f"evaluate {name}",
                    unit="batch", total=math.ceil(len(split) / size), leave=False)

    val = evaluate(model, batches(data.val, "val"), len(data.classes), rt, per_image=True)
    final = {"best_epoch": state.best_epoch, "val_acc": val["acc"], "val_macro_f1": val["macro_f1"],
             "val_loss": val["loss"], "train_seconds": train_seconds}
    line = f"best epoch {state.best_epoch} (by {cfg.select_metric}): val acc {val['acc']:.4f} macro-F1 {val['macro_f1']:.4f}"
    if cfg.tta:
        tta = evaluate(model, batches(data.val, "val with TTA"), len(data.classes), rt, tta=cfg.tta)
        final.update(val_acc_tta=tta["acc"], val_macro_f1_tta=tta["macro_f1"])
        line += f"  with TTA level {cfg.tta}: {tta['acc']:.4f}"
    if data.test is not None:  # reported, never used to choose anything; served without TTA, so measured without
        test = evaluate(model, batches(data.test, "test"), len(data.classes), rt)
        final.update(test_acc=test["acc"], test_macro_f1=test["macro_f1"], test_loss=test["loss"])
        line += f"  test acc {test['acc']:.4f} macro-F1 {test['macro_f1']:.4f}"
    print(line + f"  ({train_seconds:.0f}s training)")
    print(f"{'class':<24} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>7}")
    for i, name in enumerate(data.classes):
        print(f"{name[:24]:<24} {val['precision'][i]:>9.3f} {val['recall'][i]:>7.3f} {val['f1'][i]:>6.3f} {val['support'][i]:>7}")

    history = [{k: float(v) for k, v in h.items()} for h in state.history]
    path = save_checkpoint(cfg.out, model, metrics=final, **{**ckpt_info, "extra": {**ckpt_info["extra"], "history": history}})
    print(f"saved {path}")
    if state.stopped == "interrupted":  # the end-of-run logging waits for the finished run (--resume): logged once
        print("stopped early: the plots, the MLflow model and its registration are logged when the run finishes")
        return
    # End-of-run values under their own names (per-epoch val_acc etc. keep their curves), at the best epoch's step.
    tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=state.best_epoch)
    if tracker.run is None:
        return
    tracker.log_metrics({f"val_{kind}_{name}": val[kind][i] for i, name in enumerate(metric_names(data.classes))
                         for kind in ("precision", "recall", "f1")}, step=state.best_epoch)
    tracker.log_table({"class": data.classes, "precision": [round(v, 4) for v in val["precision"]],
                       "recall": [round(v, 4) for v in val["recall"]], "f1": [round(v, 4) for v in val["f1"]],
                       "support": val["support"]}, artifact_file="per_class_metrics.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot_confusion(val["confusion"], data.classes, Path(tmp) / "confusion_matrix.png")
        plot_confusion(val["confusion"], data.classes, Path(tmp) / "confusion_matrix_normalized.png", normalized=True)
        plot_curves(state.history, Path(tmp) / "curves.png")
        plot_class_scores(data.classes, val["precision"], val["recall"], Path(tmp) / "per_class.png")
        plot_mistakes(*confident_mistakes(val, data.val, data.classes), Path(tmp) / "mistakes.png")
        for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "curves.png", "per_class.png", "mistakes.png"):
            tracker.log_artifact(str(Path(tmp) / name))
    tracker.log_artifact(str(path), artifact_path="checkpoint")
    print("logging the model to MLflow (pyfunc with its code and checkpoint)...", flush=True)
    try:
        logged = log_model(tracker, path, {"channels": data_cfg.channels, "image_size": data_cfg.image_size})
    except Exception as e:  # the checkpoint and everything above are saved and logged; the run stays a success
        print(f"warning: could not log the MLflow model (the checkpoint {path} is saved and logged): "
              f"{e.__class__.__name__}: {str(e)[:300]}", file=sys.stderr)
        tracker.set_tag("model_logging_error", str(e)[:500])
        logged = None
    if cfg.register and logged is not None:
        register(tracker, logged.model_uri, data, data_cfg, cfg, final[f"val_{cfg.select_metric}"])
    print(f"mlflow run {tracker.run_id} ({tracker.mlflow.get_tracking_uri()})")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # between main's own handlers (while importing, say)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
