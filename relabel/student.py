"""Training fresh students on a (distilled or real) image set and measuring top-1 on the real test split.

Two protocols, because published numbers use two (REFERENCE.md, "Comparing fairly"):
    ``sre2l``     AdamW (lr 1e-3, wd 0.01), cosine, RandomResizedCrop + flip; KD from stored soft labels (the crops
                  are the ones the labels were computed on) or cross-entropy with hard labels.
    ``matching``  SGD (momentum 0.9, wd 5e-4, lr 0.01 or the learned lr of MTT/DATM), lr x0.1 at half, DSA
                  augmentation (:func:`distillset.squeeze.dsa.dsa_augment`); hard labels, or learned soft
                  labels (DATM).

A third, ``plain`` (the matching protocol's SGD and schedule without any augmentation), is the usual target model of
membership-inference studies: it fits its training images as closely as it can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillset.core.compiling import FallbackCompiled
from distillset.core.data import ImageSet
from distillset.core.errors import DistillError
from distillset.core.runtime import autocast_dtype
from distillset.core.schedule import cosine
from distillset.relabel.softlabels import SoftLabels, apply_crops, epoch_crops
from distillset.squeeze.data import evaluate_model
from distillset.squeeze.dsa import DSA_STRATEGY, SiameseAug
from distillset.squeeze.inputs import ZCA, InputTransform
from distillset.squeeze.models import create_model


@dataclass
class StudentSpec:
    """How to train one student.

    ``compile`` runs the forward and backward through ``torch.compile`` (inductor fuses the norm, activation and pool
    passes that dominate a small CNN's step): once per process and architecture it costs a compilation (tens of
    seconds on a CPU; later students of the same shapes reuse it), so it pays off for long students, not for the
    demo's (benchmarks/results/students.md)."""

    arch: str
    model_kwargs: dict
    epochs: int
    protocol: str = "sre2l"
    batch_size: int = 64
    lr: float | None = None
    temperature: float = 4.0
    min_scale: float = 0.08
    flip: bool = True
    autocast: str = "auto"
    compile: bool = False
    lr_zeta: float = 1.0  # EDC's smoothing schedule: the sre2l cosine stretched over zeta x the steps


PROTOCOLS = ("sre2l", "matching", "plain")


def train_student(train: ImageSet, test: ImageSet, spec: StudentSpec, mean, std, seed: int, device,
                  soft: SoftLabels | None = None, soft_targets: torch.Tensor | None = None,
                  zca: ZCA | None = None, on_epoch=None) -> float:
    """Train one fresh student (seeded) and return its top-1 on ``test``.

    ``soft`` gives per-epoch crops + soft labels (SRe2L/FKD); ``soft_targets`` (N, C) fixed soft labels (DATM);
    ``zca`` whitens the student's inputs (train and test) after normalisation, as the set was distilled;
    ``on_epoch()`` is called after every epoch (a progress bar).
    """
    model = fit_student(train, spec, mean, std, seed, device, soft, soft_targets, zca, on_epoch)
    return evaluate_model(model, test, mean, std, device, zca=zca)


def fit_student(train: ImageSet, spec: StudentSpec, mean, std, seed: int, device, soft: SoftLabels | None = None,
                soft_targets: torch.Tensor | None = None, zca: ZCA | None = None, on_epoch=None,
                init_state: dict | None = None) -> torch.nn.Module:
    """Train one fresh student (seeded) on ``train`` and return it in eval mode (see :func:`train_student`).

    ``init_state`` starts it from those weights instead of a random init (a federated round continues the global
    model)."""
    check_spec(spec, soft)
    model = init_student(train, spec, seed, device)
    if init_state is not None:
        model.load_state_dict(init_state)
    feed = Feed(train, spec, seed, device, soft, soft_targets)
    opt, sched = optimizer(model.parameters(), spec, feed.total_steps, device)
    amp = autocast_dtype(spec.autocast, torch.device(device))
    norm = InputTransform(mean, std, zca).to(device)
    model.train()
    forward = compiled(model, spec)
    for epoch in range(spec.epochs):
        feed.start_epoch(epoch)
        for k in range(feed.steps_per_epoch):
            x = feed.augment(*feed.batch(k))
            with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                logits = forward(norm(x)).float()
            loss = feed.loss(logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch()
    feed.check_finite(loss)
    return model.eval()


def compiled(model: torch.nn.Module, spec: StudentSpec):
    """``model`` itself, or its ``torch.compile`` form when the spec asks for it (the weights stay ``model``'s)."""
    return FallbackCompiled(model) if spec.compile else model


def check_spec(spec: StudentSpec, soft: SoftLabels | None) -> None:
    if spec.protocol not in PROTOCOLS:
        raise DistillError(f"unknown evaluation protocol '{spec.protocol}'; use {', '.join(PROTOCOLS)}.")
    check_lr_zeta(spec.lr_zeta, spec.protocol)
    if soft is not None:
        soft.check_student_epochs(spec.epochs)


def check_lr_zeta(zeta: float, protocol: str) -> None:
    """EDC's smoothing schedule stretches the sre2l cosine; the step-schedule protocols have none to stretch."""
    if not 1 <= zeta <= 100:
        raise DistillError(f"lr_zeta must be in [1, 100] (1 = plain cosine, 2 = EDC's smoothing to half the lr), "
                           f"got {zeta}.")
    if zeta != 1 and protocol != "sre2l":
        raise DistillError(f"lr_zeta stretches the sre2l protocol's cosine schedule; the {protocol} protocol "
                           "steps its lr down at half: drop lr_zeta or use --protocol sre2l.")


def init_student(train: ImageSet, spec: StudentSpec, seed: int, device) -> torch.nn.Module:
    """The student's random init: a pure function of ``seed`` (what lets a cohort member equal its lone twin)."""
    torch.manual_seed(seed)
    return create_model(spec.arch, train.num_classes, train.image_shape[0], train.image_shape[-1],
                        **spec.model_kwargs).to(device)


def optimizer(params, spec: StudentSpec, total: int, device):
    """The protocol's optimiser and per-step schedule. Every update is elementwise, so one optimiser over the stacked
    weights of a cohort is one independent optimiser per student. The fused kernels (CPU and CUDA) update every
    tensor in one pass: on a small student the per-tensor updates otherwise cost as much as its forward and backward
    (benchmarks/results/students.md)."""
    params = list(params)
    fast = {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}
    if spec.protocol == "sre2l":
        opt = torch.optim.AdamW(params, lr=spec.lr or 1e-3, weight_decay=0.01, **fast)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, total, zeta=spec.lr_zeta))
    opt = torch.optim.SGD(params, lr=spec.lr or 0.01, momentum=0.9, weight_decay=5e-4, **fast)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < total // 2 else 0.1)


