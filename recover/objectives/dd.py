"""The original Dataset Distillation (Wang et al. 2018): back-propagate through unrolled gradient descent.

Each loss evaluation draws a fresh randomly initialised network, trains it for ``inner_steps`` full-batch GD steps on
the (augmented) synthetic set with learnable per-step step sizes, and scores the trained network by cross-entropy on
a batch of real images. The gradient flows through every inner step into the images and the step sizes (second-order
terms included), so memory grows with ``inner_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed
from distillset.recover.base import Context, Objective, Parametrization, register_objective
from distillset.recover.objectives._matching import Normalize
from distillset.squeeze.models import create_model
from distillset.squeeze.trajectories import FlatModel


@register_objective("dd", paper="Wang et al. 2018, Dataset Distillation (arXiv:1811.10959)")
class DD(Objective):
    """Wang et al. 2018: unrolled inner GD on the synthetic set from random inits, outer loss on real data."""

    @dataclass
    class Config:
        """Options of DD.

        Attributes:
            arch: registry architecture of the inner network (instance-norm ConvNet by default).
            model_kwargs: its keyword arguments (e.g. width, depth).
            inner_steps: GD steps of the inner loop (each with its own learnable step size).
            inner_epochs: passes over the inner steps (step sizes are shared between passes, as DD's epochs).
            lr_init: initial inner step size.
            lr_lr: learning rate of the (log) step sizes in the engine's optimiser.
            real_batch: real images per outer loss (drawn uniformly over the classes).
        """

        arch: str = "convnet"
        model_kwargs: dict = field(default_factory=dict)
        inner_steps: int = 10
        inner_epochs: int = 1
        lr_init: float = 0.01
        lr_lr: float = 1e-2
        real_batch: int = 256

        def __post_init__(self):
            if self.inner_steps < 1 or self.inner_epochs < 1 or self.real_batch < 1:
                raise DistillError("inner_steps, inner_epochs and real_batch must be >= 1.")
            if self.lr_init <= 0:
                raise DistillError(f"lr_init must be > 0, got {self.lr_init}.")

    needs_real = True
    joint_classes = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        arch, model_kwargs, inner_steps, inner_epochs = c.arch, c.model_kwargs, c.inner_steps, c.inner_epochs
        lr_init, lr_lr, real_batch = c.lr_init, c.lr_lr, c.real_batch
        self.arch, self.model_kwargs = arch, dict(model_kwargs or {})
        self.inner_steps, self.inner_epochs, self.real_batch, self.lr_lr = inner_steps, inner_epochs, real_batch, lr_lr
        # log-parametrised so the step sizes stay positive
        self.log_lr = nn.Parameter(torch.full((inner_steps,), math.log(lr_init)))
        self._logs: dict[str, float] = {}

    def setup(self, ctx: Context) -> None:
        c, h, _ = ctx.image_shape
        self.build = lambda: create_model(self.arch, ctx.num_classes, c, h, **self.model_kwargs).to(ctx.device)
        self.net = FlatModel(self.build())
        self.norm = Normalize(ctx).to(ctx.device)  # the run's input space, which evaluate uses too
        self.log_lr.data = self.log_lr.data.to(ctx.device)

    def extra_parameters(self) -> list:
        return [{"params": [self.log_lr], "lr": self.lr_lr}]

    def fresh_init(self, ctx: Context) -> torch.Tensor:
        """Flat parameters of a new random network, seeded from the unit generator."""
        seed = mix_seed(int(torch.randint(2 ** 62, (1,), generator=ctx.generator)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def real_batch_(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        cls = torch.randint(ctx.num_classes, (self.real_batch,), generator=ctx.generator)
        counts = torch.bincount(cls, minlength=ctx.num_classes)
        xs, ys = [], []
        for c, n in enumerate(counts.tolist()):
            if n:
                xs.append(ctx.real.sample(c, n, ctx.generator))
                ys.append(torch.full((n,), c, device=ctx.device))
        return torch.cat(xs), torch.cat(ys)

    def unroll(self, theta: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor, ctx: Context) -> torch.Tensor:
        lrs = self.log_lr.exp()
        for _ in range(self.inner_epochs):
            for i in range(self.inner_steps):
                x = ctx.augment(x_syn, ctx) if ctx.augment is not None else x_syn
                ce = F.cross_entropy(self.net(theta, self.norm(x)), y_syn)
                g = torch.autograd.grad(ce, theta, create_graph=True)[0]
                theta = theta - lrs[i] * g
        return theta

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        theta0 = self.fresh_init(ctx).requires_grad_(True)
        theta = self.unroll(theta0, syn.render(), syn.labels, ctx)
        xr, yr = self.real_batch_(ctx)
        xr = self.norm(xr)
        loss = F.cross_entropy(self.net(theta, xr), yr)
        with torch.no_grad():
            before = F.cross_entropy(self.net(theta0, xr), yr)
        self._logs = {"real_ce": float(loss.detach()), "real_ce_init": float(before),
                      "inner_lr": float(self.log_lr.detach().exp().mean())}
        return loss

    def final_state(self) -> dict[str, torch.Tensor]:
        """The learned step sizes: ``lrs`` per inner step and ``lr`` their mean (what a student evaluation uses)."""
        lrs = self.log_lr.detach().exp().float().cpu()
        return {"lr": lrs.mean().reshape(1), "lrs": lrs}

    def logs(self) -> dict[str, float]:
        return dict(self._logs)
