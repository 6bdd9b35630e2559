"""``distillset squeeze trajectories``: expert training trajectories for the MTT family (MTT, TESLA, FTD, DATM).

Each expert is a fresh network trained on the real data with plain SGD (lr 0.01, no momentum by default, as MTT's
``buffer.py``); its flattened parameters are recorded at initialisation and after every epoch into
``OUT/replay_buffer_{k}.safetensors`` as one ``(epochs + 1, P)`` tensor ``trajectory``. The file's metadata says how
to rebuild the network (arch, model_kwargs, classes, image shape) and how its inputs were normalised (mean/std, and
``OUT/zca.safetensors`` when the experts were trained on ZCA-whitened images, as MTT does for CIFAR), so an objective
can check that a buffer matches its model and feed the synthetic images through the same transform.

Experts are independent: a re-run skips the experts whose file exists (same config) and trains the rest; each file
is written atomically. FTD's smoother experts are a sharpness-aware (SAM) step of radius ``sam_rho`` (a first-order
gradient-norm penalty) and/or momentum.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.func import functional_call

from distillset.core.config import check_number, fingerprint, to_dict, write_config
from distillset.core.data import ImageSet, Source
from distillset.core.errors import DistillError
from distillset.core.io import require_folder, save_tensors, write_json
from distillset.core.partition import mix_seed
from distillset.core.runtime import Runtime, get_runtime, progress
from distillset.squeeze.dsa import dsa_augment
from distillset.squeeze.inputs import ZCA, ZCA_FILE, InputTransform
from distillset.squeeze.models import create_model
from distillset.squeeze.train import train_augment

log = logging.getLogger("distillset.squeeze")

BUFFER_GLOB = "replay_buffer_*.safetensors"


# ---------------------------------------------------------------------------------------------- flat parameter model


class FlatModel:
    """A network called with one flat parameter vector (MTT's ``ReparamModule``, via ``torch.func.functional_call``).

    ``model(flat, x)`` runs the network with the parameters taken as views of ``flat``, so autograd flows into
    ``flat`` (and through it into whatever produced it: images, a learnable step size, soft labels).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.num_params = sum(self.numels)

    def flatten(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.unflatten(flat), (x,))


# ---------------------------------------------------------------------------------------------------------- buffers


@dataclass
class ExpertBuffers:
    """Expert trajectories loaded from a folder: ``trajectories[k]`` is ``(epochs + 1, P)`` float32 on CPU."""

    trajectories: list[torch.Tensor]
    meta: dict
    paths: list[Path]

    @property
    def num_params(self) -> int:
        return int(self.trajectories[0].shape[1])

    @property
    def epochs(self) -> int:
        return min(int(t.shape[0]) for t in self.trajectories) - 1

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The expert architecture (random weights), checked against the buffers' parameter count."""
        m = self.meta
        c, h, _ = m["image_shape"]
        model = create_model(m["arch"], m["num_classes"], c, h, **m["model_kwargs"]).to(device)
        check_buffer_matches(self, model, m["arch"])
        return model

    @property
    def zca_path(self) -> Path | None:
        """The ZCA file the experts' inputs were whitened with, or None."""
        if not self.meta.get("zca"):
            return None
        from distillset.core.io import inside

        return inside(self.paths[0].parent, self.meta["zca"], f"expert buffer {self.paths[0].name} metadata 'zca'",
                      must_exist=True)

    def check_task(self, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        m = self.meta
        if m["num_classes"] != num_classes or tuple(m["image_shape"]) != tuple(image_shape):
            raise DistillError(f"the expert buffers in {self.paths[0].parent} were trained on {m['num_classes']} "
                               f"classes of {tuple(m['image_shape'])} images but this run has {num_classes} classes "
                               f"of {tuple(image_shape)}; record trajectories on the same data (distillset squeeze "
                               "trajectories --data ...).")


def _buffer_meta(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001  (safetensors raises several types for corrupt headers)
        raise DistillError(f"{path} is not a readable safetensors file ({e}); delete it and re-run `distillset "
                           "squeeze trajectories` to record it again.") from None
    if "arch" not in raw:
        raise DistillError(f"{path} has no expert metadata (arch, ...); it was not written by `distillset squeeze "
                           "trajectories`.")
    meta = {k: raw[k] for k in ("arch", "fingerprint", "data")}
    for k in ("model_kwargs", "image_shape", "mean", "std", "num_classes", "num_params", "epochs", "lr",
              "momentum", "test_top1"):
        meta[k] = json.loads(raw[k]) if k in raw else None
    meta["zca"] = raw.get("zca") or None
    return meta


def buffer_files(path: str | Path) -> list[Path]:
    """The replay buffers of a folder (sorted by expert index), or the single file ``path``."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DistillError(f"expert buffer path {path} does not exist; record experts first with `distillset squeeze "
                           "trajectories --out PATH`.")
    files = sorted(path.glob(BUFFER_GLOB), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not files:
        raise DistillError(f"{path} holds no {BUFFER_GLOB}; record experts first with `distillset squeeze "
                           f"trajectories --out {path}`.")
    return files


def load_buffers(path: str | Path, max_experts: int = 0) -> ExpertBuffers:
    """Load expert trajectories (all files of a folder, or one file); they must agree on architecture and size."""
    from distillset.core.io import load_tensors

    files = buffer_files(path)
    if max_experts:
        files = files[:max_experts]
    metas = [_buffer_meta(f) for f in files]
    ref = metas[0]
    for f, m in zip(files[1:], metas[1:]):
        if (m["arch"], m["num_params"], m["image_shape"]) != (ref["arch"], ref["num_params"], ref["image_shape"]):
            raise DistillError(f"{f} records {m['arch']} ({m['num_params']} parameters) but {files[0]} records "
                               f"{ref['arch']} ({ref['num_params']}); keep one architecture per buffer folder.")
    trajs = []
    for f in files:
        t = load_tensors(f)
        if "trajectory" not in t:
            raise DistillError(f"{f} has no 'trajectory' tensor; it was not written by `distillset squeeze "
                               "trajectories`.")
        trajs.append(t["trajectory"].float())
    return ExpertBuffers(trajs, ref, files)


def check_buffer_matches(buffers: ExpertBuffers, model: nn.Module, arch: str) -> None:
    """One-line error when the buffers were recorded with another network than ``model`` (``arch``)."""
    p = sum(q.numel() for q in model.parameters())
    src = buffers.paths[0].parent
    if buffers.meta["arch"] != arch or buffers.num_params != p:
        raise DistillError(f"expert buffers in {src} record {buffers.meta['arch']} with {buffers.num_params} "
                           f"parameters but the model is {arch} with {p}; record trajectories for this model "
                           "or point the buffer option at matching ones.")


# ------------------------------------------------------------------------------------------------------------ config


@dataclass
class TrajectoryConfig:
    """Record expert trajectories (MTT ``buffer.py``): N networks trained on real data, parameters saved every epoch.

    Attributes:
        out: output folder (replay_buffer_{k}.safetensors, trajectories.json, config.yaml).
        data: data source spec (real training images).
        arch: registry model name of the experts (the instance-norm ConvNet of the matching literature).
        model_kwargs: extra keyword arguments of the architecture (e.g. width, depth).
        num_experts: number of expert trajectories.
        epochs: epochs per expert (one parameter snapshot per epoch, plus the initialisation).
        batch_size: training batch size (MTT: 256).
        lr: SGD learning rate (MTT: 0.01, constant).
        momentum: SGD momentum (MTT: 0; FTD's smoother experts may use some).
        weight_decay: SGD weight decay (MTT: 0).
        sam_rho: FTD flat experts: sharpness-aware step radius, a first-order gradient-norm penalty (0 = off).
        augment: dsa (DSA ops, as MTT's experts), shift (random shift + flip) or none.
        image_size: resize images to this size (0 = keep).
        seed: base seed; expert k is seeded from (seed, k).
        max_train: use only the first N training images (0 = all), for debugging.
        eval_test: measure each expert's final test top-1 (stored in its metadata).
        zca: train on ZCA-whitened inputs (MTT's CIFAR setting); the whitening is fitted on the normalised training
            images and saved as OUT/zca.safetensors, which recover then uses for the synthetic images and evaluation.
        zca_reg: ZCA regularisation added to the covariance eigenvalues (MTT/kornia: 0.1).
    """

    out: str = "output/trajectories"
    data: str = "digits"
    arch: str = "convnet"
    model_kwargs: dict = field(default_factory=dict)
    num_experts: int = 10
    epochs: int = 50
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    sam_rho: float = 0.0
    augment: str = "dsa"
    image_size: int = 0
    seed: int = 0
    max_train: int = 0
    eval_test: bool = True
    zca: bool = False
    zca_reg: float = 0.1

    def __post_init__(self):
        if self.num_experts < 1 or self.epochs < 1 or self.batch_size < 1:
            raise DistillError("num_experts, epochs and batch_size must be >= 1.")
        check_number(self.lr, "lr", high=100.0)
        if not 0 <= self.momentum < 1:
            raise DistillError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.sam_rho < 0:
            raise DistillError(f"sam_rho must be >= 0, got {self.sam_rho}.")
        if self.augment not in ("dsa", "shift", "none"):
            raise DistillError(f"unknown augment '{self.augment}'; use dsa, shift or none.")
        if self.zca_reg <= 0:
            raise DistillError(f"zca_reg must be > 0, got {self.zca_reg}.")


NON_SEMANTIC = ("out", "num_experts", "eval_test")


# -------------------------------------------------------------------------------------------------------- training


def _augmenter(kind: str, flip: bool):
    """``f(x, generator) -> x`` for normalised batches: DSA's ops (as MTT's experts), random shift + flip, or none."""
    if kind == "none":
        return lambda x, g: x
    if kind == "dsa":
        return lambda x, g: dsa_augment(x, g, "color_crop_cutout_flip_scale_rotate" if flip else
                                        "color_crop_cutout_scale_rotate")

    return lambda x, g: train_augment(x, g, flip)


def _sam_grads(model: nn.Module, loss_fn, rho: float) -> None:
    """Sharpness-aware gradients: the gradient at ``theta + rho * g / ||g||`` (FTD's flat trajectories)."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.detach().clone() for p in params]
    norm = torch.sqrt(sum((g * g).sum() for g in grads)).clamp_min(1e-12)
    eps = [rho * g / norm for g in grads]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)


def train_expert(cfg: TrajectoryConfig, k: int, train: ImageSet, mean, std, device, test: ImageSet | None = None,
                 show: bool = True, zca: ZCA | None = None) -> tuple[torch.Tensor, float | None]:
    """Train expert ``k``; returns its trajectory ``(epochs + 1, P)`` (CPU float32) and test top-1 (or None)."""
    c, h, _ = train.image_shape
    seed = mix_seed(cfg.seed, 7, k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(cfg.arch, train.num_classes, c, h, **cfg.model_kwargs).to(device)
    flat = FlatModel(model)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    aug = _augmenter(cfg.augment, flip=c == 3)
    norm = InputTransform(mean, std, zca).to(device)
    images, labels = train.images.to(device), train.labels.to(device)
    snaps = [flat.flatten().cpu()]
    steps = math.ceil(len(train) / cfg.batch_size)
    bar = progress(total=cfg.epochs * steps, desc=f"expert {k}", enabled=show)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g).to(device)
        for i in range(steps):
            j = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = aug(norm(images[j].float() / 255), g)
            y = labels[j]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if cfg.sam_rho > 0:
                _sam_grads(model, lambda x=x, y=y: F.cross_entropy(model(x), y), cfg.sam_rho)
            opt.step()
            bar.update(1)
        if not math.isfinite(float(loss.detach())):
            raise DistillError(f"expert {k}: the training loss became NaN/inf; lower --lr.")
        snaps.append(flat.flatten().cpu())
    bar.close()
    top1 = None
    if test is not None:
        from distillset.squeeze.data import evaluate_model

        top1 = evaluate_model(model, test, mean, std, device, zca=zca)
    return torch.stack(snaps), top1


def _load_data(cfg: TrajectoryConfig) -> tuple[ImageSet, ImageSet | None]:
    source = Source(cfg.data, cfg.image_size or None)
    train = source.load("train")
    test = source.load("test") if cfg.eval_test else None
    if cfg.max_train:
        train = train.subset(torch.arange(min(cfg.max_train, len(train))))
    train.require_classes(1, "expert training")  # images come at cfg.image_size: the Source resizes them
    return train, test


def run(cfg: TrajectoryConfig, rt: Runtime | None = None) -> dict:
    """Record (or finish recording) the experts; returns a summary. Experts are split across ranks (k % world)."""
    from distillset.squeeze.data import channel_stats

    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    fp = fingerprint(cfg, NON_SEMANTIC)
    train, test = _load_data(cfg)
    mean, std = channel_stats(train.images)
    zca = None
    if cfg.zca:  # every rank fits the same whitening (deterministic); the main one writes it
        zca = ZCA.fit(train.images, cfg.zca_reg, transform=InputTransform(mean, std))
        if rt.is_main and not (out / ZCA_FILE).exists():
            zca.save(out / ZCA_FILE)
    t0 = time.perf_counter()
    done, skipped = [], []
    for k in range(rt.rank, cfg.num_experts, rt.world):
        path = out / f"replay_buffer_{k}.safetensors"
        if path.exists():
            old = _buffer_meta(path)
            if old["fingerprint"] != fp:
                raise DistillError(f"{path} was recorded with another config (fingerprint {old['fingerprint']} vs "
                                   f"{fp}); choose another --out or delete that folder.")
            skipped.append(k)
            continue
        traj, top1 = train_expert(cfg, k, train, mean, std, rt.device, test, show=rt.is_main, zca=zca)
        meta = {"arch": cfg.arch, "model_kwargs": json.dumps(cfg.model_kwargs), "num_classes": train.num_classes,
                "image_shape": json.dumps(list(train.image_shape)), "mean": json.dumps(mean),
                "std": json.dumps(std), "num_params": traj.shape[1], "epochs": cfg.epochs, "lr": cfg.lr,
                "momentum": cfg.momentum, "fingerprint": fp, "data": cfg.data, "test_top1": json.dumps(top1),
                "expert": k, "format": "distillset-trajectory/1", "zca": ZCA_FILE if zca is not None else ""}
        save_tensors(path, {"trajectory": traj}, meta)
        done.append(k)
        log.info("expert %d/%d recorded (%d epochs, %d parameters, test top-1 %s)", k + 1, cfg.num_experts,
                 cfg.epochs, traj.shape[1], "n/a" if top1 is None else f"{top1:.4f}")
    rt.wait()
    summary = {"trained": done, "skipped": skipped, "seconds": time.perf_counter() - t0}
    if rt.is_main:
        files = buffer_files(out)
        accs = [m["test_top1"] for m in map(_buffer_meta, files) if m["test_top1"] is not None]
        summary.update(num_experts=len(files), fingerprint=fp, config=to_dict(cfg), mean=mean, std=std,
                       test_top1_mean=sum(accs) / len(accs) if accs else None)
        write_json(out / "trajectories.json", summary)
        write_config(out, cfg)
    return summary
