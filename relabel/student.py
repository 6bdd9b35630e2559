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

from distillset.core.data import ImageSet
from distillset.core.errors import DistillError
from distillset.core.runtime import autocast_dtype
from distillset.core.schedule import cosine
from distillset.relabel.softlabels import SoftLabels, apply_crops, epoch_crops
from distillset.squeeze.data import evaluate_model
from distillset.squeeze.dsa import dsa_augment
from distillset.squeeze.inputs import ZCA, InputTransform
from distillset.squeeze.models import create_model


@dataclass
class StudentSpec:
    """How to train one student."""

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
    if spec.protocol not in PROTOCOLS:
        raise DistillError(f"unknown evaluation protocol '{spec.protocol}'; use {', '.join(PROTOCOLS)}.")
    if soft is not None:
        soft.check_student_epochs(spec.epochs)
    torch.manual_seed(seed)
    n, c = len(train), train.num_classes
    model = create_model(spec.arch, c, train.image_shape[0], train.image_shape[-1], **spec.model_kwargs).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    steps_per_epoch = max(1, math.ceil(n / spec.batch_size))
    total = steps_per_epoch * spec.epochs
    if spec.protocol == "sre2l":
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr or 1e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, total))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=spec.lr or 0.01, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < total // 2 else 0.1)
    dsa = dsa_augment if spec.protocol == "matching" else None
    amp = autocast_dtype(spec.autocast, torch.device(device))
    norm = InputTransform(mean, std, zca).to(device)
    x_all = train.images.to(device).float() / 255
    y_all = train.labels.to(device)
    g = torch.Generator().manual_seed(seed)
    temperature = float(soft.meta["temperature"]) if soft is not None else spec.temperature
    model.train()
    for epoch in range(spec.epochs):
        perm = torch.randperm(n, generator=g)
        stored = soft.draw(epoch) if soft is not None else None  # the stored (crop, label) pair of every image
        crops = None  # plain: no augmentation; matching: DSA below
        if stored is not None and dsa is None:
            crops = soft.crops(stored)  # the crops the labels were computed on
        elif spec.protocol == "sre2l":
            crops = epoch_crops(n, seed, epoch, spec.min_scale, spec.flip)
        for k in range(steps_per_epoch):
            j = perm[k * spec.batch_size:(k + 1) * spec.batch_size]
            x = x_all[j.to(device)]
            if crops is not None:
                x = apply_crops(x, crops, j)
            elif dsa is not None:
                x = dsa(x, g)
            with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                logits = model(norm(x)).float()
            if soft is not None:
                target = soft.targets(stored[j], j).to(device)
                loss = F.kl_div(F.log_softmax(logits / temperature, 1), target, reduction="batchmean")
                loss = loss * temperature ** 2
            elif soft_targets is not None:
                loss = -(soft_targets[j.to(device)] * F.log_softmax(logits, 1)).sum(1).mean()
            else:
                loss = F.cross_entropy(logits, y_all[j.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch()
    if not math.isfinite(float(loss.detach())):
        raise DistillError("student training diverged (NaN loss); lower the student lr.")
    return model.eval()
