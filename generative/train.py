"""``distillset prior train``: train a small generative prior (LD3M or GLaD) on a source, saved for ``from_pretrained``.

* ``--kind ld3m``: an autoencoder (KL or VQ, diffusers) on images, then a class-conditional diffusers ``UNet2DModel``
  on its (scaled) latents with the DDPM epsilon loss. Written as diffusers ``save_pretrained`` folders (``vae/``,
  ``unet/``, ``scheduler/``) + ``prior.json``.
* ``--kind glad``: the built-in class-conditional style generator (:class:`generative.glad.StyleGenerator`) trained
  as a GAN against a projection discriminator (hinge loss, shared random shift/flip of real and fake batches), then
  the class-mean styles ``w_avg``. Written as ``generator/`` (``save_pretrained``) + ``prior.json``.

Plain loops over an in-memory split, data-parallel under ``accelerate launch``: every process draws the same global
batch (and noise) from one seeded generator, computes the loss of its slice ``[rank::world]`` scaled by its share,
and the gradients are summed across processes before each step. So N processes compute the single-process gradient
(up to float summation order) with 1/N of the work each, and the prior does not depend on the number of processes;
the main process writes it. Debug sizes (a few steps, width 8) train in seconds; CIFAR-10 / Tiny-ImageNet-10 subsets
at the defaults in minutes on a CPU. The folder is complete once ``prior.json`` exists; a finished folder with the same
config is not retrained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.config import check_number, fingerprint, to_dict, write_config
from distillset.core.data import ImageSet, Source
from distillset.core.errors import DistillError
from distillset.core.io import finished_record, read_json, require_folder
from distillset.core.schedule import cosine

log = logging.getLogger("distillset.generative")


@dataclass
class PriorTrainConfig:
    """Train a small generative prior for the ld3m / glad parametrizations.

    Attributes:
        out: output folder (prior.json + diffusers parts; config.yaml).
        data: data source spec.
        kind: ld3m (autoencoder + class-conditional diffusion UNet) or glad (conditional GAN generator).
        image_size: resize images to this size (0 = keep); must match the size you distil at.
        max_classes: use only the first N classes (0 = all).
        max_train: use only the first N training images (0 = all), for debugging.
        batch_size: images per step.
        lr: learning rate (AdamW for ld3m parts; Adam betas (0, 0.99) for the GAN).
        seed: seed of initialisation, batches and noise.
        flip: horizontal flips as augmentation (turn off for digits).
        autoencoder: ld3m autoencoder: kl (AutoencoderKL) or vq (VQModel).
        latent_channels: ld3m latent channels.
        down: ld3m latent downsampling factor (a power of two).
        width: base channels of the autoencoder (ld3m) or generator (glad).
        unet_width: base channels of the ld3m UNet.
        ae_steps: ld3m autoencoder training steps.
        unet_steps: ld3m diffusion UNet training steps.
        train_timesteps: ld3m diffusion timesteps T.
        sample_steps: default DDIM steps of the saved ld3m prior.
        kl_weight: KL weight of the ld3m AutoencoderKL.
        gan_steps: glad GAN training steps (one discriminator + one generator update each).
        z_dim: glad noise dimension.
        w_dim: glad style dimension.
        layer: default glad split layer (latent features after this synthesis layer).
        truncation: glad truncation towards the class-mean style for noise init.
    """

    out: str = "output/prior"
    data: str = "digits"
    kind: str = "ld3m"
    image_size: int = 0
    max_classes: int = 0
    max_train: int = 0
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    flip: bool = True
    autoencoder: str = "kl"
    latent_channels: int = 4
    down: int = 4
    width: int = 32
    unet_width: int = 32
    ae_steps: int = 600
    unet_steps: int = 1500
    train_timesteps: int = 1000
    sample_steps: int = 10
    kl_weight: float = 1e-6
    gan_steps: int = 1500
    z_dim: int = 64
    w_dim: int = 128
    layer: int = 1
    truncation: float = 0.7

    def __post_init__(self):
        if self.kind not in ("ld3m", "glad"):
            raise DistillError(f"unknown prior kind '{self.kind}'; use ld3m or glad.")
        if self.autoencoder not in ("kl", "vq"):
            raise DistillError(f"unknown autoencoder '{self.autoencoder}'; use kl or vq.")
        if min(self.batch_size, self.width, self.unet_width, self.sample_steps, self.train_timesteps) < 1:
            raise DistillError("batch_size, width, unet_width, sample_steps and train_timesteps must be >= 1.")
        if min(self.ae_steps, self.unet_steps, self.gan_steps) < 0:
            raise DistillError("training steps must be >= 0.")
        check_number(self.lr, "lr", high=100.0)


NON_SEMANTIC = ("out",)


def _load(cfg: PriorTrainConfig) -> tuple[ImageSet, ImageSet]:
    src = Source(cfg.data, cfg.image_size or None)
    train, test = src.load("train"), src.load("test")
    if cfg.max_classes:
        train = train.subset(torch.nonzero(train.labels < cfg.max_classes).flatten())
        test = test.subset(torch.nonzero(test.labels < cfg.max_classes).flatten())
        train = ImageSet(train.images, train.labels, train.class_names[: cfg.max_classes])
        test = ImageSet(test.images, test.labels, test.class_names[: cfg.max_classes])
    if cfg.max_train:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
                             [: cfg.max_train])
    train.require_classes(1, "prior training")
    return train, test


class DataParallel:
    """This process's share of every global batch, and the gradient sum over processes (see the module docstring)."""

    def __init__(self, rt):
        self.rt, self.rank, self.world, self.device = rt, rt.rank, rt.world, rt.device

    def part(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rank::self.world]

    def share(self, global_batch: int) -> float:
        """Weight of this process's mean loss in the global mean."""
        return len(range(self.rank, global_batch, self.world)) / global_batch

    def sync(self, params) -> None:
        """Sum the gradients of ``params`` over processes (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = self.rt.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))


def _batch(images: torch.Tensor, labels: torch.Tensor, n: int, g: torch.Generator, flip: bool, device):
    idx = torch.randint(len(images), (n,), generator=g)
    x = images[idx].to(device).float().div(255)
    if flip:
        m = (torch.rand(n, generator=g) < 0.5).to(device)
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(-1), x)
    return x, labels[idx].to(device)


def run(cfg: PriorTrainConfig, rt=None) -> dict:
    """Train (or find already trained) a prior; returns its metrics."""
    from distillset.core.runtime import get_runtime

    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    fp = fingerprint(cfg, NON_SEMANTIC)
    done = finished_record(out / "prior.json", fp, "a prior")
    if done is not None:
        log.info("%s is already trained; nothing to do", out)
        return done.get("metrics", {})
    if cfg.batch_size < rt.world:
        raise DistillError(f"batch_size {cfg.batch_size} is smaller than the {rt.world} processes sharing it; "
                           "raise --batch-size.")
    train, test = _load(cfg)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    fn = _train_ld3m if cfg.kind == "ld3m" else _train_glad
    prior, metrics = fn(cfg, train, test, DataParallel(rt))
    metrics["seconds"] = time.perf_counter() - t0
    if rt.is_main:
        prior.save_pretrained(out, {"fingerprint": fp, "metrics": metrics, "data": cfg.data,
                                    "train": {**to_dict(cfg), "processes": rt.world}})
        write_config(out, cfg)
        log.info("prior %s trained in %.1fs on %d process(es): %s", cfg.kind, metrics["seconds"], rt.world,
                 {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    rt.wait()
    return metrics if rt.is_main else read_json(out / "prior.json").get("metrics", {})


# ------------------------------------------------------------------------------------------------------------ LD3M


def _train_ld3m(cfg: PriorTrainConfig, train: ImageSet, test: ImageSet, dp: DataParallel) -> tuple:
    from distillset.generative.ld3m import build_ld3m, vae_loss

    device = dp.device
    shape = train.image_shape
    if shape[-1] % cfg.down:
        raise DistillError(f"image size {shape[-1]} is not divisible by down={cfg.down}.")
    prior = build_ld3m(train.num_classes, shape, cfg.autoencoder, cfg.latent_channels, cfg.down, cfg.width,
                       cfg.unet_width, cfg.train_timesteps, cfg.sample_steps, train.class_names).to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    vae, unet = prior.vae, prior.unet
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    vae.train()
    lat_shape = (cfg.latent_channels, shape[-2] // cfg.down, shape[-1] // cfg.down)
    share = dp.share(cfg.batch_size)
    for step in range(cfg.ae_steps):
        x, _ = _batch(train.images, train.labels, cfg.batch_size, g, cfg.flip, device)
        eps = torch.randn(cfg.batch_size, *lat_shape, generator=g).to(device)  # the KL posterior's sample noise
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * cosine(step, cfg.ae_steps)
        loss = vae_loss(vae, dp.part(x), cfg.kl_weight, dp.part(eps)) * share
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dp.sync(vae.parameters())
        opt.step()
        if (step + 1) % 200 == 0:
            log.info("ld3m autoencoder step %d/%d loss %.4f", step + 1, cfg.ae_steps, float(loss))
    vae.eval()
    # latents of every training image (and its mirror), computed once: the UNet then trains without the encoder
    with torch.no_grad():
        xs = train.images.float().div(255)
        raw = torch.cat([prior._vae_encode(xs[i:i + 256].to(device)) for i in range(0, len(xs), 256)])
        if cfg.flip:
            raw = torch.cat([raw, torch.cat([prior._vae_encode(xs[i:i + 256].flip(-1).to(device))
                                             for i in range(0, len(xs), 256)])])
        sf = float(1.0 / raw.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=sf)
    prior.scaling_factor = sf
    lat = raw * sf
    lab = train.labels.repeat(2 if cfg.flip else 1).to(device)
    ac = prior.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    unet.train()
    for step in range(cfg.unet_steps):
        idx = torch.randint(len(lat), (cfg.batch_size,), generator=g).to(device)
        z0, y = lat[idx], lab[idx]
        t = torch.randint(len(ac), (len(idx),), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * cosine(step, cfg.unet_steps)
        loss = F.mse_loss(unet(dp.part(zt), dp.part(t), class_labels=dp.part(y)).sample, dp.part(noise)) * share
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dp.sync(unet.parameters())
        opt.step()
        if (step + 1) % 500 == 0:
            log.info("ld3m unet step %d/%d loss %.4f", step + 1, cfg.unet_steps, float(loss))
    unet.eval()
    prior.requires_grad_(False)
    with torch.no_grad():
        x = test.images[:64].float().div(255).to(device)
        y = test.labels[:64].to(device)
        z = prior.encode(x)["z_T"]
        ae_mse = float(F.mse_loss(prior.decode(z), x))
        ld3m_mse = float(F.mse_loss(prior.render({"z_T": z}, prior.conditioning(y)), x))
    return prior, {"unet_loss": float(loss.detach()) / share if cfg.unet_steps else 0.0, "test_ae_mse": ae_mse,
                   "test_ld3m_render_mse": ld3m_mse, "scaling_factor": sf}


# ------------------------------------------------------------------------------------------------------------ GLaD


class ProjectionDiscriminator(nn.Module):
    """Strided conv features -> sum pool; score = linear(h) + <embed(y), h> (Miyato & Koyama's projection)."""

    def __init__(self, num_classes: int, channels: int, size: int, width: int):
        super().__init__()
        layers, c, s = [], channels, size
        ch = width // 2
        while s > 4:
            layers += [nn.Conv2d(c, ch, 3, 2, 1), nn.LeakyReLU(0.2)]
            c, ch, s = ch, min(ch * 2, width * 2), s // 2
        layers += [nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(c, 1)
        self.embed = nn.Embedding(num_classes, c)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x * 2 - 1).sum((2, 3))
        return self.out(h).squeeze(1) + (self.embed(y) * h).sum(1)


def _shift_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """DiffAugment-style translation (1/8 of the size) + flip, differentiable in x; applied to real and fake alike."""
    _n, _, h, w = x.shape
    p = max(1, h // 8)
    xp = F.pad(x, (p, p, p, p), mode="reflect")
    dx, dy = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
    x = xp[:, :, dy:dy + h, dx:dx + w]
    if torch.rand(1, generator=g).item() < 0.5:
        x = x.flip(-1)
    return x


def _train_glad(cfg: PriorTrainConfig, train: ImageSet, test: ImageSet, dp: DataParallel) -> tuple:
    from distillset.generative.glad import build_glad

    device = dp.device
    shape = train.image_shape
    prior = build_glad(train.num_classes, shape, cfg.z_dim, cfg.w_dim, cfg.width, cfg.layer, cfg.truncation,
                       train.class_names).to(device)
    gen = prior.generator
    disc = ProjectionDiscriminator(train.num_classes, shape[0], shape[-1], cfg.width).to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr * 0.1, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr * 0.1, betas=(0.0, 0.99))
    gen.train()
    d_loss = g_loss = torch.zeros(())
    share = dp.share(cfg.batch_size)
    for step in range(cfg.gan_steps):
        x, y = _batch(train.images, train.labels, cfg.batch_size, g, cfg.flip, device)
        z = torch.randn(len(y), cfg.z_dim, generator=g).to(device)
        x, y, z = dp.part(x), dp.part(y), dp.part(z)
        fake = gen(z, y) * 0.5 + 0.5
        d_loss = (F.relu(1 - disc(_shift_flip(x, g), y)).mean() +
                  F.relu(1 + disc(_shift_flip(fake.detach(), g), y)).mean()) * share
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        dp.sync(disc.parameters())
        opt_d.step()
        g_loss = -disc(_shift_flip(fake, g), y).mean() * share
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        dp.sync(gen.parameters())
        opt_g.step()
        if (step + 1) % 500 == 0:
            log.info("glad gan step %d/%d d %.4f g %.4f", step + 1, cfg.gan_steps, float(d_loss), float(g_loss))
    gen.eval()
    prior.requires_grad_(False)
    with torch.no_grad():
        for c in range(train.num_classes):
            z = torch.randn(256, cfg.z_dim, generator=g).to(device)
            gen.w_avg[c] = gen.mapping(z, torch.full((256,), c, device=device)).mean(0)
    x = test.images[:32].float().div(255).to(device)
    y = test.labels[:32].to(device)
    rec = prior.render(prior.encode(x, y))
    return prior, {"d_loss": float(d_loss.detach()) / share, "g_loss": float(g_loss.detach()) / share,
                   "test_inversion_mse": float(F.mse_loss(rec, x))}
