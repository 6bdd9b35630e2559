"""Within-class diversity of an image set: mean pairwise distance between images of the same class, in pixels and
in a network's feature space (the teacher's penultimate embedding).

SRe2L sets recovered from noise are known to collapse to nearly one layout per class; this score says how much a
set spreads (higher = more diverse), beside its accuracy. Distances are averaged over the pairs of each class, then
over classes, so classes of different sizes weigh the same.
"""

from __future__ import annotations

import torch
from torch import nn

from distillset.core.data import ImageSet


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance over the unordered pairs of rows of ``x`` ``(n, d)``; 0 for fewer than 2 rows."""
    n = x.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(x.double(), x.double())
    return float(d.sum() / (n * (n - 1)))


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The penultimate embedding of ``model`` when it exposes one (ConvNet ``embed``, timm ``forward_head``)."""
    if hasattr(model, "embed"):
        return model.embed(x)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model(x)


@torch.no_grad()
def within_class_diversity(images: ImageSet, teacher=None, batch: int = 256) -> dict[str, float]:
    """``{"pixel": ..., "feature": ...}``: the class-averaged mean pairwise distance of ``images`` in ``[0, 1]``
    pixel units (divided by sqrt(pixels), so sizes compare) and, with a ``teacher`` (a loaded distillset teacher
    that normalises its own inputs), in its embedding space; ``{}`` when no class has two images (IPC 1)."""
    x = images.images.float() / 255
    pix, feat = [], []
    for c in range(images.num_classes):
        idx = torch.nonzero(images.labels == c).flatten()
        if idx.numel() < 2:
            continue
        xc = x[idx]
        pix.append(mean_pairwise_distance(xc.flatten(1)) / xc[0].numel() ** 0.5)
        if teacher is not None:
            dev = next(teacher.parameters()).device
            emb = torch.cat([penultimate(teacher.model, teacher.normalize(xc[s:s + batch].to(dev))).flatten(1).float().cpu()
                             for s in range(0, len(xc), batch)])
            feat.append(mean_pairwise_distance(emb))
    if not pix:  # no class has two images (IPC 1): within-class diversity is not defined
        return {}
    out = {"pixel": sum(pix) / len(pix)}
    if teacher is not None:
        out["feature"] = sum(feat) / len(feat)
    return out
