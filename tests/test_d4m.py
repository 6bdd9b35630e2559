"""D4M: k-means prototypes in the prior's latent space, denoised img2img; a prior without an autoencoder, too few
images for the prototypes and a bad strength are one-line errors."""

from __future__ import annotations

import pytest
import torch

from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError
from distillset.generative.ld3m import build_ld3m
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run
from distillset.recover.objectives.d4m import kmeans


def test_kmeans_finds_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(40, 2, generator=g) for c in centres])
    c1, a1 = kmeans(x, 3, torch.Generator().manual_seed(5))
    c2, _ = kmeans(x, 3, torch.Generator().manual_seed(5))
    assert torch.equal(c1, c2)
    # every centroid is the mean of its points, and each blob is one cluster
    for j in range(3):
        assert torch.allclose(c1[j], x[a1 == j].mean(0), atol=1e-5)
    assert sorted(torch.bincount(a1).tolist()) == [40, 40, 40]
    assert torch.cdist(c1, centres).min(1).values.max() < 0.2
    with pytest.raises(DistillError, match="at least k = 5"):
        kmeans(x[:4], 5, g)


@pytest.fixture(scope="module")
def ld3m_folder(tmp_path_factory):
    torch.manual_seed(0)
    p = build_ld3m(10, (1, 8, 8), ae="kl", latent_channels=4, down=2, width=8, unet_width=8, train_timesteps=100,
                   class_names=[str(i) for i in range(10)])
    folder = tmp_path_factory.mktemp("prior") / "ld3m"
    p.save_pretrained(folder)
    return folder


def _cfg(out, prior, **options):
    return RecoverConfig(out=str(out), data="digits", method="d4m", ipc=2, iterations=0, autocast="none",
                         options={"prior": str(prior), **options})


class PixelPrior:
    """A prior whose latent is the image (2x - 1) and whose noise predictor says 0: D4M's arithmetic made visible."""

    def __init__(self):
        self.alphas_cumprod = torch.linspace(0.9999, 0.01, 100)
        self.device = torch.device("cpu")

    def encode(self, x):
        return {"z_T": x * 2 - 1}

    def decode(self, z):
        return ((z + 1) / 2).clamp(0, 1)

    def conditioning(self, labels):
        return torch.zeros(len(labels), 4)

    def _eps(self, z, t, cond):
        return torch.zeros_like(z)


def test_low_strength_returns_the_cluster_means_of_real_images():
    from distillset.core.data import Source
    from distillset.core.partition import init_order
    from distillset.recover.base import Context, get
    from distillset.recover.real import RealData

    real = RealData(Source("digits").load("train"))
    obj = get("objective", "d4m").from_options(prior="unused", strength=0.001, steps=1, pool=40)
    obj._prior = PixelPrior()
    ctx = Context(device=torch.device("cpu"), classes=torch.full((3,), 7), num_classes=10, image_shape=(1, 8, 8),
                  generator=torch.Generator(), real=real, ipc=3, seed=0)
    images = obj.class_images(7, 3, ctx)
    x = real.get(init_order(real.index[7], 7, 0)[:40])
    # each prototype is the mean of the real images nearest it (a k-means fixed point), decoded back to pixels;
    # strength ~0 adds sqrt(1 - alpha_0) = 1 % of noise
    assign = torch.cdist(x.flatten(1), images.flatten(1)).argmin(1)
    for j in range(3):
        assert (images[j] - x[assign == j].mean(0)).abs().mean() < 0.02
    assert len(set(assign.tolist())) == 3
    far = get("objective", "d4m").from_options(prior="unused", strength=1.0, steps=1, pool=40)
    far._prior = PixelPrior()
    assert (far.class_images(7, 3, ctx) - images).abs().mean() > 0.2  # strength 1 forgets the prototypes


def test_strength_changes_the_images_and_runs_are_reproducible(ld3m_folder, tmp_path):
    run(_cfg(tmp_path / "a", ld3m_folder, strength=0.8, steps=3, pool=20))
    run(_cfg(tmp_path / "b", ld3m_folder, strength=0.8, steps=3, pool=20))
    run(_cfg(tmp_path / "c", ld3m_folder, strength=0.01, steps=3, pool=20))
    a, b, c = (load_distilled(tmp_path / k)[0].images for k in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_input(ld3m_folder, tmp_path):
    from distillset.generative.glad import build_glad

    glad = tmp_path / "glad"
    build_glad(10, (1, 8, 8)).save_pretrained(glad)
    with pytest.raises(DistillError, match="no autoencoder"):
        run(_cfg(tmp_path / "g", glad))
    with pytest.raises(DistillError, match="ipc = 2 real images"):
        run(_cfg(tmp_path / "p", ld3m_folder, pool=1))
    with pytest.raises(DistillError, match="in \\(0, 1\\]"):
        _cfg(tmp_path / "s", ld3m_folder, strength=0)
    with pytest.raises(DistillError, match="needs options.prior"):
        RecoverConfig(out=str(tmp_path / "n"), data="digits", method="d4m")
