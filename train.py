"""Train: fit a classifier on the configured data, log the run to MLflow, keep the best model in models/cnn.pt.

    python train.py --help            every flag, generated from config.py
    python train.py --preset fast     the default: airbench-style net, ~93% on CIFAR-10
    python train.py --smoke           a few batches through every stage
"""

from __future__ import annotations

import copy
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from budget import PLAN_AFTER_STEPS, Budget
from checkpoint import check_writable, save_checkpoint
from config import ConfigError, DataConfig, ModelConfig, TrainConfig, flat_params, parse_duration
from data import DataError, Dataset, eval_batches, load_dataset, total_steps, train_loader
from evaluate import eval_batch_size, evaluate
from finish import final_report
from model import SCRATCH_ARCHS, build_model, early_layers, hold_statistics, init_whitening, set_trainable, whitening_layer
from optim import Lookahead, lr_factor, make_optimizer
from pretrained import WeightsError, load_pretrained, normalization
from resume import ResumeError, last_path, load_last, restore_rng, rng_states, save_last
from runtime import Runtime, runtime, unwrap
from scores import class_weights
from settings import decide
from tracking import Tracker, check_tracking_server, git_commit, log_missing_epochs
from transforms import progressive_size, tta_views

EMA_WARMUP_POWER = 3 / 4  # timm's advice for runs of well under a million steps: decay 1 - (1 + step)^-3/4
LOOKAHEAD_START_EPOCH = 3  # let the weights move freely first; averaging early only slows learning
LOOKAHEAD_EVERY = 5


@dataclass
class FitState:
    step: int = 0
    total_steps: int = 0
    lookahead: Lookahead | None = None
    ema: torch.nn.Module | None = None  # timm's ModelEmaV3 (--ema): the averaged weights in .module
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
    # (score, epoch, weights) of the best --average-best epochs; not in the last checkpoint: a resumed run averages
    # the epochs it trained itself
    top: list = field(default_factory=list)


MAX_SKIPPED_FP16_STEPS = 10
LOOK_EVERY = {"cpu": 1}  # steps between reads of the loss: every step on the CPU, else 10


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite: the weights are no longer trustworthy."""


def train_one_epoch(model, loader, optimizer, scheduler, state: FitState, epoch: int, epochs: int,
                    cfg: TrainConfig, rt: Runtime, weights: torch.Tensor | None = None, fixed=(), plan=None,
                    size: int = 0) -> dict:
    """One pass over the loader (or up to state.total_steps), its batches resized to `size` when given (progressive
    resizing). `plan`, when given, is called once, with the seconds per step timed over this epoch's first steps and
    the steps done, and may lower state.total_steps (a time budget)."""
    model.train()
    hold_statistics(fixed)
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
    steady_from = None  # when step 2 began: the first steps warm the kernels up
    i = 0
    while i < steps:
        t0 = time.perf_counter()
        if i == 2:
            steady_from = t0
        elif plan is not None and i == 2 + PLAN_AFTER_STEPS:
            plan((t0 - steady_from) / PLAN_AFTER_STEPS, i)
            plan, steps = None, min(steps, state.total_steps - state.step + i)
            bar.total = steps
            bar.refresh()
        x, y = next(batches)
        x, y = rt.prepare(x.to(rt.device, non_blocking=True)), y.to(rt.device, non_blocking=True)
        data_seconds += time.perf_counter() - t0
        if size and x.shape[-1] != size:
            x = rt.prepare(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))

        with rt.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=weights, label_smoothing=smoothing, reduction=reduction)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss * grad_scale if grad_scale != 1 else loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.step += 1
        if state.ema is not None:
            state.ema.update(unwrap(model), step=state.step)
        i += 1

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
        if i % look_every and i < steps:
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
    end = time.perf_counter()
    seconds = end - start
    step_seconds = (end - steady_from) / (i - 2) if i > 2 else seconds / max(i, 1)  # after the warm-up steps
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "epoch_seconds": seconds,
            "step_seconds": step_seconds,
            "images_per_s": seen / seconds, "data_share": data_seconds / seconds, "learning_rate": max(scheduler.get_last_lr())}


def check_progressive(model, data_cfg: DataConfig, start: float, rt: Runtime) -> None:
    """--progressive: the net must take the smallest size the schedule trains at (a classifier sized for one input,
    as --arch baseline's, cannot): a clear error before training rather than a crash in its first epoch."""
    smallest = progressive_size(0, 2, data_cfg.image_size, start)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, data_cfg.channels, smallest, smallest, device=rt.device))
    except RuntimeError as e:
        raise ConfigError(f"--progressive {start}: this net cannot take the {smallest}px images its first epochs would "
                          f"train at ({str(e).splitlines()[0][:150]}); give a larger --progressive, or none") from None


