"""Retrieval recall of image-text pairs: train fresh projection heads on a (distilled, coreset or full) set of pairs
over a frozen contrastive model's features, and report recall@1/5/10 image-to-text and text-to-image on a held-out
split (Wu et al.'s evaluation of vision-language distillation; Flickr's 5 captions per image).

Image-to-text R@K is the share of test images with at least one of their captions among the K nearest captions;
text-to-image R@K the share of captions whose image is among the K nearest images (torchmetrics' hit rate over
the ``(query, candidate)`` similarity table, the same number; tests check the two against each other).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed
from distillset.squeeze.clip import Heads, check_text_width
from distillset.squeeze.vl_experts import make_heads, train_heads

KS = (1, 5, 10)


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, ks: tuple[int, ...] = KS) -> dict:
    """Recall@K (in %) both ways from L2-normalised embeddings: ``img`` ``(n, E)``, ``txt`` ``(m, E)``, ``owner[j]``
    the image of caption ``j``."""
    sim = img @ txt.T  # (n, m)
    relevant = owner.view(1, -1) == torch.arange(img.shape[0]).view(-1, 1)  # (n, m)
    # rank of a query's best relevant candidate = number of candidates scoring strictly higher than it
    best_pos = sim.masked_fill(~relevant, float("-inf")).max(1).values
    i2t_rank = (sim > best_pos.view(-1, 1)).sum(1)
    own = sim[owner, torch.arange(txt.shape[0])]  # similarity of each caption to its own image
    t2i_rank = (sim > own.view(1, -1)).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean())
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    out["mean_recall"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks) / (2 * len(ks))
    return out


@dataclass
class HeadTraining:
    """How fresh heads are trained on a set of pairs (the same for every set compared).

    Attributes:
        steps: SGD steps.
        batch_size: pairs per step (capped at the set size).
        lr: SGD learning rate.
        temperature: softmax temperature of the contrastive loss.
        rank: LoRA rank of the heads (0 = full linear heads from a random initialisation).
    """

    steps: int = 300
    batch_size: int = 256
    lr: float = 0.1
    temperature: float = 0.07
    rank: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or self.temperature <= 0:
            raise DistillError("head training needs steps >= 1, batch_size >= 2, lr > 0 and temperature > 0.")


def evaluate_pairs(image_feats: torch.Tensor, text: torch.Tensor, test_image_feats: torch.Tensor,
                   test_text: torch.Tensor, owner: torch.Tensor, dims: dict, train: HeadTraining,
                   seeds: list[int], base: Heads | None = None) -> dict:
    """Train one set of fresh heads per seed on the pairs ``(image_feats[i], text[i])`` and measure retrieval on the
    test features; returns ``{"per_seed": [...], metric: mean, metric_std: std}``."""
    check_text_width(text if text.ndim == 2 else text[:, 0], dims["text_dim"], "training pairs")
    check_text_width(test_text, dims["text_dim"], "test captions")
    if image_feats.shape[0] != text.shape[0]:
        raise DistillError(f"{image_feats.shape[0]} image features but {text.shape[0]} text embeddings; every image "
                           "needs its text.")
    runs = []
    for seed in seeds:
        heads = make_heads({**dims, "rank": train.rank}, base, mix_seed(seed, 23))
        train_heads(heads, image_feats, text, train.steps, train.batch_size, train.lr, 1 / train.temperature,
                    mix_seed(seed, 29))
        with torch.no_grad():
            zi, zt = heads((test_image_feats, test_text))
        runs.append(recall_at_k(zi, zt, owner))
    return summarise(runs)


def summarise(runs: list[dict]) -> dict:
    """Mean and std over runs of every metric, with the runs themselves under ``per_seed``."""
    out: dict = {"per_seed": runs}
    for key in runs[0]:
        vals = [r[key] for r in runs]
        out[key] = statistics.fmean(vals)
        out[f"{key}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return out
