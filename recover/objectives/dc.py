"""Dataset Condensation with gradient matching (DC, Zhao et al. 2021) and with Differentiable Siamese Augmentation
(DSA, Zhao & Bilen 2021).

For every class c, the gradient of the cross-entropy of a ConvNet on a real batch of c is matched to the gradient on
the synthetic images of c, layer by layer, with DC's distance: for each weight tensor (reshaped to output channels x
rest) the sum over output channels of ``1 - cos(g_real, g_syn)``; biases and norm parameters are ignored. Per-class
distances are summed.

Mapping DC's loops onto the engine (which calls :meth:`loss` once per optimiser step): one engine step is one outer
iteration. A fresh network (from ``ctx.generator``, or an Acc-DD pool member) is drawn every ``outer_loop`` steps
and, between two outer steps on the same network, trained ``inner_loop`` epochs on the current synthetic images
(SGD, ``lr_net``). So the paper's K outer "iterations" of (outer_loop x image update + inner updates) are
``K * outer_loop`` engine steps; (outer_loop, inner_loop) default to (1, 1), (10, 50), (50, 10) for ipc 1 / 10 / 50.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Parametrization, register_objective
from distillset.recover.objectives._matching import (
    CompiledNet,
    MatchingConfig,
    NetSchedule,
    ScheduledNetObjective,
    SiameseAugmenter,
    class_positions,
    matching_aug,
)
from distillset.recover.objectives.model_aug import NetConfig


def gradient_distance(gw_real: list[torch.Tensor], gw_syn: list[torch.Tensor], metric: str = "ours") -> torch.Tensor:
    """DC's ``match_loss``: ``ours`` = sum over weight tensors of sum_out-channels (1 - cosine); ``mse``/``cos`` as
    the DC code's alternatives (whole-vector squared error / 1 - cosine)."""
    if metric == "ours":
        total = gw_syn[0].new_zeros(())
        for gr, gs in zip(gw_real, gw_syn):
            if gr.ndim == 1:  # biases and norm affine terms: DC ignores them
                continue
            gr, gs = gr.flatten(1), gs.flatten(1)
            cos = (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)
            total = total + (1 - cos).sum()
        return total
    gr = torch.cat([g.flatten() for g in gw_real])
    gs = torch.cat([g.flatten() for g in gw_syn])
    if metric == "mse":
        return ((gr - gs) ** 2).sum()
    if metric == "cos":
        return 1 - (gr * gs).sum() / (gr.norm() * gs.norm() + 1e-6)
    raise DistillError(f"unknown gradient distance '{metric}'; use ours, mse or cos.")


@register_objective("dc", paper="Zhao et al. 2021, Dataset Condensation with Gradient Matching (arXiv:2006.05929)")
class GradientMatching(ScheduledNetObjective):
    """DC: per-class gradient matching on a ConvNet, bi-level (network trained on the synthetic set in between)."""

    @dataclass
    class Config(MatchingConfig):
        """Options of DC and DSA (besides batch_real and the networks: arch, width, Acc-DD's model_pool ...).

        Attributes:
            outer_loop: DC's outer loop: steps on one network (0 = the paper's value for the run's ipc).
            inner_loop: DC's inner loop: epochs of network training on the synthetic set between steps (0 = the
                paper's value).
            lr_net: SGD learning rate of the inner network updates.
            batch_train: batch size of the inner updates.
            metric: gradient distance: ours (layer-wise 1 - cosine over output channels), mse or cos.
            aug: augmentation applied Siamese to real and synthetic batches, also in the inner network updates:
                none, dsa, diffaugment, or engine (the recipe's augmentation); unset = none for dc, dsa for dsa.
        """

        outer_loop: int = 0
        inner_loop: int = 0
        lr_net: float = 0.01
        batch_train: int = 256
        metric: str = "ours"
        aug: str | None = None

        def __post_init__(self):
            NetConfig.__post_init__(self)
            gradient_distance([torch.ones(1, 1)], [torch.ones(1, 1)], self.metric)  # validates the name
            if self.batch_real < 1 or self.outer_loop < 0 or self.inner_loop < 0:
                raise DistillError("batch_real must be >= 1 and outer_loop/inner_loop >= 0 (0 = the paper's "
                                   "values).")
            if self.aug is not None:
                matching_aug(self.aug, self.aug_options)

    needs_real = True
    joint_classes = True
    default_aug = "none"

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.batch_real, self.metric = c.batch_real, c.metric
        self.augmenter = SiameseAugmenter(c.aug or self.default_aug, c.aug_options)
        self.source = c.net_source()
        self.schedule = NetSchedule(self.source, c.outer_loop, c.inner_loop, c.lr_net, self.augmenter, c.batch_train)
        self._logs: dict[str, torch.Tensor] = {}
        self._compiled: CompiledNet | None = None

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        # the real gradients and the inner updates are first order, so they can run as one compiled graph of the
        # network's weights; the synthetic pass needs create_graph (double backward) and stays eager
        self._compiled = CompiledNet("forward", ctx.autocast_dtype, ctx.device.type) if self.cfg.compiles(ctx) else None
        self.schedule.compiled = self._compiled

    def _forward(self, net: torch.nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self._compiled is not None:
            return self._compiled(net, x)
        with ctx.autocast():
            return net(x)

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        net = self.schedule.network(syn, ctx, self.norm)
        params = [p for p in net.parameters()]
        for p in params:
            p.requires_grad_(True)
        total = None
        for c, pos in class_positions(syn.labels):
            real = ctx.real.sample(c, self.batch_real, ctx.generator)
            x_syn = syn.render(pos)
            real, x_syn = self.augmenter.pair(real, x_syn, ctx)
            out_real = self._forward(net, self.norm(real), ctx)
            y_real = torch.full((real.shape[0],), c, device=real.device)
            g_real = torch.autograd.grad(F.cross_entropy(out_real.float(), y_real), params)
            g_real = [g.detach() for g in g_real]
            with ctx.autocast():
                out_syn = net(self.norm(x_syn))
            g_syn = torch.autograd.grad(F.cross_entropy(out_syn.float(), syn.labels[pos]), params,
                                        create_graph=True)
            d = gradient_distance(g_real, g_syn, self.metric)
            total = d if total is None else total + d
        for p in params:  # the engine's backward must reach only the images
            p.requires_grad_(False)
        self._logs = {"match": total.detach()}  # read (a host sync on GPUs) only when the engine logs
        return total

    def logs(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._logs.items()}



@register_objective("dsa", paper="Zhao & Bilen 2021, Dataset Condensation with Differentiable Siamese Augmentation "
                    "(arXiv:2102.08259)")
class DSAGradientMatching(GradientMatching):
    """DSA: DC with Differentiable Siamese Augmentation (one op family per step, the same draw for the real and the
    synthetic batch of each class, and DSA in the inner network updates). Options: as ``dc`` (aug defaults to dsa)."""

    default_aug = "dsa"