def setup(model_cfg: ModelConfig, train_cfg: TrainConfig, data: Dataset, data_cfg: DataConfig, rt: Runtime):
    """The seeded model on its device (the same on every rank).

    A pretrained backbone brings its own normalization, which replaces the dataset's (data.mean, data.std).
    """
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, num_classes=len(data.classes), image_size=data_cfg.image_size, in_chans=data_cfg.channels)
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


def loss_weights(data: Dataset, cfg: TrainConfig, device: torch.device) -> torch.Tensor | None:
    """Per-class weights of the loss with --balance weights (printed), else None."""
    if cfg.balance != "weights":
        return None
    weights = class_weights(data.train.labels, len(data.classes)).to(device)
    tqdm.write("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(data.classes, weights.tolist())))
    return weights


def fit(model, data: Dataset, data_cfg: DataConfig, cfg: TrainConfig, rt: Runtime, on_epoch=None, on_best=None,
        last: Path | None = None, last_extra: dict | None = None, resumed: dict | None = None) -> FitState:
    """Train, evaluating on validation after each epoch and keeping the best weights; Ctrl-C stops cleanly.

    After each epoch rank 0 calls on_best(epoch, metrics, module holding the new best weights) if the epoch
    improved, then writes the `last` checkpoint (resume.py; with last_extra in it), then calls on_epoch(epoch,
    metrics). In that order a kill between two of them loses nothing: before the `last` write, --resume redoes the
    epoch (and writes its best weights again); after it, the epoch was not logged yet, so it is logged once.
    `resumed` (what resume.load_last read) continues a run after its last finished epoch. Under torchrun every rank
    trains on its shard of each global batch and evaluates its shard of the validation split; gradients and counts
    are summed over the ranks.
    """
    ranks = rt.ranks
    loader = train_loader(data.train, data_cfg, cfg.batch_size, cfg.seed, data.mean, data.std, rt.device,
                          (ranks.rank, ranks.world), oversample=cfg.balance == "sample")
    # fp16 needs loss scaling against gradient underflow; with bf16 or fp32 the scaler does nothing.
    state = FitState(total_steps=total_steps(len(data.train), cfg.batch_size, cfg.epochs), patience_left=cfg.patience,
                     scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16))
    if cfg.max_steps:
        state.total_steps = min(state.total_steps, cfg.max_steps)
    most_steps = state.total_steps  # what the epochs allow; a time budget only ever lowers it
    weights = loss_weights(data, cfg, rt.device)
    fixed = early_layers(model, cfg.fixed_stages)  # out of the optimizer: built after they stop needing gradients
    if fixed:
        set_trainable(model, False, fixed)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, state.total_steps, cfg))
    if cfg.ema:
        from timm.utils import ModelEmaV3
        state.ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True, warmup_power=EMA_WARMUP_POWER)
    whiten = whitening_layer(model)
    can_freeze = cfg.freeze_epochs > 0 and hasattr(model, "get_classifier")
    net, wrapped_for = None, None
    epochs = math.ceil(state.total_steps / len(loader))
    first_epoch = 0
    if resumed is not None:
        first_epoch = restore(resumed, model, optimizer, scheduler, state, loader, rt.device)
        epochs = math.ceil(state.total_steps / len(loader))  # as a time budget may have left it
        tqdm.write(f"resumed after epoch {first_epoch} of {epochs} (step {state.step}) from {last}")
        if state.stopped:  # the run had stopped early: nothing left to train
            first_epoch = epochs
    eval_size = eval_batch_size(model, data_cfg.image_size, rt.device)
    val_split = data.val.subset(torch.arange(ranks.rank, len(data.val), ranks.world)) if ranks.enabled else data.val

    def validate(m) -> dict:  # this rank's shard of validation, summed over the ranks
        return evaluate(m, eval_batches(val_split, data.mean, data.std, eval_size, data_cfg, rt.device),
                        len(data.classes), rt, across_ranks=ranks.enabled)

    sampler = getattr(loader, "sampler", None)
    start = time.perf_counter() - (state.history[-1]["elapsed_s"] if state.history else 0.0)
    budget = time_budget(cfg, data, start, ranks.world)
    whole_from = math.ceil(cfg.freeze_epochs) if can_freeze else 0  # the first epoch that trains the whole network
    planned = False  # from whole-network steps (head-only ones are faster)
    eval_seconds, bookkeeping = None, 0.0  # of the last epoch: its validation pass; its checkpoints and logging

    def replan(step_seconds: float, done: int, per_epoch: float, eval_s: float, announce: bool = False) -> None:
        before = state.total_steps
        fits = budget.steps(time.perf_counter(), step_seconds, len(loader), per_epoch, eval_s, done)
        state.total_steps = distributed.share(min(before, most_steps, state.step + fits))  # rank 0's plan
        if announce or (planned and state.total_steps < before):
            tqdm.write(f"time budget {cfg.time_budget}: {state.total_steps / len(loader):.1f} of "
                       f"{most_steps / len(loader):.1f} epochs fit ({step_seconds:.2f}s per step, {per_epoch:.0f}s per "
                       f"epoch beside its steps, about {budget.final_seconds(eval_s):.0f}s for the final report)")

    def first_plan(step_seconds: float, done: int) -> None:  # a validation pass: about a third of a step per image
        nonlocal planned
        eval_s = eval_seconds if eval_seconds is not None else len(data.val) * step_seconds / cfg.batch_size / 3
        replan(step_seconds, done, eval_s + bookkeeping, eval_s, announce=True)
        planned = True

    try:
        state.saved_epochs = first_epoch
        epoch = first_epoch
        while epoch < (epochs := math.ceil(state.total_steps / len(loader))):
            if whiten is not None:
                whiten.bias.requires_grad = epoch < cfg.whiten_bias_epochs
            if can_freeze or fixed:
                set_trainable(model, can_freeze and epoch < cfg.freeze_epochs, fixed)
            trainable = [p.requires_grad for p in model.parameters()]
            if net is None or (ranks.enabled and trainable != wrapped_for):
                net, wrapped_for = rt.wrap(model, cfg.compile), trainable
            if isinstance(sampler, torch.utils.data.DistributedSampler):
                sampler.set_epoch(epoch)
            size = progressive_size(epoch, epochs, data_cfg.image_size, cfg.progressive)
            to_full = (data_cfg.image_size / size) ** 2  # a budget plans with full-size steps: what later epochs cost
            plan = (lambda s, done: first_plan(s * to_full, done)) if budget and not planned and epoch >= whole_from else None
            metrics = train_one_epoch(net, loader, optimizer, scheduler, state, epoch, epochs, cfg, rt, weights, fixed,
                                      plan, size)
            eval_start = time.perf_counter()
            # under DDP the bare model: DDP's forward would broadcast BatchNorm buffers, a collective that every
            # rank must join (they are in sync already: DDP broadcasts them before every training step)
            scored = state.ema.module if state.ema is not None else model  # the weights validation picks from
            val = validate(scored if ranks.enabled or state.ema is not None else net)
            eval_seconds = time.perf_counter() - eval_start
            metrics.update(val_loss=val["loss"], val_acc=val["acc"], val_macro_f1=val["macro_f1"],
                           epoch=epoch + 1, elapsed_s=time.perf_counter() - start, train_size=size)
            if budget:  # the plan, corrected by what this epoch took (or first made, after a short epoch)
                replan(metrics["step_seconds"] * to_full, 0, eval_seconds + bookkeeping, eval_seconds,
                       announce=not planned and epoch >= whole_from)
                planned = planned or epoch >= whole_from
                epochs = math.ceil(state.total_steps / len(loader))
            state.history.append(metrics)
            improved = keep_best(scored, state, val[cfg.select_metric], epoch + 1, cfg)
            tqdm.write(f"epoch {epoch + 1:>3}/{epochs}  train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.4f}"
                       f"  val loss {val['loss']:.4f} acc {val['acc']:.4f} macro-F1 {val['macro_f1']:.4f}{' *' if improved else '  '}"
                       f"  lr {metrics['learning_rate']:.2e}  {metrics['epoch_seconds']:.1f}s  {metrics['images_per_s']:.0f} img/s"
                       f"  data {100 * metrics['data_share']:.1f}%{f'  {size}px' if cfg.progressive else ''}")
            bookkeeping_start = time.perf_counter()
            if on_best and improved and ranks.main:
                on_best(epoch + 1, metrics, scored)
            if ranks.main and last is not None:
                save(last, epoch + 1, model, optimizer, scheduler, state, loader, last_extra)
            if on_epoch and ranks.main:
                on_epoch(epoch + 1, metrics)
            bookkeeping = time.perf_counter() - bookkeeping_start
            if state.stopped:
                break
            epoch += 1
    except KeyboardInterrupt:
        state.stopped = "interrupted"
    except NonFiniteLoss as e:
        state.stopped, state.diverged = f"{e}: training diverged (a lower --lr, or --precision fp32, may help)", True
    if state.stopped and not state.diverged:  # main() reports a divergence as the error it is
        tqdm.write(state.stopped)
    if len(state.top) > 1 and not state.diverged and state.stopped != "interrupted":
        val = try_average(model, state, validate, cfg.select_metric)
        if val is not None and on_best and ranks.main:
            on_best(state.best_epoch, {"val_acc": val["acc"], "val_macro_f1": val["macro_f1"]}, model)
    if can_freeze or fixed:
        set_trainable(model, False)
    return state


