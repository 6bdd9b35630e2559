"""ZCA whitening end to end: one input transform, fitted once, stored with the experts and the distilled set, and
applied by the matching objectives, the experts, the students and the test images alike."""

from __future__ import annotations

import json

import pytest
import torch

from distillset.core.data import Source
from distillset.core.errors import DistillError
from distillset.core.runtime import get_runtime
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import Engine, plan_units
from distillset.recover.engine import run as recover_run
from distillset.recover.objectives._matching import Normalize
from distillset.squeeze.inputs import ZCA, ZCA_FILE, InputTransform
from distillset.squeeze.train import channel_stats
from distillset.squeeze.trajectories import TrajectoryConfig, load_buffers
from distillset.squeeze.trajectories import run as record
from tests.trajectory_helpers import EXPERT_KW, shared_experts


@pytest.fixture(scope="module")
def digits():
    return Source("digits").load("train")


def test_input_transform_whitens_after_normalising(digits):
    x = digits.images[:600].float() / 255
    norm = InputTransform([0.3], [0.4])
    zca = ZCA.fit(digits.images[:600], 0.1, transform=norm)  # uint8 in, normalised batch by batch
    assert zca.same_as(ZCA.fit((x - 0.3) / 0.4, 0.1))  # the same as fitting the normalised floats at once
    white = InputTransform([0.3], [0.4], zca)
    w = white(x)
    assert torch.allclose(w, zca.apply((x - 0.3) / 0.4), atol=1e-5)
    # whitening maps every covariance eigenvalue s to s / (s + reg): the spectrum is flattened towards 1
    s_in = torch.linalg.eigvalsh(torch.cov(((x - 0.3) / 0.4).flatten(1).t().double(), correction=0)).clamp(min=0)
    s_out = torch.linalg.eigvalsh(torch.cov(w.flatten(1).t().double(), correction=0))
    assert torch.allclose(s_out, s_in / (s_in + 0.1), atol=1e-4)
    assert s_in.max() / s_in[s_in > 1e-3].min() > 100 and s_out[s_in > 1e-3].min() > 0.01
    # under bf16 autocast the whitening still runs in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wb = white(x)
    assert wb.dtype == torch.float32 and torch.allclose(wb, w, atol=1e-5)
    with pytest.raises(DistillError, match="fitted on images"):
        white(torch.rand(2, 1, 16, 16))


def _dm_config(out, **kw) -> RecoverConfig:
    base = dict(out=str(out), data="digits", method="dm", ipc=1, iterations=3, parametrization="pixel",
                param_options={"init": "real"}, augmentation="none", optimizer="sgd", lr=1.0, momentum=0.5,
                schedule="constant", classes_per_unit=0, options={"width": 8, "batch_real": 16}, log_every=1,
                autocast="none", channels_last=False, zca="fit")
    return RecoverConfig(**{**base, **kw})


