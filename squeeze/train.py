"""``distillset squeeze``: train a backbone on a source, with accelerate, resumable, saved as safetensors."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from distillset.core.config import check_number, config_diff, fingerprint, to_dict, write_config
from distillset.core.data import ImageSet, Source
from distillset.core.errors import DistillError
from distillset.core.io import finished_record, require_folder, write_json
from distillset.core.runtime import Runtime, autocast_dtype, get_runtime, progress
from distillset.core.schedule import cosine
from distillset.squeeze.augment import affine_crop
from distillset.squeeze.checkpoint import BackboneConfig, save_atomic_state, save_backbone
from distillset.squeeze.data import TrainData, batch_accuracy, channel_stats, evaluate_model  # noqa: F401
from distillset.squeeze.inputs import InputTransform
from distillset.squeeze.models import create_model, model_entry

log = logging.getLogger("distillset.squeeze")


@dataclass
class SqueezeConfig:
    """Train a backbone (the teacher of recover/relabel, or a reference model).

    Attributes:
        out: output folder (model.safetensors, config.json, metrics.json, config.yaml).
        data: data source spec.
        arch: registry model name (convnet_bn, resnet18_cifar, timm:NAME, tv:NAME; see `distillset models`).
        model_kwargs: extra keyword arguments of the architecture (e.g. width, depth).
        epochs: training epochs.
        batch_size: per-process batch size.
        lr: peak learning rate (cosine decay, linear warm-up for one epoch).
        optimizer: sgd (momentum 0.9, nesterov) or adamw.
        weight_decay: weight decay.
        label_smoothing: cross-entropy label smoothing.
        augment: random shift (1/8 of the size, reflected) + horizontal flip during training.
        flip: horizontal flips (turn off for digits, where a flipped 2 is not a 2).
        image_size: resize images to this size (0 = keep).
        seed: seed of initialisation, shuffling and augmentation.
        autocast: auto (bf16 where fast), bf16, fp16 or none.
        max_train: use only the first N training images (0 = all), for debugging.
        steps_per_epoch: for streamed sources without a sample count (0 = from _info.json).
        workers: dataloader workers for streamed sources.
    """

    out: str = "output/squeeze"
    data: str = "digits"
    arch: str = "convnet_bn"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = True
    flip: bool = True
    image_size: int = 0
    seed: int = 0
    autocast: str = "auto"
    max_train: int = 0
    steps_per_epoch: int = 0
    workers: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise DistillError("epochs and batch_size must be >= 1.")
        if self.optimizer not in ("sgd", "adamw"):
            raise DistillError(f"unknown optimizer '{self.optimizer}'; use sgd or adamw.")
        check_number(self.lr, "lr", high=100.0)
        check_number(self.weight_decay, "weight_decay", high=1.0, allow_low=True)
        if not 0 <= self.label_smoothing < 1:
            raise DistillError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if min(self.image_size, self.max_train, self.steps_per_epoch, self.workers) < 0:
            raise DistillError("image_size, max_train, steps_per_epoch and workers must be >= 0 (0 = default).")


NON_SEMANTIC = ("out", "workers")


def train_augment(x: torch.Tensor, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random shift by up to 1/8 of the size (reflect padding) + horizontal flip, batched and on-device."""
    n = x.shape[0]
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.25  # 1/8 of the size in [-1, 1] units
    fl = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    one = torch.ones(n)
    return affine_crop(x, shift[:, 0].to(x.device), shift[:, 1].to(x.device), one.to(x.device), one.to(x.device),
                       fl.to(x.device))