class Feed:
    """What a student's seed decides besides its init: the order of its images, its augmentation draws (all from one
    generator, in the order the loop consumes them) and its loss. The one-at-a-time loop and a cohort
    (:mod:`distillset.relabel.cohort`) read the same feed, which is why a cohort member equals its lone twin.

    ``crop_cache`` (epoch -> crops) shares the stored-label crops between students of one label set: they depend on
    the epoch, never on the seed.
    """

    def __init__(self, train: ImageSet, spec: StudentSpec, seed: int, device, soft: SoftLabels | None = None,
                 soft_targets: torch.Tensor | None = None, crop_cache: dict | None = None):
        self.spec, self.seed, self.device, self.soft, self.soft_targets = spec, seed, device, soft, soft_targets
        self.n = len(train)
        self.steps_per_epoch = max(1, math.ceil(self.n / spec.batch_size))
        self.total_steps = self.steps_per_epoch * spec.epochs
        self.x_all = train.images.to(device).float() / 255
        self.y_all = train.labels.to(device)
        self.g = torch.Generator().manual_seed(seed)
        self.dsa = SiameseAug(DSA_STRATEGY, one_op=True, siamese=False) if spec.protocol == "matching" else None
        self.temperature = float(soft.meta["temperature"]) if soft is not None else spec.temperature
        self.crop_cache = crop_cache if crop_cache is not None else {}
        self.perm = self.stored = self.crops = self.j = None

    def start_epoch(self, epoch: int) -> None:
        self.perm = torch.randperm(self.n, generator=self.g)
        soft = self.soft
        self.stored = soft.draw(epoch) if soft is not None else None  # the stored (crop, label) pair of every image
        self.crops = None  # plain: no augmentation; matching: DSA per batch
        if self.stored is not None and self.dsa is None:
            if epoch not in self.crop_cache:
                self.crop_cache.clear()  # one epoch at a time: the cohort's students walk the epochs together
                self.crop_cache[epoch] = soft.crops(self.stored)  # the crops the labels were computed on
            self.crops = self.crop_cache[epoch]
        elif self.spec.protocol == "sre2l":
            self.crops = epoch_crops(self.n, self.seed, epoch, self.spec.min_scale, self.spec.flip)

    def batch(self, k: int) -> tuple[torch.Tensor, tuple[str, dict] | None]:
        """Images of step ``k`` (before augmentation) and the augmentation drawn for them: ``("crop", params)``,
        ``("dsa", params)`` or ``None``."""
        bs = self.spec.batch_size
        j = self.perm[k * bs:(k + 1) * bs]
        self.j = j
        x = self.x_all[j.to(self.device)]
        if self.crops is not None:
            return x, ("crop", {key: v[j] for key, v in self.crops.items()})
        if self.dsa is not None:
            return x, ("dsa", self.dsa.sample(x.shape[0], self.g, tuple(x.shape[-2:])))
        return x, None

    def augment(self, x: torch.Tensor, aug: tuple[str, dict] | None) -> torch.Tensor:
        if aug is None:
            return x
        kind, p = aug
        return apply_crops(x, p) if kind == "crop" else self.dsa.apply(x, p)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The loss of the last :meth:`batch` (KD from stored labels, fixed soft targets or cross-entropy)."""
        j = self.j
        if self.soft is not None:
            target = self.soft.targets(self.stored[j], j).to(self.device)
            t = self.temperature
            return F.kl_div(F.log_softmax(logits / t, 1), target, reduction="batchmean") * t ** 2
        if self.soft_targets is not None:
            return -(self.soft_targets[j.to(self.device)] * F.log_softmax(logits, 1)).sum(1).mean()
        return F.cross_entropy(logits, self.y_all[j.to(self.device)])

    @staticmethod
    def check_finite(loss: torch.Tensor) -> None:
        # read once, after the last step: a host sync per step would stall an accelerator's queue
        if not math.isfinite(float(loss.detach())):
            raise DistillError("student training diverged (NaN loss); lower the student lr.")
