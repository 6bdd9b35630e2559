"""LD3M prior: a class-conditional latent diffusion model (diffusers parts) rendered by a differentiable DDIM loop.

Parts, all standard diffusers models saved with ``save_pretrained``:

* ``vae/``: an :class:`~diffusers.VQModel` or :class:`~diffusers.AutoencoderKL`; latents are the encoder output times
  ``vae.config.scaling_factor`` (so they have about unit variance, as in LDM).
* ``unet/``: a :class:`~diffusers.UNet2DModel` with ``num_class_embeds`` (a class-embedding table added to the
  timestep embedding), predicting the noise (``epsilon``).
* ``scheduler/``: a :class:`~diffusers.DDIMScheduler` config; only its ``alphas_cumprod`` is used.

Rendering (LD3M): the learnable ``z_T`` starts the deterministic DDIM loop (eta = 0) over ``steps`` evenly spaced
timesteps from ``T - 1`` down; at step ``i`` the predicted ``x0`` is blended towards ``z_T`` with weight
``blend * (steps - i) / steps`` (falling linearly), which keeps a short path from ``z_T`` to the image so its gradient
does not vanish through the chain of UNet calls. The class conditioning is a learnable vector per image that replaces
the class-table lookup (it starts at the table row of the image's class). Every UNet call is gradient-checkpointed.
The loop is written in torch because diffusers pipelines run under ``no_grad``.

Large public checkpoints: any diffusers *pipeline* folder whose ``model_index.json`` names a ``vqvae`` or ``vae``
and a class-conditional ``unet`` (``UNet2DModel`` with ``num_class_embeds``, ``epsilon`` prediction) loads directly,
with no ``prior.json``::

    # once, on a machine with internet: fetch a class-conditional LDM in diffusers format into a local folder
    #   huggingface-cli download <org>/<class-conditional-ldm> --local-dir /models/ldm-cin
    # then, offline:
    distillset recover --parametrization ld3m --param_options '{"prior": "/models/ldm-cin", "steps": 10, "chunk": 4}'

The class count comes from ``unet.config.num_class_embeds``, the image size from ``vae.config.sample_size``; a
``prior.json`` written beside the parts (``{"format": "distillset-prior/1", "kind": "ld3m", ...}``, as
:func:`LD3MPrior.save_pretrained` writes) overrides them and can add ``class_names``. Folders are only ever read
from disk (``local_files_only``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distillset.core.errors import DistillError
from distillset.generative.diffusers_folder import meta_from_diffusers_folder  # noqa: F401  (re-exported)
from distillset.generative.prior import Prior, register_prior, write_prior_meta

log = logging.getLogger("distillset.generative")


class _CondEmbedding(nn.Embedding):
    """The UNet's class table, which also accepts a float conditioning vector per image and passes it through.

    Swapped in by ``__class__`` so parameter names (``class_embedding.weight``) and ``save_pretrained`` are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return x
        return super().forward(x)


def build_vae(ae: str, image_shape: tuple[int, int, int], latent_channels: int = 4, down: int = 4,
              width: int = 32) -> nn.Module:
    """A small VQ or KL autoencoder downsampling by ``down`` (a power of two)."""
    from diffusers import AutoencoderKL, VQModel

    levels = int(down).bit_length() - 1
    if 2 ** levels != down or levels < 1:
        raise DistillError(f"latent downsampling must be a power of two >= 2, got {down}.")
    chans = tuple(width * min(2 ** i, 4) for i in range(levels + 1))
    common = {"in_channels": image_shape[0], "out_channels": image_shape[0],
                  "down_block_types": ("DownEncoderBlock2D",) * len(chans),
                  "up_block_types": ("UpDecoderBlock2D",) * len(chans), "block_out_channels": chans,
                  "layers_per_block": 1,
                  "latent_channels": latent_channels, "norm_num_groups": min(8, width), "sample_size": image_shape[-1],
                  "mid_block_add_attention": False}
    if ae == "vq":
        return VQModel(num_vq_embeddings=256, **common)
    if ae == "kl":
        return AutoencoderKL(force_upcast=False, **common)
    raise DistillError(f"unknown autoencoder '{ae}'; use vq or kl.")


def build_unet(latent_shape: tuple[int, int, int], num_classes: int, width: int = 32, attention: bool = False):
    """A small class-conditional UNet2DModel on latents."""
    from diffusers import UNet2DModel

    down = ("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D")
    up = ("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=latent_shape[-1], in_channels=latent_shape[0], out_channels=latent_shape[0],
                       down_block_types=down, up_block_types=up, block_out_channels=(width, 2 * width),
                       layers_per_block=1, norm_num_groups=min(8, width), num_class_embeds=num_classes,
                       attention_head_dim=8)


def build_scheduler(train_timesteps: int = 1000):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=train_timesteps, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=True, prediction_type="epsilon")