def make_optimizer(params, name: str, lr: float, wd: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def lr_at(step: int, total: int, warmup: int) -> float:
    return cosine(step, total, warmup)


def run(cfg: SqueezeConfig, rt: Runtime | None = None) -> dict:
    """Train (or resume) a backbone; returns its metrics. The folder is complete once config.json exists."""
    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    fp = fingerprint(cfg, NON_SEMANTIC)
    done = finished_record(out / "config.json", fp, "a backbone",
                           lambda old: config_diff(old.get("squeeze"), to_dict(cfg), NON_SEMANTIC))
    if done is not None:
        log.info("%s is already trained (test top-1 %.4f); nothing to do", out, done["metrics"].get("test_top1", 0))
        return done["metrics"]
    entry = model_entry(cfg.arch)
    source = Source(cfg.data, cfg.image_size or None)
    rt.start_tracking(out, "squeeze", to_dict(cfg))
    if source.is_stream:
        from distillset.squeeze.stream import stream_setup

        data = stream_setup(cfg, rt, source)
    else:
        data = memory_setup(cfg, rt, source)
    torch.manual_seed(cfg.seed)
    c, size = data.image_shape[0], data.image_shape[-1]
    model = create_model(cfg.arch, len(data.class_names), c, size, **cfg.model_kwargs)
    bcfg = BackboneConfig(cfg.arch, len(data.class_names), c, size, data.mean, data.std, data.class_names,
                          cfg.model_kwargs, cfg.data)
    metrics = {**fit(model, cfg, rt, data.mean, data.std, out, fp, data.steps, data.batches),
               "train_images": data.num_train}
    metrics["test_top1"] = data.evaluate(model)
    metrics["has_bn"] = entry.has_bn
    bcfg.metrics = metrics
    if rt.is_main:
        save_backbone(out, rt.accelerator.unwrap_model(model), bcfg, {"fingerprint": fp, "squeeze": to_dict(cfg)})
        write_json(out / "metrics.json", metrics)
        write_config(out, cfg)
        ckpt = out / "checkpoint" / "last.pt"  # the resume point is not needed once the backbone is saved
        if ckpt.exists():
            ckpt.unlink()
            if not any(ckpt.parent.iterdir()):
                ckpt.parent.rmdir()
        log.info("squeeze: %s test top-1 %.4f in %.1fs", cfg.arch, metrics["test_top1"], metrics["seconds"])
    rt.wait()
    rt.log_metrics({"squeeze/test_top1": metrics["test_top1"]}, cfg.epochs)
    rt.end_tracking()
    return metrics


def memory_setup(cfg: SqueezeConfig, rt: Runtime, source: Source) -> TrainData:
    train, test = source.load("train"), source.load("test")
    if cfg.max_train:
        train = train.subset(torch.arange(min(cfg.max_train, len(train))))
    train.require_classes(1, "training")  # images come at cfg.image_size: the Source resizes them
    mean, std = channel_stats(train.images)
    steps, batches = memory_batches(train, cfg, rt)
    return TrainData(train.class_names, train.image_shape, mean, std, len(train), steps, batches,
                     lambda model: evaluate_model(model, test, mean, std, rt.device, rt))


def memory_batches(train: ImageSet, cfg: SqueezeConfig, rt: Runtime):
    """``(steps_per_epoch, batches(epoch, generator))`` over an in-memory split held on the device: each rank takes
    an equal slice of every epoch's seeded permutation (equal step counts keep DDP collectives in lock-step)."""
    images, labels = train.images.to(rt.device), train.labels.to(rt.device)
    per_rank = len(train) // rt.world
    steps = max(1, math.ceil(per_rank / cfg.batch_size))

    def batches(epoch: int, g: torch.Generator):
        perm = torch.randperm(len(train), generator=g)[rt.rank * per_rank:(rt.rank + 1) * per_rank].to(rt.device)
        for k in range(steps):
            j = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            yield images[j], labels[j]

    return steps, batches


def fit(model, cfg: SqueezeConfig, rt: Runtime, mean, std, out: Path, fp: str, steps: int, batches) -> dict:
    """The training loop shared by in-memory and streamed sources: ``batches(epoch, generator)`` yields ``steps``
    uint8 image / label batches on the device. Checkpoints every epoch; a re-run resumes at the last one."""
    device = rt.device
    model = model.to(device)
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    model, opt = rt.accelerator.prepare(model, opt)
    amp = autocast_dtype(cfg.autocast, device)
    norm = InputTransform(mean, std).to(device)
    total = steps * cfg.epochs
    ckpt = out / "checkpoint" / "last.pt"
    start_epoch = 0
    if ckpt.exists():
        st = torch.load(ckpt, map_location=device, weights_only=True)
        if st.get("fingerprint") == fp:
            rt.accelerator.unwrap_model(model).load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            start_epoch = st["epoch"]
            log.info("resuming %s at epoch %d", out, start_epoch)
    t0 = time.perf_counter()
    loss_val = float("nan")
    bar = progress(total=total, initial=start_epoch * steps, desc="squeeze", enabled=rt.is_main)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        for k, (xb, yb) in enumerate(batches(epoch, g)):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_at(epoch * steps + k, total, min(steps, total // 10 or 1))
            x = norm(xb.float() / 255)
            if cfg.augment:
                x = train_augment(x, g, cfg.flip)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            rt.accelerator.backward(loss)
            opt.step()
            bar.update(1)
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            raise DistillError(f"training loss became NaN at epoch {epoch}; lower --lr.")
        log.info("squeeze epoch %d/%d: loss %.4f (%.0fs)", epoch + 1, cfg.epochs, loss_val, time.perf_counter() - t0)
        rt.log_metrics({"squeeze/train_loss": loss_val}, epoch + 1)
        if rt.is_main:
            save_atomic_state(ckpt, {"fingerprint": fp, "epoch": epoch + 1, "opt": opt.state_dict(),
                                     "model": rt.accelerator.unwrap_model(model).state_dict()})
    bar.close()
    rt.wait()
    model.eval()
    return {"train_loss": loss_val, "seconds": time.perf_counter() - t0, "epochs": cfg.epochs}