def time_budget(cfg: TrainConfig, data: Dataset, start: float, world: int) -> Budget | None:
    """The run's --time-budget, counted from `start`, with what its final report scores; None without one."""
    if not cfg.time_budget:
        return None
    views = len(tta_views(torch.zeros(1, 1, 2, 2), cfg.tta)) if cfg.tta else 0
    views += cfg.average_best > 1  # the averaged weights' validation pass
    test_share = (len(data.test) if data.test else 0) / max(1, len(data.val))
    return Budget(parse_duration(cfg.time_budget), start, views, test_share, world)


def average(states: list[dict]) -> dict:
    """The mean of several state dicts of one model (integer buffers, such as BatchNorm's step count, from the first)."""
    return {k: torch.stack([s[k] for s in states]).mean(0) if states[0][k].is_floating_point() else states[0][k]
            for k in states[0]}


def try_average(model, state: FitState, score, metric: str) -> dict | None:
    """Score the average of the best epochs' weights on validation; when it does at least as well as the best epoch
    alone, it becomes the best state (returns its validation scores), else None. Leaves the averaged weights loaded."""
    epochs = sorted(epoch for _, epoch, _ in state.top)
    model.load_state_dict(average([weights for _, _, weights in state.top]))
    val = score(model)
    better = val[metric] >= state.best_score
    tqdm.write(f"average of epochs {', '.join(map(str, epochs))}: val acc {val['acc']:.4f} macro-F1 {val['macro_f1']:.4f}"
               f" ({'kept' if better else 'not kept'}: best epoch {state.best_epoch} alone {metric} {state.best_score:.4f})")
    if not better:
        return None
    state.best_score, state.best_state = val[metric], copy.deepcopy(model.state_dict())
    return val


