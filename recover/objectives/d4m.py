"""D4M (Su et al., CVPR'24, "D4M: Dataset Distillation via Disentangled Diffusion Model"): prototypes in a latent
diffusion model's latent space, denoised into images. No optimisation.

Per class: encode ``pool`` real images of the class with the prior's autoencoder (the same seeded order that
init-from-real and the random baseline use), run k-means in latent space with ``k = ipc`` (k-means++ seeding from a
generator seeded by (seed, class), then Lloyd iterations), and turn every centroid into an image the way img2img
does: noise it to the timestep ``strength x T`` of the prior's schedule, denoise it class-conditionally with
deterministic DDIM steps down to 0, and decode. ``strength -> 0`` returns the decoded prototypes themselves;
``strength = 1`` forgets them and samples the class.

The prior is an LD3M prior folder (``distillset prior train --kind ld3m``) or a diffusers class-conditional LDM
pipeline folder, read from disk only; it must have an autoencoder (a GLaD generator has none). Images are a pure
function of (seed, class, index) whatever the unit layout; soft labels come from ``relabel`` as for every set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from distillset.core.errors import DistillError
from distillset.core.partition import init_order, mix_seed
from distillset.recover.base import ComposingObjective, Context, register_objective

log = logging.getLogger("distillset.recover")


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centroids (k, d), assignment (n,))`` of ``x`` (n, d): k-means++ seeding, then Lloyd iterations (an empty
    cluster takes the point farthest from its centroid)."""
    n = x.shape[0]
    if k > n:
        raise DistillError(f"k-means needs at least k = {k} points, got {n}.")
    x = x.float()
    first = int(torch.randint(n, (1,), generator=generator))
    cent = [x[first]]
    d2 = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        p = d2.cpu() / d2.sum().clamp_min(1e-12).cpu()
        nxt = int(torch.multinomial(p, 1, generator=generator)) if float(d2.sum()) > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        cent.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).square().sum(1))
    c = torch.stack(cent)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():  # re-seed an empty cluster
            far = int((x - c[assign]).square().sum(1).argmax())
            new[j], counts[j] = x[far], 1
            assign[far] = j
        c_new = new / counts.clamp_min(1)[:, None].to(x.dtype)
        a_new = torch.cdist(x, c_new).argmin(1)
        done = torch.equal(a_new, assign)
        c, assign = c_new, a_new
        if done:
            break
    return c, assign


@register_objective("d4m", paper="Su et al. 2024, D4M: Dataset Distillation via Disentangled Diffusion Model "
                    "(CVPR)")
class D4M(ComposingObjective):
    """D4M: per-class k-means prototypes in a latent diffusion model's latent space, denoised into images."""

    @dataclass
    class Config:
        """Options of D4M.

        Attributes:
            prior: folder of an LD3M prior or a diffusers class-conditional LDM pipeline (it needs an autoencoder).
            strength: how far each prototype is noised before denoising, as a fraction of the schedule (img2img
                strength, in (0, 1]); small keeps the prototype, 1 samples the class afresh.
            steps: DDIM steps from that timestep down to 0.
            pool: real images of each class encoded and clustered (0 = the whole class).
            kmeans_iters: Lloyd iterations of k-means.
            batch: images encoded (and prototypes denoised) per batch.
        """

        prior: str = ""
        strength: float = 0.7
        steps: int = 25
        pool: int = 0
        kmeans_iters: int = 25
        batch: int = 64

        def __post_init__(self):
            if not self.prior:
                raise DistillError("d4m needs options.prior: an LD3M prior folder (distillset prior train --kind "
                                   "ld3m) or a diffusers class-conditional LDM folder.")
            if not 0 < self.strength <= 1:
                raise DistillError(f"d4m strength is a fraction of the noise schedule in (0, 1], got {self.strength}.")
            if self.steps < 1 or self.pool < 0 or self.kmeans_iters < 0 or self.batch < 1:
                raise DistillError("d4m needs steps >= 1, pool >= 0, kmeans_iters >= 0 and batch >= 1.")

    needs_real = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self._prior = None

    def real_per_class(self, ipc: int) -> int:
        return ipc  # one prototype per cluster: k-means needs at least ipc images

    def loss(self, syn, ctx: Context) -> torch.Tensor:
        raise DistillError("'d4m' generates images from latent prototypes; it has no loss to optimise.")

    def setup(self, ctx: Context) -> None:
        from distillset.generative.ld3m import load_latent_diffusion

        if self._prior is None:
            self._prior = load_latent_diffusion(self.cfg.prior, "D4M", ctx.num_classes, ctx.image_shape, ctx.device)

    @torch.no_grad()
    def compose(self, c: int, ipc: int, ctx: Context) -> torch.Tensor:
        """All ``ipc`` images of class ``c`` (``[0, 1]`` floats)."""
        prior, cfg = self._prior, self.cfg
        order = init_order(ctx.real.index[c], c, ctx.seed)
        if cfg.pool:
            order = order[:cfg.pool]
        if order.numel() < ipc:
            raise DistillError(f"d4m needs at least ipc = {ipc} real images of class {c} for {ipc} prototypes but "
                               f"uses {order.numel()} (pool {cfg.pool or 'all'}); lower ipc or raise pool.")
        z = torch.cat([prior.encode(ctx.real.get(order[s:s + cfg.batch]).to(prior.device))["z_T"]
                       for s in range(0, order.numel(), cfg.batch)])
        g = torch.Generator().manual_seed(mix_seed(ctx.seed, 31, c))
        centroids, _ = kmeans(z.flatten(1), ipc, g, cfg.kmeans_iters)
        protos = centroids.view(ipc, *z.shape[1:])
        out = []
        labels = torch.full((ipc,), c, dtype=torch.long)
        for s in range(0, ipc, cfg.batch):
            p = protos[s:s + cfg.batch]
            noise = torch.randn(p.shape, generator=g).to(p.device)
            out.append(self.img2img(p, noise, labels[s:s + cfg.batch]))
        images = torch.cat(out).clamp_(0, 1)
        return images

    def timesteps(self) -> list[int]:
        """``steps`` evenly spaced timesteps from ``strength x T`` down to 0."""
        total = int(self._prior.alphas_cumprod.numel())
        start = max(0, round(self.cfg.strength * total) - 1)
        s = self.cfg.steps
        return sorted({round(start * (s - i) / s) for i in range(s)}, reverse=True)

    def img2img(self, z0: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noise clean latents ``z0`` to the first timestep, denoise with deterministic DDIM, decode."""
        prior = self._prior
        ac = prior.alphas_cumprod.to(z0.device)
        ts = self.timesteps()
        cond = prior.conditioning(labels)
        z = ac[ts[0]].sqrt() * z0 + (1 - ac[ts[0]]).sqrt() * noise
        for i, t in enumerate(ts):
            a_t = ac[t]
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=z.device)
            eps = prior._eps(z, torch.full((z.shape[0],), t, device=z.device, dtype=torch.long), cond)
            x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return prior.decode(z)