def test_dm_with_zca_stores_the_whitening_and_evaluate_applies_it(tmp_path, digits, monkeypatch):
    import distillset.relabel.evaluate as ev
    from distillset.launch.export import ExportConfig
    from distillset.launch.export import run as export

    cfg = _dm_config(tmp_path / "dm")
    manifest = recover_run(cfg)
    out = tmp_path / "dm"
    assert manifest["zca"] == ZCA_FILE and (out / ZCA_FILE).exists()
    stored = ZCA.load(out / ZCA_FILE)
    mean, std = channel_stats(digits.images)  # networks trained from scratch see the data's statistics
    assert manifest["mean"] == mean and manifest["std"] == std
    assert stored.same_as(ZCA.fit(digits.images, 0.1, transform=InputTransform(mean, std)))
    # the objectives' networks see exactly that whitening
    engine = Engine(cfg, get_runtime())
    ctx = engine.context(plan_units(10, 1, 0, 0)[0])
    x = digits.images[:50].float() / 255
    assert torch.allclose(Normalize(ctx)(x), stored.apply((x - mean[0]) / std[0]), atol=1e-5)

    seen = []
    real_train = ev.train_student

    def spy(*args, **kwargs):
        seen.append(kwargs.get("zca"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ev, "train_student", spy)
    metrics = ev.run(ev.EvaluateConfig(distilled=str(out), archs=["convnet"], model_kwargs={"width": 8}, epochs=2,
                                       students=1, labels="hard", protocol="matching", batch_students=1))
    assert metrics["zca"] is True and len(seen) == 2  # the distilled set and the random-real baseline
    assert all(z is not None and z.same_as(stored) for z in seen)
    exported = export(ExportConfig(distilled=str(out), out=str(tmp_path / "wds"), format="wds"))
    assert exported is not None and ZCA.load(tmp_path / "wds" / ZCA_FILE).same_as(stored)


def test_zca_is_refused_for_teacher_methods_and_mismatched_resolutions(tmp_path, digits_teacher):
    with pytest.raises(DistillError, match="pretrained teacher"):
        recover_run(_dm_config(tmp_path / "sre2l", method="sre2l", teachers=[str(digits_teacher)], options={}))
    small = ZCA.fit(torch.rand(20, 1, 4, 4))
    small.save(tmp_path / "small.safetensors")
    with pytest.raises(DistillError, match="fitted on"):
        recover_run(_dm_config(tmp_path / "dm", zca=str(tmp_path / "small.safetensors")))


def test_experts_record_their_whitening_and_mtt_distils_in_it(tmp_path, tmp_path_factory):
    experts = tmp_path / "experts"
    summary = record(TrajectoryConfig(out=str(experts), **{**EXPERT_KW, "zca": True}), get_runtime())
    zca = ZCA.load(experts / ZCA_FILE)
    ex = load_buffers(experts)
    assert ex.zca_path == experts / ZCA_FILE
    assert summary["test_top1_mean"] > 0.5  # experts learn on whitened digits
    mtt = {"buffer": str(experts), "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 3}
    cfg = _dm_config(tmp_path / "mtt", method="mtt", options=mtt, zca="", iterations=2, ipc=1,
                     param_options={"init": "real"})
    manifest = recover_run(cfg)
    # no zca option needed: the experts define the space, and the set records it for evaluation
    assert manifest["zca"] == ZCA_FILE and ZCA.load(tmp_path / "mtt" / ZCA_FILE).same_as(zca)
    assert manifest["mean"] == ex.meta["mean"] and manifest["std"] == ex.meta["std"]
    with pytest.raises(DistillError, match="whitened by"):
        recover_run(_dm_config(tmp_path / "mtt_fit", method="mtt", options=mtt, zca="fit"))
    plain = {**mtt, "buffer": shared_experts(tmp_path_factory)}
    with pytest.raises(DistillError, match="without whitening"):
        recover_run(_dm_config(tmp_path / "mtt_plain", method="mtt", options=plain, zca="fit"))
    assert json.loads((tmp_path / "mtt" / "manifest.json").read_text())["status"] == "complete"


def test_pixels_are_optimised_in_the_whitened_space(digits):
    """With a ZCA the learnable tensor is the whitened image (KIP/MTT): the networks see exactly it, gradient steps
    act on it directly, and projection keeps the rendered pixels (what the PNGs store) in [0, 1]."""
    from distillset.recover.base import Context
    from distillset.recover.params import PixelSet
    from distillset.recover.real import RealData

    mean, std = channel_stats(digits.images)
    zca = ZCA.fit(digits.images, 0.1, transform=InputTransform(mean, std))
    cls, idx = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 0, 0])
    ctx = Context(device=torch.device("cpu"), classes=cls, num_classes=10, image_shape=(1, 8, 8),
                  generator=torch.Generator().manual_seed(0), real=RealData(digits),
                  mean=mean, std=std, zca=zca, seed=0)
    syn = PixelSet.from_options(cls, idx, (1, 8, 8), 0, ctx, init="real")
    plain = PixelSet.from_options(cls, idx, (1, 8, 8), 0, ctx, init="real", whitened=False)
    assert syn.whitened and not plain.whitened
    assert torch.allclose(syn.render(), plain.render(), atol=1e-5)  # both start from the same real images
    norm = Normalize(ctx)
    assert torch.allclose(norm(syn.render()), syn.data, atol=1e-4)  # the network input is the learnable tensor
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(144, 1))
    inp = syn.data.detach().clone().requires_grad_(True)
    (g_in,) = torch.autograd.grad(net(inp).square().sum(), inp)
    (g_syn,) = torch.autograd.grad(net(norm(syn.render())).square().sum(), syn.data)
    (g_plain,) = torch.autograd.grad(net(norm(plain.render())).square().sum(), plain.data)
    assert torch.allclose(g_syn, g_in, atol=1e-4 * float(g_in.abs().max()))
    # the pixel-space step each makes: raw pixels take W g, which amplifies the data's low-variance (noise-like)
    # directions; whitened images take W^-1 g, which favours the high-variance ones that carry the images
    x_norm = ((digits.images.float() / 255 - mean[0]) / std[0]).flatten(1).double()
    _, u = torch.linalg.eigh(torch.cov(x_norm.t()))
    low = u[:, :32].float()  # the 32 lowest-variance of 64 directions

    def low_share(g):
        return float((g.flatten(1) @ low).square().sum() / g.square().sum())

    step_whitened = (g_syn.flatten(1) @ zca.inverse_transform).view(g_syn.shape)
    assert low_share(g_plain) > 2 * low_share(step_whitened)
    with torch.no_grad():
        syn.data.add_(3 * torch.randn_like(syn.data))
    syn.project_()
    x = syn.render().detach()
    assert float(x.min()) >= -1e-4 and float(x.max()) <= 1 + 1e-4
    assert torch.allclose(norm(x), syn.data, atol=1e-4)