def build_ld3m(num_classes: int, image_shape: tuple[int, int, int], ae: str = "kl", latent_channels: int = 4,
               down: int = 4, width: int = 32, unet_width: int = 32, train_timesteps: int = 1000, steps: int = 10,
               class_names: list[str] | None = None) -> LD3MPrior:
    """An untrained LD3M prior from config (tests build one in well under a second)."""
    vae = build_vae(ae, image_shape, latent_channels, down, width)
    lat = (latent_channels, image_shape[1] // down, image_shape[2] // down)
    unet = build_unet(lat, num_classes, unet_width)
    sched = build_scheduler(train_timesteps)
    return LD3MPrior(vae, unet, sched, _meta(vae, unet, num_classes, image_shape, steps, class_names))


def _meta(vae, unet, num_classes: int, image_shape, steps: int, class_names=None) -> dict:
    lc = int(vae.config.latent_channels)
    size = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
    return {"kind": "ld3m", "num_classes": int(num_classes), "image_shape": list(image_shape),
            "latent_shapes": {"z_T": [lc, size, size], "cond": [int(unet.class_embedding.weight.shape[1])]},
            "steps": int(steps), "autoencoder": type(vae).__name__,
            "class_names": class_names or [str(i) for i in range(num_classes)]}


@register_prior("ld3m", paper="Moser et al. 2024, Latent Dataset Distillation with Diffusion Models (arXiv:2403.03881)")
class LD3MPrior(Prior):
    """VAE + class-conditional UNet + DDIM schedule, rendered differentiably (see the module docstring)."""

    def __init__(self, vae: nn.Module, unet: nn.Module, scheduler, meta: dict):
        super().__init__(meta)
        if getattr(unet, "class_embedding", None) is None or not isinstance(unet.class_embedding, nn.Embedding):
            raise DistillError("the LD3M prior's UNet is not class-conditional (no num_class_embeds class table); "
                               "use a class-conditional UNet2DModel.")
        if int(vae.config.latent_channels) != int(unet.config.in_channels):
            raise DistillError(f"the prior's autoencoder makes {vae.config.latent_channels}-channel latents but its "
                               f"UNet takes {unet.config.in_channels} channels; the parts come from different models.")
        unet.class_embedding.__class__ = _CondEmbedding
        self.vae, self.unet, self.scheduler = vae, unet, scheduler
        self.is_vq = type(vae).__name__ == "VQModel"
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.steps = int(meta.get("steps", 10))
        self.blend = 1.0
        self.checkpointing = True
        self.quantize = True

    # ------------------------------------------------------------------------------------------------ encode
    def _vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(x * 2 - 1)
        return out.latents if self.is_vq else out.latent_dist.mean

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.is_vq:
            return self.vae.decode(z, force_not_quantize=not self.quantize).sample
        return self.vae.decode(z).sample

    def encode(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"z_T": self._vae_encode(images) * self.scaling_factor}

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Scaled clean latents -> ``[0, 1]`` images (no diffusion)."""
        return (self._vae_decode(z0 / self.scaling_factor) * 0.5 + 0.5).clamp(0, 1)

    def sample_latents(self, labels, generators):
        shape = self.latent_shapes()["z_T"]
        z = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        return {"z_T": z}

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        return self.unet.class_embedding.weight[labels.to(self.device)].detach().clone()

    # ------------------------------------------------------------------------------------------------ render
    def timesteps(self, steps: int | None = None) -> list[int]:
        """``steps`` evenly spaced timesteps from ``T - 1`` down to ``T / steps - 1``."""
        s = int(steps or self.steps)
        total = int(self.alphas_cumprod.numel())
        return [max(0, round((s - i) * total / s) - 1) for i in range(s)]

    def _eps(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, class_labels=cond).sample

    def denoise(self, z_T: torch.Tensor, cond: torch.Tensor, steps: int | None = None, blend: float | None = None,
                checkpointing: bool | None = None) -> torch.Tensor:
        """The LD3M DDIM loop: scaled clean latents from ``z_T`` and the conditioning vectors."""
        ts = self.timesteps(steps)
        s = len(ts)
        blend = self.blend if blend is None else blend
        ac = self.alphas_cumprod.to(z_T.device)
        z = z_T
        use_ckpt = (self.checkpointing if checkpointing is None else checkpointing) and torch.is_grad_enabled()
        for i, t in enumerate(ts):
            a_t = ac[t]
            a_prev = ac[ts[i + 1]] if i + 1 < s else torch.ones((), device=z.device)
            tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
            eps = checkpoint(self._eps, z, tt, cond, use_reentrant=False) if use_ckpt else self._eps(z, tt, cond)
            x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            w = blend * (s - i) / s
            x0 = (1 - w) * x0 + w * z_T
            z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return z

    def render(self, latents: dict[str, torch.Tensor], cond: torch.Tensor | None = None, steps: int | None = None,
               blend: float | None = None, checkpointing: bool | None = None) -> torch.Tensor:
        z_T = latents["z_T"]
        if cond is None:
            raise DistillError("the LD3M prior needs a conditioning vector per image (prior.conditioning(labels)).")
        return self.decode(self.denoise(z_T, cond, steps, blend, checkpointing))

    # -------------------------------------------------------------------------------------------------- disk
    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        self.unet.class_embedding.__class__ = nn.Embedding  # save the plain diffusers module
        try:
            self.vae.save_pretrained(folder / "vae")
            self.unet.save_pretrained(folder / "unet")
        finally:
            self.unet.class_embedding.__class__ = _CondEmbedding
        self.scheduler.save_pretrained(folder / "scheduler")
        write_prior_meta(folder, {**self.meta, **(extra or {})})

    @classmethod
    def load(cls, folder: Path, meta: dict) -> LD3MPrior:
        vae_dir = meta.get("vae_subfolder") or ("vae" if (folder / "vae").exists() else "vqvae")
        vae, unet, sched = _load_parts(folder, vae_dir)
        lc = int(vae.config.latent_channels)
        size = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
        want = meta.get("latent_shapes", {}).get("z_T")
        if want is not None and list(want) != [lc, size, size]:
            raise DistillError(f"{folder}/prior.json says latents are {tuple(want)} but the saved parts make "
                               f"{(lc, size, size)}; the folder mixes parts of different priors, re-train it.")
        classes = int(unet.config.num_class_embeds or 0)
        if classes < int(meta["num_classes"]):
            raise DistillError(f"{folder}/prior.json says {meta['num_classes']} classes but the UNet's class table "
                               f"has {classes}; the folder mixes parts of different priors, re-train it.")
        return cls(vae, unet, sched, meta)


def load_latent_diffusion(folder: str | Path, method: str, num_classes: int | None = None,
                          image_shape: tuple[int, int, int] | None = None, device="cpu") -> LD3MPrior:
    """The LD3M prior in ``folder`` for a method that samples or encodes through it (D4M, Minimax); a prior of
    another kind (GLaD: a generator, no autoencoder) is a one-line error naming ``method``."""
    from distillset.generative.prior import from_pretrained, read_prior_meta

    meta = read_prior_meta(folder)
    if meta["kind"] != "ld3m":
        raise DistillError(f"{folder} holds a '{meta['kind']}' prior, which has no autoencoder and no diffusion "
                           f"model; {method} needs a latent diffusion model (an LD3M prior folder from `distillset "
                           "prior train --kind ld3m` or a diffusers class-conditional LDM folder).")
    return from_pretrained(folder, num_classes=num_classes, image_shape=image_shape, device=device)


def _load_parts(folder: Path, vae_dir: str):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel

    for part in (vae_dir, "unet"):
        if not (folder / part / "config.json").exists():
            raise DistillError(f"{folder} is missing {part}/config.json; an LD3M prior folder holds vae/ (or vqvae/), "
                               "unet/ and scheduler/ in diffusers format.")
    try:
        vcfg = (folder / vae_dir / "config.json").read_text()
        vae_cls = VQModel if '"VQModel"' in vcfg else AutoencoderKL
        vae = vae_cls.from_pretrained(folder / vae_dir, local_files_only=True)
        unet = UNet2DModel.from_pretrained(folder / "unet", local_files_only=True)
        if (folder / "scheduler").exists():
            sched = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True, clip_sample=False)
        else:
            sched = build_scheduler()
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistillError(f"could not load the diffusers parts of {folder} ({msg}); the folder is incomplete or "
                           "from another library version.") from None
    if sched.config.prediction_type != "epsilon":
        raise DistillError(f"{folder}: the scheduler predicts '{sched.config.prediction_type}' but the LD3M loop "
                           "needs an epsilon-prediction model.")
    return vae, unet, sched


def vae_loss(vae: nn.Module, x: torch.Tensor, kl_weight: float = 1e-6, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruction (L1 + MSE in [-1, 1]) + VQ commitment or KL, the autoencoder's training loss. ``eps``: the
    standard-normal noise of the KL posterior's sample (drawn from the global RNG when None)."""
    x = x * 2 - 1
    if type(vae).__name__ == "VQModel":
        h = vae.encode(x).latents
        out = vae.decode(h)
        rec, reg = out.sample, out.commit_loss.mean()
    else:
        post = vae.encode(x).latent_dist
        z = post.sample() if eps is None else post.mean + post.std * eps
        rec = vae.decode(z).sample
        reg = kl_weight * post.kl().mean()
    return F.l1_loss(rec, x) + F.mse_loss(rec, x) + reg
