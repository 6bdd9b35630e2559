"""Where matching objectives get their networks: fresh randomly initialised ConvNets (DC, DSA, DM, CAFE, DataDAM), or
the model augmentation of Acc-DD ("Accelerating Dataset Distillation via Model Augmentation", Zhang et al. 2023):
a small pool of early-stage models (trained a few epochs on the real data) and, each time a network is drawn, a
random parameter perturbation scaled filter-wise by the parameter norm.

Objectives take the pool through their options, e.g. ``options: {model_pool: 5, perturb: 0.01}`` (five ConvNets
trained ``pool_epochs`` epochs on the fly, cached in the objective for the whole run) or ``{model_pool: PATH}``
(every sub-folder of PATH written by ``distillset squeeze`` is a pool member).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed
from distillset.recover.base import Context
from distillset.squeeze.models import create_model

log = logging.getLogger("distillset.recover")


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def build_net(arch: str, ctx: Context, seed: int, width: int = 128) -> nn.Module:
    """A ConvNet-family network initialised from ``seed`` (not from the global RNG), on ``ctx.device``."""
    c, h, _ = ctx.image_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_model(arch, num_classes=ctx.num_classes, in_chans=c, img_size=h, width=width)
    return net.to(ctx.device)


@torch.no_grad()
def perturb_(net: nn.Module, alpha: float, generator: torch.Generator) -> nn.Module:
    """Add ``alpha * d`` to every weight tensor, ``d`` Gaussian rescaled filter-wise to the norm of that filter.

    Filter-wise scaling (Li et al.'s filter normalisation, as Acc-DD) keeps the perturbation relative to each layer's
    scale; 1-d parameters (biases, norm affine terms) are left as they are.
    """
    for p in net.parameters():
        if p.ndim < 2:
            continue
        d = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        pf, df = p.flatten(1), d.flatten(1)
        scale = pf.norm(dim=1, keepdim=True) / (df.norm(dim=1, keepdim=True) + 1e-10)
        p.add_((df * scale).view_as(p), alpha=alpha)
    return net


def train_early(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: float, lr: float,
                mean: torch.Tensor, std: torch.Tensor, seed: int, batch: int = 256) -> nn.Module:
    """Train ``net`` for ``epochs`` (fractions allowed) on uint8 real images; SGD momentum 0.9, wd 5e-4."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    n = images.shape[0]
    dev = next(net.parameters()).device
    steps = max(1, round(epochs * n / batch))
    net.train()
    order = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + batch]
        pos += batch
        x = (images[idx.to(images.device)].to(dev).float() / 255 - mean) / std
        loss = F.cross_entropy(net(x), labels[idx.to(labels.device)].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


@dataclass
class NetConfig:
    """Where a matching objective's networks come from (the options every matching method shares).

    Attributes:
        arch: ConvNet-family registry name (convnet = instance norm, depth from the image size).
        width: channels per layer of the ConvNet.
        model_pool: Acc-DD model augmentation: 0 = fresh random networks; N > 0 = a pool of N early-stage models
            trained on the fly; a folder of `distillset squeeze` outputs = that pool.
        perturb: Acc-DD perturbation strength alpha (0 = none).
        pool_epochs: epochs each on-the-fly pool member is trained on the real data.
        pool_lr: the pool members' SGD learning rate.
        base_weights: a safetensors state dict (e.g. a federated global model w_r) every drawn network starts from
            instead of a random init, then perturbed by ``perturb`` (FedDM's networks sampled around w_r). Tensors
            whose shape differs (the classifier when the data has fewer classes) keep their random init: DM
            matches embeddings, which do not use the classifier.
    """

    arch: str = "convnet"
    width: int = 128
    model_pool: int | str = 0
    perturb: float = 0.0
    pool_epochs: float = 2.0
    pool_lr: float = 0.01
    base_weights: str = ""

    def __post_init__(self):
        if self.perturb < 0:
            raise DistillError(f"perturb must be >= 0, got {self.perturb}.")
        if isinstance(self.model_pool, int) and self.model_pool < 0:
            raise DistillError(f"model_pool must be a count >= 0 or a folder, got {self.model_pool}.")
        if self.base_weights and self.model_pool:
            raise DistillError("base_weights and model_pool both say where networks come from; set only one.")
        if self.base_weights and not Path(self.base_weights).is_file():
            raise DistillError(f"base_weights {self.base_weights} is not a file; pass a safetensors state dict.")

    def net_source(self) -> NetSource:
        return NetSource(self.arch, self.width, self.model_pool, self.perturb, self.pool_epochs, self.pool_lr,
                         base_weights=self.base_weights)


class NetSource:
    """Draws the network of a matching step.

    Args:
        arch: ConvNet-family registry name (``convnet`` = instance norm, depth from the image size).
        width: channels per layer.
        model_pool: 0 = fresh random networks; N > 0 = Acc-DD pool of N early-stage models trained on the fly;
            a path = a folder of squeeze outputs used as the pool.
        perturb: Acc-DD perturbation strength alpha (0 = none); applies to pool members and random nets alike.
        pool_epochs: epochs each on-the-fly pool member is trained on the real data.
        pool_lr: its SGD learning rate.
        pool_seed: seed of the pool (fixed, so every process builds the same pool).
        base_weights: safetensors state dict every drawn network is loaded from before the perturbation.
    """

    def __init__(self, arch: str = "convnet", width: int = 128, model_pool: int | str = 0, perturb: float = 0.0,
                 pool_epochs: float = 2.0, pool_lr: float = 0.01, pool_seed: int = 0, base_weights: str = ""):
        if perturb < 0:
            raise DistillError(f"perturb must be >= 0, got {perturb}.")
        if isinstance(model_pool, int) and model_pool < 0:
            raise DistillError(f"model_pool must be a count >= 0 or a folder, got {model_pool}.")
        self.arch, self.width, self.model_pool, self.perturb = arch, width, model_pool, perturb
        self.pool_epochs, self.pool_lr, self.pool_seed = pool_epochs, pool_lr, pool_seed
        self.base_weights = base_weights
        self._pool: list[nn.Module] | None = None
        self._base: dict[str, torch.Tensor] | None = None

    def _load_base(self, net: nn.Module) -> None:
        """Copy the base state dict into ``net``; only the classifier (the last Linear layer) may differ in shape."""
        if self._base is None:
            from distillset.core.io import load_tensors

            self._base = load_tensors(self.base_weights)
        own = net.state_dict()
        head = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1:]
        same = {k: v for k, v in self._base.items() if k in own and own[k].shape == v.shape}
        bad = [k for k in own if k not in same and not any(k.startswith(h + ".") for h in head)]
        if bad:
            raise DistillError(f"base_weights {self.base_weights} do not fit a {self.arch} of width {self.width} "
                               f"(tensor '{bad[0]}' is missing or of another shape); save the state dict of that "
                               "architecture and width.")
        net.load_state_dict(same, strict=False)

    @property
    def uses_pool(self) -> bool:
        return bool(self.model_pool)

    def build(self, ctx: Context) -> nn.Module:
        """A network of the right shape (weights to be loaded), without drawing randomness."""
        return build_net(self.arch, ctx, 0, self.width)

    def pool(self, ctx: Context) -> list[nn.Module]:
        if self._pool is None:
            self._pool = self._load_pool(ctx) if isinstance(self.model_pool, str) else self._train_pool(ctx)
        return self._pool

    def _train_pool(self, ctx: Context) -> list[nn.Module]:
        if ctx.real is None:
            raise DistillError("model_pool N trains early-stage models on the real data; pass --data SPEC.")
        norm_mean = torch.tensor(ctx.mean, device=ctx.device)
        norm_std = torch.tensor(ctx.std, device=ctx.device)
        pool = []
        for i in range(int(self.model_pool)):
            seed = mix_seed(self.pool_seed, 7, i)
            net = build_net(self.arch, ctx, seed, self.width)
            train_early(net, ctx.real.images, ctx.real.labels, self.pool_epochs, self.pool_lr,
                        norm_mean.view(1, -1, 1, 1), norm_std.view(1, -1, 1, 1), seed)
            pool.append(net.eval())
        log.info("Acc-DD pool: %d %s models trained %.3g epochs each", len(pool), self.arch, self.pool_epochs)
        return pool

    def _load_pool(self, ctx: Context) -> list[nn.Module]:
        from distillset.squeeze.checkpoint import load_teacher

        root = Path(self.model_pool)
        dirs = sorted(p for p in root.iterdir() if (p / "config.json").exists()) if root.is_dir() else []
        if not dirs:
            raise DistillError(f"model_pool folder {root} holds no squeeze outputs (sub-folders with config.json); "
                               "train some with `distillset squeeze --epochs 2` or pass a count.")
        pool = []
        want = (list(ctx.mean), list(ctx.std))
        for d in dirs:
            t = load_teacher(str(d), device=ctx.device)
            if want[0] and (list(t.config.mean), list(t.config.std)) != want:
                raise DistillError(f"pool model {d} normalises with mean/std {t.config.mean}/{t.config.std} but the "
                                   f"run uses {want[0]}/{want[1]}; train the pool with the run's normalisation.")
            pool.append(t.model.eval())
        return pool

    def sample(self, ctx: Context) -> nn.Module:
        """The next network: random (seeded from ctx.generator) or a perturbed copy of a pool member."""
        if self.uses_pool:
            pool = self.pool(ctx)
            k = int(torch.randint(len(pool), (1,), generator=ctx.generator))
            net = copy.deepcopy(pool[k])
        else:
            net = build_net(self.arch, ctx, _seed_from(ctx.generator), self.width)
            if self.base_weights:
                self._load_base(net)
        if self.perturb > 0:
            perturb_(net, self.perturb, ctx.generator)
        net.train()
        return net
