"""The classifiers (seed baseline, airbench-style fast net, timm backbones) and their forward-time helpers; no I/O."""

from __future__ import annotations

import torch
from torch import nn

from config import ConfigError, ModelConfig
from transforms import tta_views


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale, trainable bias, and statistics kept in fp32 under autocast."""

    def __init__(self, channels: int, momentum: float, learn_scale: bool = False):
        super().__init__(channels, eps=1e-12 if not learn_scale else 1e-5, momentum=momentum)
        self.weight.requires_grad = learn_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics over a bf16/fp16 batch lose precision; compute them in fp32 and hand back the input dtype.
        return super().forward(x.float()).to(x.dtype)


class Conv(nn.Conv2d):
    """3x3 'same' conv without bias, initialised near identity (dirac) so a deep stack starts as a short path."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: min(w.size(0), w.size(1))])


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        super().__init__()
        self.conv1 = Conv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(c_out, bn_momentum)
        self.conv2 = Conv(c_out, c_out)
        self.norm2 = BatchNorm(c_out, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class CnnClassifier(nn.Module):
    """An image classifier built from a ModelConfig.

    baseline: conv -> pool -> conv -> pool -> flatten -> FC (the seed's shape, with optional BN and dropout).
    airbench: a frozen 2x2 patch-whitening conv, then one ConvGroup per width, global max-pool, scaled linear head.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, image_size: int = 32, in_chans: int = 3):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "baseline":
            self.features, self.head = _baseline(cfg, num_classes, image_size, in_chans)
        else:
            self.features, self.head = _airbench(cfg, num_classes, in_chans)

    @property
    def whiten(self) -> nn.Conv2d | None:
        return self.features[0] if self.cfg.arch == "airbench" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _baseline(cfg: ModelConfig, num_classes: int, image_size: int, in_chans: int):
    c1, c2 = cfg.widths
    norm = (lambda c: nn.BatchNorm2d(c, momentum=cfg.bn_momentum)) if cfg.norm == "batch" else (lambda c: nn.Identity())
    features = nn.Sequential(
        nn.Conv2d(in_chans, c1, 3, padding=1), norm(c1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), norm(c2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = c2 * (image_size // 4) ** 2
    if cfg.hidden:
        head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(flat, cfg.hidden), nn.ReLU(inplace=True),
                             nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, num_classes))
    else:
        head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(flat, num_classes))
    return features, head


class _Scale(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def _airbench(cfg: ModelConfig, num_classes: int, in_chans: int):
    whiten_width = 2 * in_chans * 2 * 2  # +/- each eigenvector of the Cx2x2 patch covariance
    whiten = nn.Conv2d(in_chans, whiten_width, kernel_size=2, padding=0, bias=True)
    whiten.weight.requires_grad = False
    nn.init.zeros_(whiten.bias)
    layers = [whiten, nn.GELU()]
    c_in = whiten_width
    for width in cfg.widths:
        layers.append(ConvGroup(c_in, width, cfg.bn_momentum))
        c_in = width
    features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(c_in, num_classes, bias=False), _Scale(cfg.logit_scale))
    return features, head


SCRATCH_ARCHS = ("baseline", "airbench")


def build_model(cfg: ModelConfig, num_classes: int, image_size: int = 32, in_chans: int = 3) -> nn.Module:
    """The network named by cfg.arch, randomly initialised: ours, or any timm model name (weights: pretrained.py)."""
    if cfg.arch in SCRATCH_ARCHS:
        return CnnClassifier(cfg, num_classes, image_size, in_chans)
    import timm

    if not timm.is_model(cfg.arch):
        raise ConfigError(f"--arch {cfg.arch!r} is neither {' nor '.join(SCRATCH_ARCHS)} nor a timm model "
                          f"(e.g. {', '.join(timm.list_models('*efficientnet_lite*')[:3])})")
    return timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.dropout)


def whitening_layer(model: nn.Module) -> nn.Conv2d | None:
    """The frozen patch-whitening conv of the airbench net; None for other networks."""
    return model.whiten if isinstance(model, CnnClassifier) else None


@torch.no_grad()
def init_whitening(model: nn.Module, batches, eps: float = 5e-4) -> None:
    """Set the frozen first conv to whiten 2x2 patches, from the covariance of normalized training images.

    batches: a normalized NCHW batch, or an iterable of them; the covariance is accumulated batch by batch, so memory
    holds one batch's patches at a time, whatever the image size.
    """
    layer = whitening_layer(model)
    if layer is None:
        return
    (h, w), cov, n = layer.weight.shape[2:], 0, 0
    for images in [batches] if isinstance(batches, torch.Tensor) else batches:
        c = images.shape[1]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        cov = cov + (patches.T @ patches).double()
        n += len(patches)
    cov = (cov / max(n, 1)).float()
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps).view(-1, 1)).view(-1, c, h, w)
    layer.weight.copy_(torch.cat([filters, -filters]).to(layer.weight.dtype))


def param_groups(model: nn.Module) -> tuple[list, list]:
    """(normalization biases, everything else that trains): the biases get their own learning rate."""
    norm_biases, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (norm_biases if ".norm" in name and name.endswith("bias") else others).append(p)
    return norm_biases, others


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, tta: int = 0) -> torch.Tensor:
    """Logits for a normalized batch, averaged over the test-time-augmentation views of level tta."""
    return sum(weight * model(view).float() for weight, view in tta_views(x, tta))


def early_layers(model: nn.Module, stages: int) -> list[nn.Module]:
    """The stem and the first `stages` stages of a timm backbone, by timm's coarse layer groups ([] for our nets)."""
    if stages <= 0 or not hasattr(model, "group_matcher"):
        return []
    from timm.models import group_modules

    groups = group_modules(model, model.group_matcher(coarse=True))  # {depth: [module names]}, the head last
    kept = sorted(groups)[: min(stages + 1, len(groups) - 1)]
    return [model.get_submodule(name) for depth in kept for name in groups[depth]]


def set_trainable(model: nn.Module, head_only: bool, fixed: list[nn.Module] = ()) -> None:
    """Which weights train: the classifier head alone while head_only (timm backbones), never those of `fixed`."""
    held = {id(p) for m in fixed for p in m.parameters()}
    head = {id(p) for p in model.get_classifier().parameters()} if hasattr(model, "get_classifier") else set()
    for p in model.parameters():
        p.requires_grad = id(p) not in held and (not head_only or id(p) in head)


def hold_statistics(fixed: list[nn.Module]) -> None:
    """BatchNorm in the fixed layers keeps its ImageNet statistics (call after model.train())."""
    for m in fixed:
        m.eval()
