"""Coreset baselines: pick real images instead of synthesising them (``selects = True``; the engine calls
:meth:`select` once per class with ``ctx.classes`` filled with that class and writes the chosen real images).

* ``random``: uniform without replacement (from the unit's generator).
* ``herding`` (Welling 2009): greedily add the image that keeps the running mean of the chosen features closest to
  the class mean.
* ``kcenter`` (Sener & Savarese 2018): greedy k-center: start from the image nearest the class mean, then always add
  the image farthest from everything chosen.
* ``forgetting`` (Toneva et al. 2019): train a small ConvNet a few epochs on all real data, count per image the
  times it goes from correctly to wrongly classified; keep the most (or least) forgotten images.

Features for herding/k-center: the first teacher's penultimate embedding when the run has teachers, else a fixed
randomly initialised ConvNet's embedding (seeded by ``seed``), or raw pixels with ``features: pixels``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed
from distillset.recover.base import Context, Objective, register_objective

log = logging.getLogger("distillset.recover")

FEATURES = ("auto", "teacher", "random_convnet", "pixels")


def herding(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy mean matching: positions of ``k`` rows whose running mean tracks ``feats.mean(0)``."""
    mu = feats.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    avail = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
    for j in range(k):
        cand = (total + feats) / (j + 1)
        dist = ((cand - mu) ** 2).sum(1)
        dist[~avail] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        avail[i] = False
        total = total + feats[i]
    return torch.tensor(chosen, dtype=torch.long)


