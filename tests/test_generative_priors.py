"""Generative priors: gradients reach the latents, chunked back-prop equals direct back-prop, loading fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distillset.core.errors import DistillError
from distillset.generative.chunked import chunked_render
from distillset.generative.glad import build_glad
from distillset.generative.ld3m import build_ld3m
from distillset.generative.prior import from_pretrained
from distillset.generative.train import PriorTrainConfig
from distillset.generative.train import run as train_prior
from distillset.recover.base import Context

DATA = "npz:" + str(Path(__file__).parent / "assets" / "tiny10_small.npz")
TINY = {"data": DATA, "image_size": 16, "flip": False, "batch_size": 16, "width": 8, "unet_width": 8, "down": 2,
        "train_timesteps": 100,
            "sample_steps": 3, "z_dim": 16, "w_dim": 32}


@pytest.fixture(scope="module")
def priors(tmp_path_factory):
    root = tmp_path_factory.mktemp("priors")
    out = {}
    for kind in ("ld3m", "glad"):
        cfg = PriorTrainConfig(out=str(root / kind), kind=kind, ae_steps=40, unet_steps=20, gan_steps=10, **TINY)
        out[kind] = (root / kind, train_prior(cfg), cfg)
    return out


def _tiny_ld3m():
    torch.manual_seed(0)
    p = build_ld3m(4, (3, 16, 16), ae="vq", latent_channels=4, down=2, width=8, unet_width=8, train_timesteps=100,
                   steps=3)
    return p.eval().requires_grad_(False)


def _tiny_glad():
    torch.manual_seed(0)
    return build_glad(4, (3, 16, 16), z_dim=16, w_dim=32, width=8, layer=1).eval().requires_grad_(False)


def test_ld3m_gradients_reach_z_T_and_conditioning():
    p = _tiny_ld3m()
    labels = torch.tensor([0, 1, 2])
    z = p.encode(torch.rand(3, 3, 16, 16))["z_T"].requires_grad_(True)
    cond = p.conditioning(labels).requires_grad_(True)
    x = p.render({"z_T": z}, cond)
    assert x.shape == (3, 3, 16, 16) and 0 <= float(x.detach().min()) and float(x.detach().max()) <= 1
    x.square().sum().backward()
    assert z.grad.abs().sum() > 0 and cond.grad.abs().sum() > 0
    # each image's gradient comes from its own latents only
    z2 = z.detach().clone().requires_grad_(True)
    p.render({"z_T": z2}, cond.detach())[1].sum().backward()
    assert z2.grad[1].abs().sum() > 0 and z2.grad[0].abs().sum() == 0 and z2.grad[2].abs().sum() == 0
    # the blend is what LD3M adds: without it the path is only through the UNet chain, and the gradient changes
    z3 = z.detach().clone().requires_grad_(True)
    p.render({"z_T": z3}, cond.detach(), blend=0.0).square().sum().backward()
    assert not torch.allclose(z3.grad, z.grad)
    # checkpointing changes memory, not the gradient
    z4 = z.detach().clone().requires_grad_(True)
    p.render({"z_T": z4}, cond.detach(), checkpointing=False).square().sum().backward()
    assert torch.allclose(z4.grad, z.grad, atol=1e-6)


def test_glad_gradients_reach_style_and_features():
    p = _tiny_glad()
    labels = torch.tensor([0, 3])
    lat = {k: v.requires_grad_(True) for k, v in
           p.sample_latents(labels, [torch.Generator().manual_seed(i) for i in range(2)]).items()}
    assert lat["w"].shape == (2, p.generator.num_ws - 1, 32) and lat["f"].shape[0] == 2
    p.render(lat).square().sum().backward()
    assert lat["w"].grad.abs().sum() > 0 and lat["f"].grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["ld3m", "glad"])
def test_chunked_backprop_equals_direct(kind):
    p = _tiny_ld3m() if kind == "ld3m" else _tiny_glad()
    labels = torch.tensor([0, 1, 2, 3, 0])
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    base = p.sample_latents(labels, gens)
    if kind == "ld3m":
        base["cond"] = p.conditioning(labels)
    target = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def grads(chunk):
        lat = {k: v.detach().clone().requires_grad_(True) for k, v in base.items()}

        def render(idx):
            part = {k: v[idx] for k, v in lat.items()}
            return p.render({"z_T": part["z_T"]}, part["cond"]) if kind == "ld3m" else p.render(part)

        idx = torch.arange(5)
        dummy = torch.zeros((), requires_grad=True)
        x = chunked_render(render, idx, chunk, dummy) if chunk else render(idx)
        # a loss that couples images (as DM's class means do), so dL/dx of one image depends on the others
        ((x - target).square().mean() + x.mean(0).square().sum()).backward()
        return {k: v.grad for k, v in lat.items()}, x.detach()

    direct, x_direct = grads(0)
    chunked, x_chunked = grads(2)
    assert torch.allclose(x_direct, x_chunked, atol=1e-6)
    for k in direct:
        assert direct[k].abs().sum() > 0
        # equal up to float32 summation order (convolutions over a batch of 2 vs 5)
        assert (direct[k] - chunked[k]).abs().max() <= 1e-4 * direct[k].abs().max(), k


def test_chunked_backward_holds_one_chunk_of_activations():
    from distillset.generative.prior import SavedTensorMeter

    p = _tiny_glad()
    labels = torch.arange(16) % 4
    lat = {k: v.requires_grad_(True) for k, v in
           p.sample_latents(labels, [torch.Generator().manual_seed(i) for i in range(16)]).items()}

    def render(idx):
        return p.render({k: v[idx] for k, v in lat.items()})

    peaks = {}
    for chunk in (0, 4):
        with SavedTensorMeter() as m:
            x = chunked_render(render, torch.arange(16), chunk, torch.zeros((), requires_grad=True)) if chunk \
                else render(torch.arange(16))
            x.sum().backward()
        peaks[chunk] = m.peak
    assert peaks[4] < 0.4 * peaks[0]


def test_trained_priors_load_and_fit(priors):
    ld3m_dir, metrics, cfg = priors["ld3m"]
    p = from_pretrained(ld3m_dir, kind="ld3m", num_classes=10, image_shape=(3, 16, 16), cache=False)
    assert p.meta["latent_shapes"] == {"z_T": [4, 8, 8], "cond": [32]} and p.steps == 3
    assert abs(p.scaling_factor - metrics["scaling_factor"]) < 1e-6
    # the autoencoder learnt something: trained reconstruction beats the untrained autoencoder's on test images
    from distillset.core.data import Source

    test = Source(DATA, 16).load("test")
    x = test.images[:16].float() / 255
    fresh = build_ld3m(10, (3, 16, 16), down=2, width=8, unet_width=8).eval()
    with torch.no_grad():
        err_trained = torch.nn.functional.mse_loss(p.decode(p.encode(x)["z_T"]), x)
        err_fresh = torch.nn.functional.mse_loss(fresh.decode(fresh.encode(x)["z_T"]), x)
    assert err_trained < 0.7 * err_fresh
    glad_dir, _gm, _ = priors["glad"]
    g = from_pretrained(glad_dir, kind="glad", cache=False)
    assert g.meta["latent_shapes"]["w"] == [2, 32] and g.generator.w_avg.abs().sum() > 0
    rep = g.report(2)
    assert rep["flops_per_image"] > 0 and rep["activation_bytes_per_image"] > 0
    # an existing folder with the same config is not retrained; another config is refused
    assert train_prior(cfg) == metrics
    with pytest.raises(DistillError, match="another config"):
        train_prior(PriorTrainConfig(out=str(ld3m_dir), kind="ld3m", ae_steps=1, unet_steps=1, **TINY))


def test_bad_prior_folders_fail_in_one_line(priors, tmp_path):
    ld3m_dir, glad_dir = priors["ld3m"][0], priors["glad"][0]
    cases = [
        (tmp_path / "missing", {}, "does not exist"),
        (ld3m_dir / "prior.json", {}, "is a file"),
        (glad_dir, {"kind": "ld3m"}, "holds a 'glad' prior"),
        (ld3m_dir, {"num_classes": 20}, "trained for 10 classes"),
        (ld3m_dir, {"image_shape": (3, 32, 32)}, "renders"),
    ]
    squeeze_like = tmp_path / "backbone"
    squeeze_like.mkdir()
    (squeeze_like / "config.json").write_text("{}")
    cases.append((squeeze_like, {}, "backbone folder"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "prior.json").write_text(json.dumps({"format": "distillset-prior/1", "kind": "ld3m",
                                                   "num_classes": 10, "image_shape": [3, 16, 16]}))
    cases.append((broken, {}, "missing (vae|vqvae)/config.json"))
    for folder, kw, msg in cases:
        with pytest.raises(DistillError, match=msg) as e:
            from_pretrained(folder, cache=False, **kw)
        assert "\n" not in str(e.value)
    p = from_pretrained(ld3m_dir, cache=False)
    with pytest.raises(DistillError, match="per-image shape"):
        p.check_latents({"z_T": torch.zeros(2, 4, 4, 4)})
    with pytest.raises(DistillError, match="does not use"):
        p.check_latents({"w": torch.zeros(2, 3)})


def test_latent_set_state_round_trip_and_shape_check(priors):
    from distillset.recover.latent import GLaDSet, LD3MSet

    ctx = Context(device=torch.device("cpu"), classes=torch.tensor([0, 0, 1]), num_classes=10,
                  image_shape=(3, 16, 16), generator=torch.Generator().manual_seed(0))
    cls, idx = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    a = LD3MSet.from_options(cls, idx, (3, 16, 16), 7, ctx, prior=str(priors["ld3m"][0]), chunk=2)
    b = LD3MSet.from_options(cls, idx, (3, 16, 16), 7, ctx, prior=str(priors["ld3m"][0]), chunk=2)
    assert torch.equal(a.z_T, b.z_T)  # init is a pure function of (seed, class, index)
    c = LD3MSet.from_options(cls[1:], idx[1:], (3, 16, 16), 7, ctx, prior=str(priors["ld3m"][0]))
    assert torch.equal(a.z_T[1:], c.z_T)  # ... whatever the unit holds
    st = a.state()
    assert set(st) == {"z_T", "cond", "labels", "indices"}
    with torch.no_grad():
        a.z_T.add_(1.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.render(), b.render())
    g = GLaDSet.from_options(cls, idx, (3, 16, 16), 7, ctx, prior=str(priors["glad"][0]), learn="f")
    assert not g.w.requires_grad and g.f.requires_grad
    bad = {k: v for k, v in g.state_dict().items()}
    bad["f"] = torch.zeros(3, 1, 2, 2)
    with pytest.raises(DistillError, match="per-image shape"):
        g.load_state_dict(bad)
    with pytest.raises(DistillError, match="can learn"):
        GLaDSet.from_options(cls, idx, (3, 16, 16), 7, ctx, prior=str(priors["glad"][0]), learn="z_T")


@pytest.mark.parametrize("chunk", [0, 2])
def test_step_cache_renders_once_and_gives_the_same_loss_and_gradient(priors, chunk):
    """DM asks for each class's images separately; inside the engine's step cache the prior renders all images in
    one batch, and the loss and the latent gradients equal the per-class path."""
    from distillset.core.data import Source
    from distillset.recover.latent import LD3MSet
    from distillset.recover.objectives.dm import DistributionMatching
    from distillset.recover.real import RealData

    real = RealData(Source(DATA, 16).load("train"), torch.device("cpu"))
    cls, idx = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 0])

    def step(cached: bool):
        ctx = Context(device=torch.device("cpu"), classes=cls, num_classes=10, image_shape=(3, 16, 16),
                      generator=torch.Generator().manual_seed(0), real=real)
        syn = LD3MSet.from_options(cls, idx, (3, 16, 16), 7, ctx, prior=str(priors["ld3m"][0]), chunk=chunk)
        calls = []
        inner = syn.render_latents
        syn.render_latents = lambda lat: calls.append(len(lat["z_T"])) or inner(lat)
        obj = DistributionMatching.from_options(batch_real=8, aug="none", width=8)
        obj.setup(ctx)
        with syn.step_cache() if cached else torch.enable_grad():
            loss = obj.loss(syn, ctx)
        forward_calls = list(calls)
        loss.backward()
        return float(loss.detach()), {k: getattr(syn, k).grad.clone() for k in ("z_T", "cond")}, forward_calls

    l0, g0, calls0 = step(False)
    l1, g1, calls1 = step(True)
    assert len(calls0) == 3 and len(calls1) == (1 if chunk == 0 else 3)  # one batch (or one pass of chunks)
    assert sum(calls1) == 5
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    for k in g0:
        assert g0[k].abs().sum() > 0
        assert (g0[k] - g1[k]).abs().max() <= 1e-4 * g0[k].abs().max(), k


def test_a_diffusers_ldm_pipeline_folder_loads_as_an_ld3m_prior(tmp_path):
    """What a GPU user does with a public class-conditional LDM: `save_pretrained` of a diffusers LDMPipeline
    (vqvae/ + class-conditional unet/ + scheduler/ + model_index.json) is a prior folder as is."""
    from diffusers import DDIMScheduler, LDMPipeline

    from distillset.recover.latent import LD3MSet

    p = _tiny_ld3m()
    LDMPipeline(vqvae=p.vae, unet=p.unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(
        tmp_path / "ldm")
    assert (tmp_path / "ldm" / "model_index.json").exists() and not (tmp_path / "ldm" / "prior.json").exists()
    q = from_pretrained(tmp_path / "ldm", kind="ld3m", num_classes=4, image_shape=(3, 16, 16), cache=False)
    z = p.encode(torch.rand(2, 3, 16, 16))["z_T"]
    cond = p.conditioning(torch.tensor([0, 3]))
    assert q.scaling_factor == p.scaling_factor and torch.equal(q.alphas_cumprod, p.alphas_cumprod)
    with torch.no_grad():  # the same weights render the same images whichever folder they came from
        assert torch.allclose(q.render({"z_T": z}, cond, steps=2), p.render({"z_T": z}, cond, steps=2), atol=1e-5)
    ctx = Context(device=torch.device("cpu"), classes=torch.tensor([0, 3]), num_classes=4, image_shape=(3, 16, 16),
                  generator=torch.Generator().manual_seed(0))
    syn = LD3MSet.from_options(torch.tensor([0, 3]), torch.tensor([0, 0]), (3, 16, 16), 0, ctx, prior=str(tmp_path / "ldm"),
                  init="noise", steps=2)
    syn.render().square().mean().backward()
    assert syn.z_T.grad.abs().sum() > 0 and syn.cond.grad.abs().sum() > 0
    with pytest.raises(DistillError, match="classes"):
        from_pretrained(tmp_path / "ldm", kind="ld3m", num_classes=10, cache=False)