def keep_best(model, state: FitState, score: float, epoch: int, cfg: TrainConfig) -> bool:
    """Keep the weights of an epoch that beats the best score so far (returns whether it did); count down the
    patience otherwise, and stop when it runs out."""
    improved = score > state.best_score
    in_top = cfg.average_best > 1 and (len(state.top) < cfg.average_best or score > state.top[-1][0])
    weights = copy.deepcopy(model.state_dict()) if improved or in_top else None  # one copy serves both
    if in_top:
        state.top = sorted(state.top + [(score, epoch, weights)], key=lambda t: -t[0])[:cfg.average_best]
    if improved:
        state.best_score, state.best_epoch = score, epoch
        state.best_state = weights
        state.patience_left = cfg.patience
    else:
        state.patience_left -= 1
    if cfg.patience and state.patience_left <= 0:
        state.stopped = f"early stop: no better validation {cfg.select_metric} for {cfg.patience} epochs"
    return improved


def save(last: Path, epoch: int, model, optimizer, scheduler, state: FitState, loader, extra: dict | None) -> None:
    """The whole training state after an epoch, for --resume (restore puts it back)."""
    save_last(last, epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
              scheduler=scheduler.state_dict(), scaler=state.scaler.state_dict(), step=state.step,
              total_steps=state.total_steps, lookahead=state.lookahead.slow if state.lookahead else None, history=state.history,
              ema=state.ema.module.state_dict() if state.ema is not None else None,
              best_score=state.best_score, best_epoch=state.best_epoch, best_state=state.best_state,
              patience_left=state.patience_left, stopped=state.stopped, rng=rng_states(loader), **(extra or {}))
    state.saved_epochs = epoch


