"""Minimax (Gu et al., CVPR'24, "Efficient Dataset Distillation via Minimax Diffusion"): sample the distilled set
from a latent diffusion prior fine-tuned with Minimax's representativeness and diversity terms. No optimisation here.

The fine-tuning is ``distillset prior train --finetune minimax`` (see :mod:`generative.minimax`); this method draws
every image class-conditionally from the prior it wrote: a Gaussian ``z_T`` from a generator seeded by (seed, class,
index), a deterministic DDIM loop of ``steps`` steps with the class's conditioning (no LD3M blending), decoded by
the prior's autoencoder. So an image is a pure function of (seed, class, index) whatever the unit layout or the
number of processes, and no real data is read. Pointed at a prior that was not fine-tuned, it is plain
class-conditional sampling, the ablation that says what the fine-tuning adds. Soft labels come from ``relabel`` as for
every set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed
from distillset.recover.base import Context, Objective, register_objective


@register_objective("minimax", paper="Gu et al. 2024, Efficient Dataset Distillation via Minimax Diffusion (CVPR)")
class Minimax(Objective):
    """Minimax: class-conditional DDIM samples of a (Minimax fine-tuned) latent diffusion prior."""

    @dataclass
    class Config:
        """Options of Minimax sampling.

        Attributes:
            prior: folder of an LD3M prior (fine-tuned with `distillset prior train --finetune minimax`, or any LD3M /
                diffusers class-conditional LDM folder for plain sampling).
            steps: DDIM steps from T - 1 down to 0 (0 = the prior's default).
            batch: images sampled per batch.
        """

        prior: str = ""
        steps: int = 0
        batch: int = 64

        def __post_init__(self):
            if not self.prior:
                raise DistillError("minimax needs options.prior: an LD3M prior folder fine-tuned with `distillset "
                                   "prior train --finetune minimax` (or any LD3M prior for plain sampling).")
            if self.steps < 0 or self.batch < 1:
                raise DistillError(f"minimax needs steps >= 0 (0 = the prior's default) and batch >= 1, got steps "
                                   f"{self.steps}, batch {self.batch}.")

    selects = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self._prior = None

    def real_per_class(self, ipc: int) -> int:
        return 0  # samples from the prior: no real image is read

    def loss(self, syn, ctx: Context) -> torch.Tensor:
        raise DistillError("'minimax' samples images from a fine-tuned diffusion prior; it has no loss to optimise.")

    def setup(self, ctx: Context) -> None:
        from distillset.generative.ld3m import load_latent_diffusion

        if self._prior is None:
            self._prior = load_latent_diffusion(self.cfg.prior, "Minimax", ctx.num_classes, ctx.image_shape,
                                                ctx.device)

    @torch.no_grad()
    def sample(self, c: int, indices: range, seed: int) -> torch.Tensor:
        """Images ``indices`` of class ``c`` as ``[0, 1]`` floats, each from its own (seed, class, index) noise."""
        prior = self._prior
        out = []
        idx = list(indices)
        for s in range(0, len(idx), self.cfg.batch):
            part = idx[s:s + self.cfg.batch]
            labels = torch.full((len(part),), c, dtype=torch.long)
            z = prior.sample_latents(labels, [torch.Generator().manual_seed(mix_seed(seed, 41, c, i)) for i in part])
            out.append(prior.render(z, prior.conditioning(labels), steps=self.cfg.steps or None, blend=0.0,
                                    checkpointing=False))
        return torch.cat(out)

    def select_images(self, ctx: Context, ipc: int) -> torch.Tensor:
        c = int(torch.unique(ctx.classes)[0])
        images = self.sample(c, range(ctx.first_index, ctx.first_index + ipc), ctx.seed)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