def kcenter(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center (farthest-point) from the point nearest the mean."""
    first = int(((feats - feats.mean(0)) ** 2).sum(1).argmin())
    chosen = [first]
    d = ((feats - feats[first]) ** 2).sum(1)
    for _ in range(k - 1):
        i = int(d.argmax())
        chosen.append(i)
        d = torch.minimum(d, ((feats - feats[i]) ** 2).sum(1))
    return torch.tensor(chosen, dtype=torch.long)


class _Coreset(Objective):
    selects = True
    needs_real = True

    def loss(self, syn, ctx: Context) -> torch.Tensor:
        raise DistillError(f"'{self.name}' selects real images and has no loss to optimise.")

    @staticmethod
    def class_of(ctx: Context) -> int:
        classes = torch.unique(ctx.classes)
        if classes.numel() != 1:
            raise DistillError("coreset select() expects ctx.classes to hold one class (the engine calls it per "
                               "class).")
        return int(classes[0])


@register_objective("random", description="random real images of each class (the baseline every method is "
                    "compared with)")
class RandomCoreset(_Coreset):
    """Random real images of each class (the baseline every method is compared with): exactly the images that
    init-from-real methods start from with the same seed (:meth:`recover.real.RealData.init_choice`)."""

    def select(self, ctx: Context, ipc: int) -> torch.Tensor:
        c = self.class_of(ctx)
        i0, seed = ctx.first_index, ctx.seed
        return torch.cat([ctx.real.init_choice(c, i, seed) for i in range(i0, i0 + ipc)]).cpu()


class _FeatureCoreset(_Coreset):
    @dataclass
    class Config:
        """Options of the feature-space coresets (herding, k-center).

        Attributes:
            features: auto (teacher if given, else a fixed random ConvNet), teacher, random_convnet or pixels.
            seed: seed of the random ConvNet.
            batch: images embedded per forward pass.
        """

        features: str = "auto"
        seed: int = 0
        batch: int = 500

        def __post_init__(self):
            if self.features not in FEATURES:
                raise DistillError(f"unknown coreset features '{self.features}'; use one of {', '.join(FEATURES)}.")

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self.features, self.seed, self.batch = self.cfg.features, self.cfg.seed, self.cfg.batch
        self._net: nn.Module | None = None

    def setup(self, ctx: Context) -> None:
        kind = self.features
        if kind == "auto":
            kind = "teacher" if ctx.teachers else "random_convnet"
        if kind == "teacher" and not ctx.teachers:
            raise DistillError(f"'{self.name}' with features: teacher needs --teachers PATH.")
        self.kind = kind
        if kind == "random_convnet" and self._net is None:
            from distillset.recover.objectives._matching import Normalize
            from distillset.recover.objectives.model_aug import build_net

            self._net = nn.Sequential(Normalize(ctx), build_net("convnet", ctx, mix_seed(self.seed, 11)).eval())
            self._net.to(ctx.device)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.kind == "pixels":
            return x.flatten(1)
        if self.kind == "random_convnet":
            norm, net = self._net[0], self._net[1]
            return net.embed(norm(x))
        t = ctx.teachers[0]
        m = t.model
        xn = t.normalize(x)
        if hasattr(m, "embed"):
            return m.embed(xn)
        if hasattr(m, "forward_features") and hasattr(m, "forward_head"):  # timm: pooled pre-logits
            return m.forward_head(m.forward_features(xn), pre_logits=True)
        return m(xn)

    def class_features(self, c: int, ctx: Context) -> torch.Tensor:
        idx = ctx.real.index[c]
        out = []
        for s in range(0, idx.numel(), self.batch):
            out.append(self.embed(ctx.real.get(idx[s:s + self.batch]), ctx).float())
        return torch.cat(out)

    def teardown(self) -> None:
        pass


@register_objective("herding", paper="Welling 2009, Herding Dynamical Weights to Learn (ICML)")
class HerdingCoreset(_FeatureCoreset):
    """Herding: greedy mean matching in a feature space."""

    def select(self, ctx: Context, ipc: int) -> torch.Tensor:
        c = self.class_of(ctx)
        return ctx.real.index[c][herding(self.class_features(c, ctx), ipc).to(ctx.real.index[c].device)].cpu()


@register_objective("kcenter", paper="Sener & Savarese 2018, Active Learning for Convolutional Neural Networks: A "
                    "Core-Set Approach (arXiv:1708.00489)")
class KCenterCoreset(_FeatureCoreset):
    """K-center greedy in a feature space. Options: as ``herding``."""

    def select(self, ctx: Context, ipc: int) -> torch.Tensor:
        c = self.class_of(ctx)
        return ctx.real.index[c][kcenter(self.class_features(c, ctx), ipc).to(ctx.real.index[c].device)].cpu()


def forgetting_counts(images: torch.Tensor, labels: torch.Tensor, net: nn.Module, norm: nn.Module, epochs: int,
                      lr: float, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Forgetting events per image while training ``net`` (Toneva et al.): an image is checked each time it is in a
    minibatch; correct -> wrong counts one event. Images never classified correctly get ``epochs + 1`` (the paper
    ranks never-learned examples as the most forgettable)."""
    n = images.shape[0]
    dev = next(net.parameters()).device
    prev = torch.zeros(n, dtype=torch.bool)
    learned = torch.zeros(n, dtype=torch.bool)
    counts = torch.zeros(n, dtype=torch.long)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            x = norm(images[idx.to(images.device)].to(dev).float() / 255)
            y = labels[idx.to(labels.device)].to(dev)
            out = net(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct = (out.argmax(1) == y).cpu()
            counts[idx] += (prev[idx] & ~correct).long()
            prev[idx] = correct
            learned[idx] |= correct
    counts[~learned] = epochs + 1
    return counts


@register_objective("forgetting", paper="Toneva et al. 2019, An Empirical Study of Example Forgetting during Deep "
                    "Neural Network Learning (arXiv:1812.05159)")
class ForgettingCoreset(_Coreset):
    """Forgetting-events coreset."""

    @dataclass
    class Config:
        """Options of the forgetting coreset.

        Attributes:
            order: most (keep the most forgotten / never learned, the paper's hard examples) or least (the
                unforgettable ones).
            epochs: training epochs of the scoring ConvNet.
            width: its width (64: a small ConvNet keeps scoring cheap).
            lr: its SGD learning rate.
            batch: its batch size.
            seed: its initialisation and data order.
        """

        order: str = "most"
        epochs: int = 5
        width: int = 64
        lr: float = 0.01
        batch: int = 128
        seed: int = 0

        def __post_init__(self):
            if self.order not in ("most", "least"):
                raise DistillError(f"forgetting order must be most or least, got '{self.order}'.")
            if self.epochs < 1:
                raise DistillError(f"forgetting needs epochs >= 1, got {self.epochs}.")

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.order, self.epochs, self.width, self.lr, self.batch, self.seed = (c.order, c.epochs, c.width, c.lr,
                                                                              c.batch, c.seed)
        self._counts: torch.Tensor | None = None
        self._key = None

    def setup(self, ctx: Context) -> None:
        key = (id(ctx.real), len(ctx.real.labels))
        if self._counts is not None and self._key == key:
            return
        from distillset.recover.objectives._matching import Normalize
        from distillset.recover.objectives.model_aug import build_net

        net = build_net("convnet", ctx, mix_seed(self.seed, 13), self.width)
        g = torch.Generator().manual_seed(mix_seed(self.seed, 17))
        self._counts = forgetting_counts(ctx.real.images, ctx.real.labels, net, Normalize(ctx).to(ctx.device),
                                         self.epochs, self.lr, self.batch, g)
        self._key = key
        log.info("forgetting: %d of %d images forgotten at least once", int((self._counts > 0).sum()),
                 len(self._counts))

    def select(self, ctx: Context, ipc: int) -> torch.Tensor:
        c = self.class_of(ctx)
        idx = ctx.real.index[c].cpu()
        counts = self._counts[idx].float()
        # random tie-breaking (many images share a count) from the unit generator
        jitter = torch.rand(idx.numel(), generator=ctx.generator) * 0.5
        score = counts + jitter if self.order == "most" else -counts + jitter
        return idx[torch.argsort(score, descending=True)[:ipc]]