def restore(saved: dict, model, optimizer, scheduler, state: FitState, loader, device: torch.device) -> int:
    """Put a last checkpoint's training state back; returns the number of epochs it had finished."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.step, state.history, state.patience_left = saved["step"], saved["history"], saved["patience_left"]
    state.total_steps = min(state.total_steps, saved.get("total_steps", state.total_steps))  # as a time budget left it
    state.best_score, state.best_epoch, state.best_state = saved["best_score"], saved["best_epoch"], saved["best_state"]
    state.stopped = saved["stopped"]
    if state.ema is not None:  # the same --ema as the saved run (resume checks): its average was saved
        state.ema.module.load_state_dict(saved["ema"])
    if saved["lookahead"] is not None:
        state.lookahead = Lookahead({k: v.to(device) for k, v in saved["lookahead"].items()})
    restore_rng(saved["rng"], loader)
    return saved["epoch"]


@dataclass
class Run:
    """What main sets up before training: the settings, this process's place and device, the data, the model, and
    the MLflow run (with what a resumed run read from its last checkpoint)."""
    data_cfg: DataConfig
    model_cfg: ModelConfig
    cfg: TrainConfig
    reasons: list[str]
    rt: Runtime
    data: Dataset
    model: torch.nn.Module
    same: dict  # what a resumed run must share with the saved one
    resumed: dict | None
    tracker: Tracker


def prepare(argv: list[str] | None) -> Run:
    """Settings, processes, device, data and model, each checked, and the MLflow run opened (or reopened)."""
    data_cfg, model_cfg, cfg, reasons = decide(argv)
    ranks = distributed.from_env()
    distributed.check_restarts(ranks)
    if cfg.balance == "sample" and ranks.enabled and not data_cfg.in_memory:
        raise ConfigError("--balance sample under torchrun needs the training images in memory (--in-memory), "
                          "or use --balance weights")
    if cfg.batch_size % ranks.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch: with {ranks.world} processes it "
                          f"must be a multiple of {ranks.world}")
    if not ranks.main:  # rank 0 speaks for all; the others still print their errors
        sys.stdout = open(os.devnull, "w")
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
    else:  # what would otherwise fail after the training, checked before it
        check_writable(cfg.out)
        if cfg.mlflow:
            check_tracking_server()
    rt = runtime(cfg, ranks)
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
    if cfg.batch_size > len(data.train):
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(data.train)} training images: "
                          f"give a smaller --batch-size")
    model = setup(model_cfg, cfg, data, data_cfg, rt)
    if cfg.progressive:
        check_progressive(model, data_cfg, cfg.progressive, rt)
    describe(data, data_cfg, model, model_cfg, rt)
    # what a resumed run must share with the saved one: every setting, and the numerics "auto" resolved to
    same = {**flat_params(data_cfg, model_cfg, cfg), "numerics": f"{rt.device.type} {rt.dtype or 'fp32'}"}
    resumed = distributed.share(load_last(last_path(cfg.out), same) if cfg.resume and ranks.main else None)
    tracker = Tracker(cfg.mlflow and ranks.main, cfg.experiment,
                      cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
                      cfg.parent_run, run_id=(resumed or {}).get("mlflow_run_id") or "")
    return Run(data_cfg, model_cfg, cfg, reasons, rt, data, model, same, resumed, tracker)


def describe(data: Dataset, data_cfg: DataConfig, model, model_cfg: ModelConfig, rt: Runtime) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data: {data.source}  train {len(data.train)}  val {len(data.val)}"
          f"  test {len(data.test) if data.test else 0}  classes {len(data.classes)}"
          f"  {data_cfg.image_size}px x {data_cfg.channels} channel(s), {data_cfg.resize}")
    for line in data.checks:
        print(f"data check: {line}")
    widths = f" widths {list(model_cfg.widths)}" if model_cfg.arch in SCRATCH_ARCHS else ""
    print(f"model: {model_cfg.arch}{widths}  {n_params / 1e6:.2f}M params  "
          f"device {rt.device}  precision {rt.dtype or 'fp32'}{' channels_last' if rt.channels_last else ''}"
          f"  threads {torch.get_num_threads()}" + (f"  x {rt.ranks.world} processes" if rt.ranks.enabled else ""))


def log_start(run: Run) -> None:
    """A new run's settings and tags; a reopened run gets the epochs it had not logged yet and a 'resumed' tag."""
    tracker, resumed = run.tracker, run.resumed
    if not (resumed or {}).get("mlflow_run_id"):  # a new run (a reopened one has all this already)
        tracker.log_params(flat_params(run.data_cfg, run.model_cfg, run.cfg))
        tracker.set_tags({"git_commit": git_commit(), "device": str(run.rt.device), "torch_version": torch.__version__,
                          "precision": str(run.rt.dtype or "fp32"), "preset": run.cfg.preset,
                          "data_source": run.data.source, "params": sum(p.numel() for p in run.model.parameters()),
                          "processes": run.rt.ranks.world,
                          "chosen_settings": "; ".join(run.reasons) or "none (the preset as it is, or all given)"})
    if resumed is not None:
        log_missing_epochs(tracker, resumed["history"])
        earlier = tracker.tag("resumed")
        tracker.set_tags({"resumed": ", ".join(filter(None, [earlier, f"after epoch {resumed['epoch']}"]))})


