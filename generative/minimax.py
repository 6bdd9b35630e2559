"""Minimax diffusion (Gu et al., CVPR'24, "Efficient Dataset Distillation via Minimax Diffusion"): the two terms that
fine-tuning adds to the diffusion loss, the per-class memories they read, and how a prior's samples score on them.

For every class of a fine-tuning batch, with ``x0`` the clean latents the UNet predicts from the noised ones
(``(z_t - sqrt(1 - a_t) eps) / sqrt(a_t)``) and ``cos`` the cosine similarity of flattened latents:

* **representativeness**: ``mean_i (1 - min_j cos(x0_i, r_j))`` over the class's *real* memory ``r`` (the clean
  latents of its last real images): each prediction is pulled towards the real embedding it resembles least, so the
  generated images cover the class rather than its mode;
* **diversity**: ``mean_i max_j cos(x0_i, g_j)`` over the class's *generated* memory ``g`` (its last predictions):
  each prediction is pushed away from the past one it resembles most.

The memories are FIFO queues of ``size`` detached latents per class, read before the batch is pushed (so a prediction
is never compared with itself); a class's terms start once both of its memories hold something. The public code
takes the min / max over the whole (batch x memory) matrix of a class; here every prediction gets its own least /
most similar partner (the paper's per-sample form), which gives every prediction a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(len(a), len(b))`` cosine similarities of the flattened rows of ``a`` and ``b``."""
    return F.normalize(a.flatten(1).float(), dim=1) @ F.normalize(b.flatten(1).float(), dim=1).T


def representativeness(gen: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``mean_i (1 - min_j cos(gen_i, real_j))``: low when every generated latent is close to all real ones."""
    return (1 - cosine_matrix(gen, real).min(dim=1).values).mean()


def diversity(gen: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """``mean_i max_j cos(gen_i, past_j)``: low when no generated latent resembles a past one."""
    return cosine_matrix(gen, past).max(dim=1).values.mean()


class ClassMemory:
    """Per-class FIFO queues of detached latents, at most ``size`` per class."""

    def __init__(self, size: int):
        self.size = int(size)
        self.items: dict[int, torch.Tensor] = {}

    def get(self, c: int) -> torch.Tensor | None:
        return self.items.get(c)

    def push(self, c: int, x: torch.Tensor) -> None:
        old = self.items.get(c)
        new = x.detach() if old is None else torch.cat([old, x.detach()])
        self.items[c] = new[-self.size:]


class MinimaxTerms:
    """The two terms over a batch, class by class, with the real and generated memories they update."""

    def __init__(self, memory_size: int):
        self.real = ClassMemory(memory_size)
        self.generated = ClassMemory(memory_size)

    def __call__(self, x0_pred: torch.Tensor, z0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        """``(representativeness, diversity)`` of the batch's predictions (each averaged over the batch's classes
        that have both memories; 0 while none has), then the batch's real latents and predictions are pushed."""
        rep = div = x0_pred.new_zeros(())
        classes = torch.unique(labels).tolist()
        n = len(classes)
        for c in classes:
            m = labels == c
            real, past = self.real.get(c), self.generated.get(c)
            if real is not None and past is not None:
                rep = rep + representativeness(x0_pred[m], real) / n
                div = div + diversity(x0_pred[m], past) / n
            self.real.push(c, z0[m])
            self.generated.push(c, x0_pred[m])
        return rep, div


@torch.no_grad()
def sample_similarity(prior, latents: torch.Tensor, labels: torch.Tensor, per_class: int, generator: torch.Generator,
                      steps: int | None = None) -> dict[str, float]:
    """How ``per_class`` DDIM samples of every class score on the two criteria, against the class's real latents.

    Returns ``min_real_cos`` (mean over samples of the least cosine similarity to the class's real latents: what
    representativeness raises) and ``max_gen_cos`` (mean over samples of the largest similarity to another sample of
    the class: what diversity lowers), both averaged over classes.
    """
    classes = torch.unique(labels).tolist()
    y = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    z_T = torch.randn(len(y), *latents.shape[1:], generator=generator).to(latents.device)
    x0 = torch.cat([prior.denoise(z_T[s:s + 256], prior.conditioning(y[s:s + 256]), steps=steps, blend=0.0,
                                  checkpointing=False) for s in range(0, len(y), 256)])
    reps, divs = [], []
    for k, c in enumerate(classes):
        xc = x0[k * per_class:(k + 1) * per_class]
        reps.append(float(cosine_matrix(xc, latents[labels == c]).min(dim=1).values.mean()))
        sim = cosine_matrix(xc, xc) - 2 * torch.eye(per_class, device=xc.device)  # not a sample with itself
        divs.append(float(sim.max(dim=1).values.mean()) if per_class > 1 else 0.0)
    return {"min_real_cos": sum(reps) / len(reps), "max_gen_cos": sum(divs) / len(divs)}
