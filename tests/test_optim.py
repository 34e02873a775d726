import pytest
import torch

import optim
from config import ModelConfig, TrainConfig
from model import CnnClassifier


@pytest.mark.parametrize("shape", [(64, 216), (256, 2304), (300, 20)])
def test_orthogonalize_pushes_every_singular_value_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # a gradient's singular values spread widely
    values = torch.linalg.svdvals(optim.orthogonalize(g))
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 1.5
    assert values.min() > 0.6 and values.max() < 1.3
    assert optim.orthogonalize(g).shape == g.shape
    assert torch.allclose(optim.orthogonalize(g * 1e-4), optim.orthogonalize(g), atol=1e-4)  # the scale does not matter


def test_muon_orthogonalizes_the_filters_and_steps_the_rest_with_nesterov_sgd():
    model = CnnClassifier(ModelConfig(arch="airbench", widths=(8, 16, 16)), 10)
    cfg = TrainConfig(optimizer="muon", muon_lr=0.1, muon_momentum=0.5)
    opt = optim.make_optimizer(model, cfg)
    assert isinstance(opt, optim.Muon)
    filters = {id(p) for p in model.parameters() if p.ndim == 4 and p.requires_grad}
    muon = [g for g in opt.param_groups if g["orthogonalize"]]
    assert len(muon) == 1 and {id(p) for p in muon[0]["params"]} == filters
    assert muon[0]["lr"] == 0.1 and muon[0]["momentum"] == 0.5 and muon[0]["weight_decay"] == 0
    sgd = optim.make_optimizer(model, TrainConfig())  # the other groups keep SGD's settings
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups if not g["orthogonalize"]] == \
           [(g["lr"], g["weight_decay"]) for g in sgd.param_groups]

    conv = next(p for p in model.parameters() if id(p) in filters)
    head = model.head[1].weight
    before_conv, before_head = conv.detach().clone(), head.detach().clone()
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    head_grad = head.grad.clone()
    opt.step()
    # the filter bank: rescaled to norm sqrt(out channels), then a step of lr along an orthogonalized direction
    rescaled = before_conv * (len(conv) ** 0.5 / before_conv.norm())
    step = (rescaled - conv.detach()).reshape(len(conv), -1) / 0.1
    assert torch.linalg.svdvals(step).max() < 1.5 * (1 + 0.5)  # Nesterov: grad + momentum * buffer, both orthogonal-ish
    # the head: plain Nesterov SGD with decoupled weight decay (first step: buffer = grad)
    group = next(g for g in opt.param_groups if any(p is head for p in g["params"]))
    grad = head_grad + group["weight_decay"] * before_head
    expected = before_head - group["lr"] * (grad + group["momentum"] * grad)
    assert torch.allclose(head.detach(), expected, atol=1e-6)


def test_muon_settings_are_checked():
    with pytest.raises(ValueError, match="--muon-lr"):
        TrainConfig(muon_lr=0)
    with pytest.raises(ValueError, match="--muon-momentum"):
        TrainConfig(muon_momentum=1.0)
