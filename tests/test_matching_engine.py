"""End to end through recover.engine.run: DM writes the standard folder, and plugins defined outside the package
(registered by decorator or found through an entry point) run through the same loop unchanged."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import torch

from distillset.core.config import from_dict, load_yaml
from distillset.core.data import Source
from distillset.core.distilled import load_distilled
from distillset.recover import base
from distillset.recover.base import Objective, register_objective
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run

DATA = "npz:tests/assets/cifar10_small.npz"


def test_dm_end_to_end_writes_the_standard_folder(tmp_path):
    cfg = RecoverConfig(out=str(tmp_path / "dm"), data=DATA, method="dm", ipc=2, iterations=6, parametrization="pixel",
                        param_options={"init": "real"}, augmentation="none", optimizer="sgd", lr=1.0, momentum=0.5,
                        schedule="constant", classes_per_unit=5, options={"width": 32, "batch_real": 16},
                        log_every=3, autocast="none")
    manifest = run(cfg)
    assert manifest["status"] == "complete" and manifest["method"] == "dm" and manifest["num_images"] == 20
    out = tmp_path / "dm"
    assert (out / "grid.png").exists() and (out / "config.yaml").exists()
    assert len(list((out / "images").glob("shard-*.tar"))) == 2  # two class blocks (DM shards by class)
    images, _ = load_distilled(out)
    assert images.labels.tolist() == sorted(images.labels.tolist()) and images.image_shape == (3, 32, 32)
    # optimised: not the real images the pixels started from
    train = Source(DATA).load("train")
    flat = train.images.flatten(1).float()
    nearest = torch.cdist(images.images.flatten(1).float(), flat).min(1).values
    assert (nearest > 0).all()
    logs = [u for r in manifest["runs"][0]["ranks"] for u in r["units"]]
    assert all("gap" in u for u in logs)


class MeanColour(Objective):
    """A plugin from outside the package: pull every synthetic image's mean colour towards a target."""

    @dataclass
    class Config:
        """Options.

        Attributes:
            target: the mean colour to reach.
        """

        target: float = 0.25

    needs_real = False

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self.target = self.cfg.target

    def loss(self, syn, ctx):
        return ((syn.render().mean(dim=(1, 2, 3)) - self.target) ** 2).sum()


def _check_mean_colour(out, target):
    images, _ = load_distilled(out)
    means = images.images.float().div(255).mean(dim=(1, 2, 3))
    assert torch.allclose(means, torch.full_like(means, target), atol=0.02), means


def test_external_objective_by_decorator_runs_unchanged(tmp_path):
    register_objective("test_mean_colour")(MeanColour)
    try:
        cfg = RecoverConfig(out=str(tmp_path / "ext"), data=DATA, method="test_mean_colour", ipc=1, iterations=60,
                            augmentation="none", lr=0.05, options={"target": 0.3}, autocast="none")
        assert run(cfg)["status"] == "complete"
        _check_mean_colour(tmp_path / "ext", 0.3)
    finally:
        base.OBJECTIVES.remove("test_mean_colour")


class EntryPointObjective(MeanColour):
    """Not decorated: it joins only through the (fake) ``distillset.objectives`` entry point."""


def test_external_objective_by_entry_point(tmp_path, monkeypatch):
    ep = importlib.metadata.EntryPoint(name="ep_mean_colour", group="distillset.objectives",
                                       value="tests.test_matching_engine:EntryPointObjective")
    real_eps = importlib.metadata.entry_points

    def fake(**kw):
        return [ep] if kw.get("group") == "distillset.objectives" else real_eps(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    base.OBJECTIVES.forget_plugins()
    try:
        assert "ep_mean_colour" in base.registry("objective")
        cfg = RecoverConfig(out=str(tmp_path / "ep"), data=DATA, method="ep_mean_colour", ipc=1, iterations=60,
                            augmentation="none", lr=0.05, options={"target": 0.6}, autocast="none")
        assert run(cfg)["status"] == "complete"
        _check_mean_colour(tmp_path / "ep", 0.6)
    finally:
        base.OBJECTIVES.forget_plugins()


def test_matching_recipes_resolve_and_run_tiny(tmp_path):
    """Every shipped matching recipe builds its RecoverConfig and runs at a debug size on the fixture."""
    for name in ("dc", "dsa", "dm"):
        rec = load_yaml(f"recipes/{name}_cifar10.yaml")
        sec = dict(rec["recover"])
        assert sec["method"] == name and sec["data"].startswith("torchvision:CIFAR10")
        sec.update(out=str(tmp_path / name), data=DATA, ipc=1, iterations=2, autocast="none",
                   options={**sec["options"], "batch_real": 8, "width": 16})
        cfg = from_dict(RecoverConfig, sec)
        assert run(cfg)["status"] == "complete"
