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

import torch
import torch.nn.functional as F

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Parametrization, register_objective
from distillset.recover.objectives._matching import (
    NetSchedule,
    ScheduledNetObjective,
    SiameseAugmenter,
    class_positions,
)
from distillset.recover.objectives.model_aug import NetSource


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


@register_objective("dc")
class GradientMatching(ScheduledNetObjective):
    """DC: per-class gradient matching on a ConvNet, bi-level (network trained on the synthetic set in between).

    Options:
        batch_real: real images per class per step (256).
        outer_loop, inner_loop: DC's loops (0 = the paper's values for the run's ipc).
        lr_net: SGD learning rate of the inner network updates (0.01).
        batch_train: batch size of the inner updates (256).
        metric: gradient distance: ours (layer-wise 1 - cosine over output channels), mse or cos.
        aug: augmentation applied Siamese to real and synthetic batches: none (DC), dsa, diffaugment, or engine
            (the recipe's ``augmentation``); also used in the inner network updates.
        arch, width: the ConvNet (convnet = instance norm, depth from the image size; width 128).
        model_pool, perturb, pool_epochs, pool_lr: Acc-DD model augmentation (see ``model_aug``).
    """

    needs_real = True
    joint_classes = True
    default_aug = "none"

    def __init__(self, batch_real: int = 256, outer_loop: int = 0, inner_loop: int = 0, lr_net: float = 0.01,
                 batch_train: int = 256, metric: str = "ours", aug: str | None = None, aug_options: dict | None = None,
                 arch: str = "convnet", width: int = 128, model_pool: int | str = 0, perturb: float = 0.0,
                 pool_epochs: float = 2.0, pool_lr: float = 0.01):
        gradient_distance([torch.ones(1, 1)], [torch.ones(1, 1)], metric)  # validates the name
        if batch_real < 1 or outer_loop < 0 or inner_loop < 0:
            raise DistillError("batch_real must be >= 1 and outer_loop/inner_loop >= 0 (0 = the paper's values).")
        self.batch_real, self.metric = batch_real, metric
        self.augmenter = SiameseAugmenter(aug or self.default_aug, aug_options)
        self.source = NetSource(arch, width, model_pool, perturb, pool_epochs, pool_lr)
        self.schedule = NetSchedule(self.source, outer_loop, inner_loop, lr_net, self.augmenter, batch_train)
        self._logs: dict[str, float] = {}

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
            with ctx.autocast():
                out_real = net(self.norm(real))
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
        self._logs = {"match": float(total.detach())}
        return total



@register_objective("dsa")
class DSAGradientMatching(GradientMatching):
    """DSA: DC with Differentiable Siamese Augmentation (one op family per step, the same draw for the real and the
    synthetic batch of each class, and DSA in the inner network updates). Options: as ``dc`` (aug defaults to dsa)."""

    default_aug = "dsa"
