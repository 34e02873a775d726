import torch
import torch.nn.functional as F

from config import PRESETS, ModelConfig
from model import CnnClassifier, init_whitening, param_groups, predict_logits


def make(preset: str, classes: int = 10, size: int = 32) -> CnnClassifier:
    names = ModelConfig.__dataclass_fields__
    return CnnClassifier(ModelConfig(**{k: v for k, v in PRESETS[preset].items() if k in names}), classes, size)


def test_every_preset_maps_images_to_logits():
    for preset in PRESETS:
        for size in (32, 48):
            model = make(preset, classes=7, size=size).eval()
            assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_whitening_decorrelates_patches():
    model = make("fast")
    images = torch.randn(200, 3, 16, 16) @ torch.eye(16) + torch.randn(200, 1, 16, 16)  # correlated channels
    init_whitening(model, images)
    with torch.no_grad():
        out = model.whiten(images)[:, :12]  # the +eigenvector half
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    assert torch.allclose(cov.diagonal(), torch.ones(12), atol=0.05)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.05
    assert not model.whiten.weight.requires_grad


def test_norm_biases_get_their_own_group():
    biases, others = param_groups(make("fast"))
    assert biases and all(p.dim() == 1 for p in biases)
    assert not any(p is q for p in biases for q in others)


def test_tta_level_zero_is_the_plain_forward():
    model = make("fast").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(predict_logits(model, x, 0), model(x))
        assert predict_logits(model, x, 2).shape == (3, 10)


def test_small_batch_overfits():
    """Learning works end to end: the fast net memorises 16 random images (in 20 steps with seeds 0-2; 30 here)."""
    torch.manual_seed(0)
    model = make("fast")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    init_whitening(model, x)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() == 1.0


def test_whitening_from_batches_equals_whitening_from_all_at_once():
    torch.manual_seed(0)
    images = torch.randn(40, 1, 12, 12)
    whole, chunked = (CnnClassifier(ModelConfig(), 3, in_chans=1) for _ in range(2))
    init_whitening(whole, images)
    init_whitening(chunked, iter(images.split(7)))
    assert whole.whiten.weight.shape == (8, 1, 2, 2)
    assert torch.allclose(whole.whiten.weight, chunked.whiten.weight, atol=1e-3)
