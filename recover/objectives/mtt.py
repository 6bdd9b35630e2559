"""Matching Training Trajectories (MTT, Cazenavette et al. 2022) with TESLA's constant-memory gradient and the
FTD / AST refinements.

One loss evaluation: pick an expert and a start epoch ``t``; a student starts at the expert's parameters
``theta*_t`` and takes ``syn_steps`` (N) SGD steps on batches of synthetic images with a learnable step size; the
loss is the normalised distance ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` to the expert
``expert_epochs`` (M) epochs later. The network runs with a flat parameter vector (``torch.func.functional_call``),
so the N steps are differentiable with respect to the images and the step size.

``tesla: true`` computes the *same* gradient without keeping the N-step autograd graph: the student steps are
replayed forward without a graph (only the N parameter vectors are kept), then an adjoint pass walks the steps
backwards, recomputing one step's graph at a time and carrying ``lambda_i = dL/dtheta_i`` with a Hessian-vector
product (``lambda_i = lambda_{i+1} - lr * H_i lambda_{i+1}``). This is exact reverse-mode differentiation (TESLA's
published formula drops the Hessian terms; this one keeps them), so graph memory is one step's whatever N is.

Refinements (options): ``ema`` (FTD: the images written at the end are an exponential moving average of the
iterates; the engine keeps it, see :mod:`recover.ema`), ``intermediate`` (AST-style: also match the expert at every
intermediate epoch ``t+1 .. t+M-1`` at the proportional student step), ``loss_clip`` (saturate a diverging
student's loss smoothly at ``loss_clip``, so one bad start epoch cannot blow the images up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Objective, Parametrization, register_objective
from distillset.squeeze.inputs import ZCA, InputTransform
from distillset.squeeze.trajectories import ExpertBuffers, FlatModel, check_buffer_matches, load_buffers

log = logging.getLogger("distillset.recover")


def _attach(value: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient with respect to each tensor ``t`` of ``pairs`` is ``g``."""
    out = value.detach()
    for t, g in pairs:
        if g is not None and t.requires_grad:
            a = (t * g).sum()
            out = out + (a - a.detach())
    return out


@register_objective("mtt", paper="Cazenavette et al. 2022, Dataset Distillation by Matching Training Trajectories "
                    "(arXiv:2203.11932)")
