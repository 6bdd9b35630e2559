"""DSA / DiffAugment: Siamese parameter sharing, differentiability, and ZCA whitening, on real CIFAR-10 fixtures."""

from __future__ import annotations

import itertools

import pytest
import torch

from distillset.core.data import Source
from distillset.core.errors import DistillError
from distillset.recover.augmentations.dsa import (
    DSA_RATIOS,
    FAMILIES,
    SiameseAug,
    apply_family,
    dsa_augment,
    sample_family,
)
from distillset.recover.base import Context, get
from distillset.squeeze.inputs import ZCA


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    train = Source("npz:tests/assets/cifar10_small.npz").load("train")
    return train.images[:24].float() / 255


def _ctx(seed: int) -> Context:
    return Context(device=torch.device("cpu"), classes=torch.zeros(1, dtype=torch.long), num_classes=10,
                   image_shape=(3, 32, 32), generator=torch.Generator().manual_seed(seed))


def test_same_params_same_transform_different_params_differ(images):
    aug = get("augmentation", "dsa").from_options()
    ctx = _ctx(0)
    draws = [aug.sample(1, ctx) for _ in range(40)]
    # every family gets drawn over 40 steps (one family per step)
    used = {aug.impl.ops[int(d["ops"][0])] for d in draws}
    assert used == {"color", "crop", "cutout", "flip", "scale", "rotate"}
    for p in draws:
        a, b = aug.apply(images, p, ctx), aug.apply(images.clone(), p, ctx)
        assert torch.equal(a, b)
    # Siamese: one draw transforms a real batch (16) and a synthetic batch (3) identically image by image
    for p in draws[:10]:
        real, syn = aug.apply(images[:16], p, ctx), aug.apply(images[:3], p, ctx)
        assert torch.allclose(real[:3], syn, atol=1e-6)
    # different draws give different transforms (a few draws can be no-ops, e.g. flip=False, so count)
    differ = sum(not torch.allclose(aug.apply(images, p, ctx), aug.apply(images, q, ctx), atol=1e-5)
                 for p, q in itertools.pairwise(draws))
    assert differ >= 30


@pytest.mark.parametrize("family", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_each_op_is_differentiable_and_matches_finite_differences(images, family):
    g = torch.Generator().manual_seed(3)
    for _ in range(5):  # find a draw that changes the images (flip may draw False)
        p = sample_family(family, 4, g, (32, 32), DSA_RATIOS)
        x = images[:4].double()
        if not torch.allclose(apply_family(x, family, p, DSA_RATIOS), x):
            break
    x = images[:4].double().requires_grad_(True)
    w = torch.randn(x.shape, generator=g, dtype=torch.double)
    out = (apply_family(x, family, p, DSA_RATIOS) * w).sum()
    (grad,) = torch.autograd.grad(out, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    v = torch.randn(x.shape, generator=g, dtype=torch.double)
    eps = 1e-6
    with torch.no_grad():
        fd = ((apply_family(x + eps * v, family, p, DSA_RATIOS) * w).sum()
              - (apply_family(x - eps * v, family, p, DSA_RATIOS) * w).sum()) / (2 * eps)
    assert torch.allclose((grad * v).sum(), fd, rtol=1e-4, atol=1e-6)


def test_dsa_augment_function_and_diffaugment(images):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = dsa_augment(images, g1), dsa_augment(images, g2)
    assert torch.equal(a, b) and a.shape == images.shape
    # DiffAugment: all three families, per-image draws -> two images of equal content are changed differently
    diff = get("augmentation", "diffaugment").from_options()
    assert not diff.impl.siamese and not diff.impl.one_op
    twins = images[:1].repeat(2, 1, 1, 1)
    out = diff(twins, _ctx(1))
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(DistillError):
        SiameseAug("color_warp", True, True)
    assert set(FAMILIES) >= {"translation"}


def test_zca_whitens_round_trips_and_saves(images, tmp_path):
    x = images[:, :, :8, :8]  # 192 dims, 24 images: a rank-deficient covariance, as in practice at small N
    zca = ZCA.fit(x, reg=0.1)
    w = zca.apply(x)
    cov_in = torch.cov(x.flatten(1).t().double(), correction=0)
    cov_out = torch.cov(w.flatten(1).t().double(), correction=0)
    # whitening maps every covariance eigenvalue s to s / (s + reg): the spectrum is flattened towards 1
    s_in = torch.linalg.eigvalsh(cov_in).clamp(min=0)
    s_out = torch.linalg.eigvalsh(cov_out)
    assert torch.allclose(s_out, s_in / (s_in + 0.1), atol=1e-4)
    assert s_out.max() <= 1.0 and s_out.max() > 0.9
    assert torch.allclose(zca.inverse(w), x, atol=1e-4)
    zca.save(tmp_path / "zca.safetensors")
    back = ZCA.load(tmp_path / "zca.safetensors")
    assert torch.equal(back.apply(x), w) and back.reg == 0.1
    with pytest.raises(DistillError):
        zca.apply(images)