def main(argv: list[str] | None = None) -> int:
    try:
        run = prepare(argv)
    except (DataError, ConfigError, WeightsError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started: nothing was written", file=sys.stderr)
        return 130
    cfg, data, model, tracker, resumed = run.cfg, run.data, run.model, run.tracker, run.resumed
    status = "FAILED"
    saved = []  # epochs whose weights were written to cfg.out
    try:
        log_start(run)
        ckpt_info = dict(model_config=run.model_cfg, classes=data.classes, mean=data.mean, std=data.std,
                         image_size=run.data_cfg.image_size, channels=run.data_cfg.channels, resize=run.data_cfg.resize,
                         mlflow_run_id=tracker.run_id,
                         extra={"train_config": flat_params(cfg), "data_config": flat_params(run.data_cfg)})
        start = time.perf_counter() - (resumed["history"][-1]["elapsed_s"] if resumed and resumed["history"] else 0.0)

        def on_best(epoch, metrics, best):  # the best weights so far (`best`) are on disk at every moment of the run
            save_checkpoint(cfg.out, best, metrics={"val_acc": metrics["val_acc"],
                                                     "val_macro_f1": metrics["val_macro_f1"], "epoch": epoch}, **ckpt_info)
            saved.append(epoch)  # after the write: an interrupted write leaves the previous file

        def on_epoch(epoch, metrics):
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

        last = last_path(cfg.out)
        state = fit(model, data, run.data_cfg, cfg, run.rt, on_epoch, on_best, last=last, resumed=resumed,
                    last_extra={"mlflow_run_id": tracker.run_id, "settings": run.same})
        train_seconds = time.perf_counter() - start
        if state.diverged:
            kept = (f"the best checkpoint so far (epoch {state.best_epoch}) stays at {cfg.out}"
                    if state.best_state is not None else "no epoch finished, so no checkpoint was written")
            print(f"error: {state.stopped}; {kept}", file=sys.stderr)
            tracker.set_tags({"stopped": state.stopped})
            return 1
        interrupted = state.stopped == "interrupted"
        if state.best_state is None:
            print("error: stopped before the first epoch finished; nothing to save", file=sys.stderr)
            status = "KILLED"
            return 130
        if run.rt.ranks.main:  # rank 0 reports, saves and logs the model alone
            model.load_state_dict(state.best_state)
            final_report(model, data, run.data_cfg, cfg, run.rt, tracker, ckpt_info, train_seconds, state.best_epoch,
                         state.history, interrupted)
        status = "KILLED" if interrupted else "FINISHED"
        # The others wait for rank 0's report, so no rank tears its gloo connections down while a peer still holds
        # them (a rank 1 that left first was once seen to abort at exit: "terminate called without an active
        # exception").
        distributed.barrier()
        if not run.rt.ranks.main:
            return 130 if interrupted else 0
        if interrupted:
            print(f"to go on after epoch {state.saved_epochs}, run the same command with --resume", file=sys.stderr)
        else:
            last.unlink(missing_ok=True)  # the run is complete: a later --resume starts a new one
        return 0
    except DataError as e:  # an image that fails to decode mid-run, when streaming from a folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside an epoch (those stop training and go on to the report): stop here
        status = "KILLED"
        kept = f"the checkpoint of epoch {saved[-1]} stays at {cfg.out}" if saved else "no checkpoint was written"
        print(f"interrupted: {kept}; what was logged stays in the MLflow run, marked KILLED", file=sys.stderr)
        return 130
    finally:
        tracker.end(status)
        distributed.leave()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # between main's own handlers (while importing, say)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
