"""How the weights move: the optimizers (SGD, AdamW, Muon), the learning-rate schedule and the lookahead average."""

from __future__ import annotations

import torch

from config import TrainConfig
from model import param_groups

# Quintic Newton-Schulz coefficients of the published Muon optimizer (Keller Jordan, 2024): chosen for the steepest
# slope at zero: 3 steps push the singular values of a gradient (all but the tiny ones) into about [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 3


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        if cfg.layer_decay < 1 and hasattr(model, "group_matcher"):  # timm: one group per depth, lr shrinking downwards
            from timm.optim import param_groups_layer_decay

            groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
            for group in groups:
                group["lr"] = cfg.lr * group.pop("lr_scale", 1.0)
            return torch.optim.AdamW(groups, lr=cfg.lr)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Decoupled hyperparameters (airbench / Page): the loss is summed over the batch, and the step size is
    # divided by Nesterov momentum's gain, so lr and weight decay keep their meaning across batch size and momentum.
    gain = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr = cfg.lr / gain
    decay = cfg.weight_decay * cfg.batch_size / gain  # shrinkage per step
    biases, others = param_groups(model)
    if cfg.optimizer == "muon":  # the convolution filters go to Muon's own group
        filters, others = [p for p in others if p.ndim == 4], [p for p in others if p.ndim != 4]
    groups = [dict(params=others, lr=lr, weight_decay=decay / lr)]
    if biases:
        bias_lr = lr * cfg.bias_lr_scale
        groups.append(dict(params=biases, lr=bias_lr, weight_decay=decay / bias_lr))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    groups.append(dict(params=filters, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=0.0, orthogonalize=True))
    return Muon([g for g in groups if g["params"]], momentum=cfg.momentum)


class Muon(torch.optim.Optimizer):
    """Nesterov SGD, except in groups with orthogonalize=True (the convolution filters): there the momentum's
    update is orthogonalized (all its singular values pushed to about 1, by Newton-Schulz iterations) and each
    filter bank is rescaled to a fixed norm first, which BatchNorm after it makes harmless and which keeps the
    step's relative size constant. Jordan et al., "Muon: an optimizer for hidden layers in neural networks" (2024),
    as airbench94_muon.py uses it."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, orthogonalize=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                update = grad.add(buf, alpha=group["momentum"])  # Nesterov
                if group["orthogonalize"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    update = orthogonalize(update.reshape(len(update), -1)).reshape_as(p)
                p.add_(update, alpha=-group["lr"])
        return loss


def orthogonalize(g: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of g = U S V^T (g's singular values pushed to ~1) by quintic Newton-Schulz steps, in fp32."""
    a, b, c = NS_COEFFICIENTS
    x = g.float() / (g.float().norm() + eps)  # every singular value <= 1
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup from lr_start to 1 over the first `warmup` share of steps, then linear decay to lr_end."""
    peak = int(cfg.warmup * total)
    if step < peak:
        return cfg.lr_start + (1 - cfg.lr_start) * step / peak
    return 1 + (cfg.lr_end - 1) * (step - peak) / max(1, total - peak)


class Lookahead:
    """Every few steps pull the weights (and BN statistics) towards a slow average and copy it back."""

    def __init__(self, slow: dict[str, torch.Tensor]):
        self.slow = slow

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Lookahead":
        return cls({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()})

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if k in self.slow:
                self.slow[k].lerp_(v, 1 - decay)
                v.copy_(self.slow[k])
