"""A short distillation over latents (DM objective through the recover engine) lowers the objective and writes
images + latents that re-render to the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillset.core.config import from_dict, load_yaml
from distillset.core.data import ImageSet, Source
from distillset.core.distilled import load_distilled
from distillset.generative.train import PriorTrainConfig
from distillset.generative.train import run as train_prior
from distillset.recover.base import Context
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover
from distillset.recover.latent import GLaDSet, LD3MSet, render_saved
from distillset.recover.real import RealData
from distillset.squeeze.models import create_model

CLASSES = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_distill")
    d = np.load("tests/assets/tiny10_small.npz")
    keep_tr, keep_te = d["y_train"] < CLASSES, d["y_test"] < CLASSES
    npz = root / "tiny3.npz"
    np.savez(npz, x_train=d["x_train"][keep_tr], y_train=d["y_train"][keep_tr], x_test=d["x_test"][keep_te],
             y_test=d["y_test"][keep_te], class_names=d["class_names"][:CLASSES])
    data = f"npz:{npz}"
    priors = {}
    for kind in ("ld3m", "glad"):
        train_prior(PriorTrainConfig(out=str(root / kind), data=data, kind=kind, image_size=16, flip=False,
                                     batch_size=16, width=8, unet_width=8, down=2, train_timesteps=100, sample_steps=3,
                                     z_dim=16, w_dim=32, ae_steps=30, unet_steps=20, gan_steps=20))
        priors[kind] = str(root / kind)
    return root, data, priors


def _dm_gap(images: torch.Tensor, labels: torch.Tensor, real: ImageSet) -> float:
    """Mean-embedding gap to the real classes under fixed random ConvNets (what DM minimises, with fixed nets)."""
    total = 0.0
    x_real = real.images.float() / 255
    for seed in range(4):
        torch.manual_seed(100 + seed)
        net = create_model("convnet", CLASSES, 3, 16, width=16).eval()
        with torch.no_grad():
            for c in range(CLASSES):
                mr = net.embed(x_real[real.labels == c] * 2 - 1).mean(0)
                ms = net.embed(images[labels == c] * 2 - 1).mean(0)
                total += float((mr - ms).square().sum())
    return total


@pytest.mark.parametrize("kind", ["ld3m", "glad"])
def test_dm_over_latents_lowers_gap_and_saves_latents(setup, kind):
    root, data, priors = setup
    out = root / f"run_{kind}"
    # the shipped recipe's recover section, shrunk to a debug size
    sec = dict(load_yaml(f"recipes/{kind}_tiny10.yaml")["recover"])
    opts = {**sec["param_options"], "prior": priors[kind], "chunk": 1}
    if kind == "ld3m":
        opts["steps"] = 2
    sec.update(out=str(out), data=data, image_size=16, param_options=opts, ipc=2, lr=0.1, log_every=5,
               iterations=12 if kind == "ld3m" else 25, options={"batch_real": 16, "width": 16, "aug": "none"},
               checkpoint_every=0, channels_last=False, autocast="none")
    cfg = from_dict(RecoverConfig, sec)
    man = recover(cfg)
    assert man["status"] == "complete" and man["num_images"] == 2 * CLASSES
    assert (out / "latents" / "unit-000000.safetensors").exists()

    real = Source(data, 16).load("train")
    saved, _ = load_distilled(out)
    images, labels = saved.images, saved.labels
    final = images.float() / 255
    # the initial set: the same parametrization, same seed, before any step
    cls = torch.arange(CLASSES).repeat_interleave(2)
    idx = torch.arange(2).repeat(CLASSES)
    ctx = Context(device=torch.device("cpu"), classes=cls, num_classes=CLASSES, image_shape=(3, 16, 16),
                  generator=torch.Generator().manual_seed(0), real=RealData(real))
    cls_ = LD3MSet if kind == "ld3m" else GLaDSet
    initial = cls_.from_options(cls, idx, (3, 16, 16), cfg.seed, ctx, **opts)
    x0 = initial.images_uint8().float() / 255
    gap0, gap1 = _dm_gap(x0, cls, real), _dm_gap(final, labels, real)
    assert gap1 < 0.9 * gap0, (gap0, gap1)

    # the saved latents re-render to the saved images
    again, again_labels = render_saved(out)
    assert torch.equal(again_labels, labels)
    assert (again.int() - images.int()).abs().max() <= 1


@pytest.mark.parametrize("name", ["ld3m", "glad"])
def test_recipes_resolve_and_chain_the_prior(name):
    """The shipped recipes build their configs, and recover reads the prior that prior_train writes."""
    from distillset.core.config import load_yaml
    from distillset.launch.recipe import resolve

    recipe = load_yaml(f"recipes/{name}_tiny10.yaml")
    plan = dict(resolve(recipe, recipe["out"]))
    assert plan["prior_train"].kind == name
    assert plan["recover"].parametrization == name
    assert plan["recover"].param_options["prior"] == plan["prior_train"].out
    assert plan["recover"].data == plan["prior_train"].data


@pytest.mark.parametrize("method", ["sre2l", "dc", "mtt"])
def test_other_objectives_run_over_both_priors_from_the_cli(setup, method):
    """BN inversion, DC and MTT over LD3M and GLaD latents through the CLI write images + latents."""
    from distillset.launch.cli import main

    root, data, priors = setup
    extra: list[str] = []
    if method == "sre2l":
        teacher = root / "bn_teacher"
        assert main(["squeeze", "--data", data, "--arch", "convnet_bn", "--model-kwargs", "{width: 8}",
                     "--epochs", "1", "--image-size", "16", "--out", str(teacher), "--autocast", "none"]) == 0
        extra = ["--teachers", str(teacher), "--options", "{r_bn: 1.0}"]
    elif method == "dc":
        extra = ["--options", "{batch_real: 8, width: 8, aug: none}"]
    else:
        experts = root / "experts"
        assert main(["squeeze", "trajectories", "--data", data, "--num-experts", "1", "--epochs", "2",
                     "--image-size", "16", "--model-kwargs", "{width: 8}", "--augment", "none",
                     "--out", str(experts)]) == 0
        extra = ["--options", f"{{buffer: {experts}, expert_epochs: 1, syn_steps: 2, max_start_epoch: 1}}"]
    for kind in ("ld3m", "glad"):
        out = root / f"{method}_{kind}"
        opts = f"{{prior: {priors[kind]}, chunk: 2{', steps: 2' if kind == 'ld3m' else ''}}}"
        code = main(["recover", "--method", method, "--data", data, "--parametrization", kind, "--param-options",
                     opts, "--ipc", "1", "--iterations", "2", "--lr", "0.01", "--image-size", "16",
                     "--augmentation", "none", "--autocast", "none", "--channels-last", "false", "--out", str(out),
                     *extra])
        assert code == 0, (method, kind)
        images, manifest = load_distilled(out)
        assert len(images) == CLASSES and manifest["parametrization"] == kind
        assert list((out / "latents").glob("unit-*.safetensors"))