class MTT(Objective):
    """Trajectory matching against recorded experts (``distillset squeeze trajectories``)."""

    @dataclass
    class Config:
        """Options of trajectory matching.

        Attributes:
            buffer: folder of replay_buffer_*.safetensors (or one file) written by `distillset squeeze trajectories`.
            expert_epochs: M, expert epochs between the start and the target.
            syn_steps: N, student SGD steps on synthetic batches per loss evaluation.
            min_start_epoch: lowest start epoch.
            max_start_epoch: start epochs are drawn from [min_start_epoch, max_start_epoch) (clipped to epochs - M).
            batch_syn: synthetic images per student step (0 = all images of the set).
            lr_teacher: initial value of the learnable student step size (the experts' lr).
            lr_lr: learning rate of the step size in the engine's optimiser.
            learn_lr: learn the step size (else it stays at lr_teacher).
            tesla: exact gradient in constant graph memory (adjoint pass) instead of back-propagating the unroll.
            ema: FTD: decay of an exponential moving average of the synthetic tensors, written at the end (0 = off);
                the engine keeps the average (the same as its ema_decay option).
            intermediate: AST-style: also match the expert at the intermediate epochs.
            loss_clip: saturate the normalised distance smoothly at this value (0 = off).
            max_experts: use only the first N experts (0 = all).
            arch: expected expert architecture ("" = the buffers'); a mismatch is an error.
        """

        buffer: str = ""
        expert_epochs: int = 2
        syn_steps: int = 20
        min_start_epoch: int = 0
        max_start_epoch: int = 20
        batch_syn: int = 0
        lr_teacher: float = 0.01
        lr_lr: float = 1e-5
        learn_lr: bool = True
        tesla: bool = False
        ema: float = 0.0
        intermediate: bool = False
        loss_clip: float = 0.0
        max_experts: int = 0
        arch: str = ""

        def __post_init__(self):
            if not self.buffer:
                raise DistillError("trajectory matching needs expert trajectories: set options.buffer to the folder "
                                   "written by `distillset squeeze trajectories`.")
            if self.expert_epochs < 1 or self.syn_steps < 1:
                raise DistillError("expert_epochs and syn_steps must be >= 1.")
            if not 0 <= self.min_start_epoch < self.max_start_epoch:
                raise DistillError(f"need 0 <= min_start_epoch < max_start_epoch, got {self.min_start_epoch}, "
                                   f"{self.max_start_epoch}.")
            if not 0 <= self.ema < 1:
                raise DistillError(f"ema is a decay in [0, 1), got {self.ema}.")
            if self.intermediate and self.syn_steps < self.expert_epochs:
                raise DistillError("intermediate matching needs syn_steps >= expert_epochs.")

    joint_classes = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.buffer, self.expert_epochs, self.syn_steps = c.buffer, int(c.expert_epochs), int(c.syn_steps)
        self.min_start_epoch, self.max_start_epoch = int(c.min_start_epoch), int(c.max_start_epoch)
        self.batch_syn, self.lr_teacher, self.lr_lr, self.learn_lr = int(c.batch_syn), c.lr_teacher, c.lr_lr, c.learn_lr
        self.tesla, self.ema, self.intermediate = c.tesla, float(c.ema), c.intermediate
        self.loss_clip = float(c.loss_clip)
        self.max_experts, self.arch = int(c.max_experts), c.arch
        self.syn_lr = nn.Parameter(torch.tensor(float(c.lr_teacher)), requires_grad=c.learn_lr)
        self.experts: ExpertBuffers | None = None
        self._logs: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------ setup

    def setup(self, ctx: Context) -> None:
        if self.experts is None:
            self.experts = load_buffers(self.buffer, self.max_experts)
        ex = self.experts
        ex.check_task(ctx.num_classes, ctx.image_shape)
        if self.arch and self.arch != ex.meta["arch"]:
            raise DistillError(f"expert buffers in {ex.paths[0].parent} record {ex.meta['arch']} but options.arch "
                               f"is {self.arch}; record trajectories for {self.arch} or drop options.arch.")
        if self.expert_epochs + self.min_start_epoch > ex.epochs:
            raise DistillError(f"the experts have {ex.epochs} epochs, fewer than min_start_epoch + expert_epochs "
                               f"= {self.min_start_epoch + self.expert_epochs}; record longer trajectories or lower "
                               "them.")
        model = ex.build_model(ctx.device)
        check_buffer_matches(ex, model, self.arch or ex.meta["arch"])
        self.net = FlatModel(model)
        zca = ZCA.load(ex.zca_path) if ex.zca_path is not None else None
        self.norm = InputTransform(ex.meta["mean"], ex.meta["std"], zca).to(ctx.device)  # the experts' input space
        self.syn_lr.data = self.syn_lr.data.to(ctx.device)

    def input_reference(self) -> dict:
        ex = self.experts or load_buffers(self.buffer, self.max_experts)
        self.experts = ex
        return {"mean": ex.meta["mean"], "std": ex.meta["std"], "zca": ex.zca_path,
                "source": f"expert buffers in {ex.paths[0].parent}"}

    def extra_parameters(self) -> list:
        return [{"params": [self.syn_lr], "lr": self.lr_lr}] if self.learn_lr else []

    # ----------------------------------------------------------------------------------------------- inner steps

    def start_window(self, ctx: Context) -> tuple[int, int]:
        """Start epochs are drawn uniformly from ``[lo, hi)``."""
        hi = min(self.max_start_epoch, self.experts.epochs - self.expert_epochs + 1)
        return self.min_start_epoch, max(hi, self.min_start_epoch + 1)

    def label_source(self, syn: Parametrization) -> torch.Tensor | None:
        """A learnable tensor the inner loss depends on besides the images (DATM's soft labels)."""
        return None

    def inner_loss(self, logits: torch.Tensor, idx: torch.Tensor, syn: Parametrization,
                   labels: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits, syn.labels[idx])

    def _plan(self, n: int, ctx: Context) -> list[tuple[torch.Tensor, Any]]:
        """Batch indices (permutation chunks, refilled when used up) and augmentation parameters of every step."""
        bs = self.batch_syn or n
        plan, chunks = [], []
        for _ in range(self.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(n, generator=ctx.generator).split(bs))
            idx = chunks.pop(0).to(ctx.device)
            aug = ctx.augment.sample(len(idx), ctx) if ctx.augment is not None else None
            plan.append((idx, aug))
        return plan

    def _step_loss(self, theta, step, x_all, labels, syn, ctx) -> torch.Tensor:
        idx, aug = self.plan[step]
        x = x_all[idx]
        if aug is not None:
            x = ctx.augment.apply(x, aug, ctx)
        return self.inner_loss(self.net(theta, self.norm(x)), idx, syn, labels)

    def _targets(self, expert: torch.Tensor, start: int, ctx: Context) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(student step, expert parameters, squared start distance)`` of every matched point."""
        m, n = self.expert_epochs, self.syn_steps
        epochs = range(1, m + 1) if self.intermediate else [m]
        out = []
        theta0 = expert[start].to(ctx.device)
        for k in epochs:
            target = expert[start + k].to(ctx.device)
            out.append((max(1, round(k * n / m)), target, ((theta0 - target) ** 2).sum()))
        return out

    def _match(self, thetas: dict[int, torch.Tensor], targets) -> tuple[torch.Tensor, torch.Tensor]:
        raw = sum(((thetas[s] - t) ** 2).sum() / d for s, t, d in targets) / len(targets)
        loss = self.loss_clip * torch.tanh(raw / self.loss_clip) if self.loss_clip > 0 else raw
        return loss, raw

    # ------------------------------------------------------------------------------------------------------ loss

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        ex = self.experts
        e = int(torch.randint(len(ex.trajectories), (1,), generator=ctx.generator))
        lo, hi = self.start_window(ctx)
        start = int(torch.randint(lo, hi, (1,), generator=ctx.generator))
        expert = ex.trajectories[e]
        targets = self._targets(expert, start, ctx)
        theta0 = expert[start].to(ctx.device)
        x_all = syn.render()
        labels = self.label_source(syn)
        self.plan = self._plan(x_all.shape[0], ctx)
        if self.tesla:
            loss, raw = self._tesla(theta0, x_all, labels, targets, syn, ctx)
        else:
            loss, raw = self._unrolled(theta0, x_all, labels, targets, syn, ctx)
        self._logs = {"match": float(raw.detach()), "syn_lr": float(self.syn_lr.detach()), "start_epoch": start}
        return loss

    def _unrolled(self, theta0, x_all, labels, targets, syn, ctx):
        """Back-propagation through the whole unroll (MTT): graph memory grows with N."""
        keep = {s for s, _, _ in targets}
        theta = theta0.clone().requires_grad_(True)
        thetas = {}
        for i in range(self.syn_steps):
            ce = self._step_loss(theta, i, x_all, labels, syn, ctx)
            g = torch.autograd.grad(ce, theta, create_graph=True)[0]
            theta = theta - self.syn_lr * g
            if i + 1 in keep:
                thetas[i + 1] = theta
        return self._match(thetas, targets)

    def _tesla(self, theta0, x_all, labels, targets, syn, ctx):
        """The unrolled gradient by an adjoint pass: one step's graph at a time, N parameter vectors kept."""
        lr = self.syn_lr.detach()
        x_leaf = x_all.detach().requires_grad_(True)
        y_leaf = labels.detach().requires_grad_(True) if labels is not None else None
        # forward replay without a graph through the steps
        thetas = [theta0]
        for i in range(self.syn_steps):
            th = thetas[-1].detach().requires_grad_(True)
            ce = self._step_loss(th, i, x_leaf.detach(), y_leaf.detach() if y_leaf is not None else None, syn, ctx)
            g = torch.autograd.grad(ce, th)[0]
            thetas.append((th - lr * g).detach())
        leaves = {s: thetas[s].clone().requires_grad_(True) for s, _, _ in targets}
        loss, raw = self._match(leaves, targets)
        if not torch.isfinite(loss):  # surface it: the engine stops and keeps the last good images
            return _attach(loss, [(x_all, torch.zeros_like(x_all))]), raw
        direct = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        lam = torch.zeros_like(theta0)
        gx = torch.zeros_like(x_all)
        gy = torch.zeros_like(y_leaf) if y_leaf is not None else None
        glr = torch.zeros((), device=theta0.device)
        for i in reversed(range(self.syn_steps)):
            if i + 1 in direct:
                lam = lam + direct[i + 1]
            th = thetas[i].detach().requires_grad_(True)
            ce = self._step_loss(th, i, x_leaf, y_leaf, syn, ctx)
            g = torch.autograd.grad(ce, th, create_graph=True)[0]
            glr = glr - (g.detach() * lam).sum()
            wrt = [th, x_leaf] + ([y_leaf] if y_leaf is not None else [])
            grads = torch.autograd.grad((g * lam).sum(), wrt, allow_unused=True)
            hv, dx = grads[0], grads[1]
            if dx is not None:
                gx = gx - lr * dx
            if y_leaf is not None and grads[2] is not None:
                gy = gy - lr * grads[2]
            lam = lam - lr * (hv if hv is not None else 0)
        pairs = [(x_all, gx), (self.syn_lr, glr)]
        if labels is not None:
            pairs.append((labels, gy))
        return _attach(loss, pairs), raw

    # ------------------------------------------------------------------------------------------------------- EMA

    def image_ema(self) -> float:
        """FTD's ``ema`` option: the engine keeps the moving average of the images and writes it."""
        return self.ema

    # ---------------------------------------------------------------------------------------------------- output

    def final_state(self) -> dict[str, torch.Tensor]:
        """Saved with the distilled set (params/unit-*.safetensors): the learned student step size."""
        return {"lr": self.syn_lr.detach().reshape(1).float().cpu()}

    def logs(self) -> dict[str, float]:
        return dict(self._logs)

    def teardown(self) -> None:
        self.plan = []

