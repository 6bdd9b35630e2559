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

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

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
        finetune: "" trains a prior from scratch; minimax fine-tunes an ld3m prior with Minimax's
            representativeness and diversity terms added to the diffusion loss (Gu et al., CVPR'24).
        from_prior: the ld3m prior folder to fine-tune; empty with finetune: first train a base prior with this
            config's settings into <out>/base (kept, so D4M or plain sampling can use it too).
        finetune_steps: fine-tuning steps (UNet only; the autoencoder is kept).
        finetune_lr: fine-tuning learning rate (AdamW, cosine).
        finetune_params: all (every UNet weight) or difffit (biases, norms and the class table, as the public code).
        minimax_lambda_repr: weight of representativeness (pull each predicted clean latent towards the least
            similar real latent of its class in memory).
        minimax_lambda_div: weight of diversity (push each predicted clean latent away from the most similar past
            prediction of its class in memory).
        memory_size: latents per class kept in each memory (real and generated).
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
    finetune: str = ""
    from_prior: str = ""
    finetune_steps: int = 500
    finetune_lr: float = 1e-3
    finetune_params: str = "all"
    minimax_lambda_repr: float = 0.002
    minimax_lambda_div: float = 0.008
    memory_size: int = 64

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
        if self.finetune not in ("", "minimax"):
            raise DistillError(f"unknown finetune '{self.finetune}'; use minimax (or leave it empty to train from "
                               "scratch).")
        if self.from_prior and not self.finetune:
            raise DistillError("from_prior is the prior to fine-tune; set --finetune minimax too (or drop "
                               "--from-prior to train from scratch).")
        if self.finetune and self.kind != "ld3m":
            raise DistillError(f"minimax fine-tunes a diffusion prior but kind is '{self.kind}'; use --kind ld3m.")
        if self.finetune_params not in ("all", "difffit"):
            raise DistillError(f"unknown finetune_params '{self.finetune_params}'; use all or difffit.")
        if self.finetune_steps < 1 or self.memory_size < 1:
            raise DistillError("finetune_steps and memory_size must be >= 1.")
        check_number(self.finetune_lr, "finetune_lr", high=100.0)
        check_number(self.minimax_lambda_repr, "minimax_lambda_repr", high=1e6, allow_low=True)
        check_number(self.minimax_lambda_div, "minimax_lambda_div", high=1e6, allow_low=True)


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


FINETUNE_FIELDS = ("finetune", "from_prior", "finetune_steps", "finetune_lr", "finetune_params",
                   "minimax_lambda_repr", "minimax_lambda_div", "memory_size")


def base_config(cfg: PriorTrainConfig) -> PriorTrainConfig:
    """The config of the base prior a fine-tuning run without ``from_prior`` trains first (into ``<out>/base``):
    this one with the fine-tuning fields at their defaults, so it is the prior a plain ``prior train`` makes."""
    plain = PriorTrainConfig()
    return dataclasses.replace(cfg, out=str(Path(cfg.out) / "base"),
                               **{f: getattr(plain, f) for f in FINETUNE_FIELDS})


def _base_prior(cfg: PriorTrainConfig, out: Path, rt) -> tuple[Path, str]:
    """``(folder, fingerprint)`` of the prior a fine-tuning run starts from, training it first when it is ours."""
    from distillset.generative.prior import read_prior_meta

    if not cfg.from_prior:
        run(base_config(cfg), rt)
        base = out / "base"
    else:
        base = Path(cfg.from_prior)
        if base.resolve() == out.resolve():
            raise DistillError(f"--from-prior and --out are both {out}; write the fine-tuned prior to another "
                               "folder (the prior it starts from is kept).")
    meta = read_prior_meta(base)
    if meta["kind"] != "ld3m":
        raise DistillError(f"{base} holds a '{meta['kind']}' prior; minimax fine-tunes a latent diffusion prior: "
                           "pass an ld3m prior folder (distillset prior train --kind ld3m) as --from-prior.")
    return base, str(meta.get("fingerprint", base.resolve()))


def run(cfg: PriorTrainConfig, rt=None) -> dict:
    """Train (or find already trained) a prior, or fine-tune one (``finetune``); returns its metrics."""
    from distillset.core.runtime import get_runtime

    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    base = None
    fp = fingerprint(cfg, NON_SEMANTIC)
    if cfg.finetune:
        base, base_fp = _base_prior(cfg, out, rt)
        fp = hashlib.sha256(f"{fp}:{base_fp}".encode()).hexdigest()[:16]  # a re-trained base is a new fine-tuning
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
    if base is not None:
        prior, metrics = _finetune_minimax(cfg, base, train, test, DataParallel(rt))
    else:
        fn = _train_ld3m if cfg.kind == "ld3m" else _train_glad
        prior, metrics = fn(cfg, train, test, DataParallel(rt))
    metrics["seconds"] = time.perf_counter() - t0
    if rt.is_main:
        extra = {"fingerprint": fp, "metrics": metrics, "data": cfg.data,
                 "train": {**to_dict(cfg), "processes": rt.world}}
        if base is not None:
            extra["from_prior"] = str(base)
        prior.save_pretrained(out, extra)
        write_config(out, cfg)
        log.info("prior %s %s in %.1fs on %d process(es): %s", cfg.kind, "fine-tuned" if base else "trained",
                 metrics["seconds"], rt.world, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
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
    raw, lab = _latents(prior, train, cfg.flip, device)
    sf = float(1.0 / raw.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=sf)
    prior.scaling_factor = sf
    lat = raw * sf
    ac = prior.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    unet.train()
    for step in range(cfg.unet_steps):
        _z0, y, t, noise, zt = _noised(lat, lab, ac, cfg.batch_size, g, device)
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
    return prior, {"unet_loss": float(loss.detach()) / share if cfg.unet_steps else 0.0, **_ld3m_test(prior, test),
                   "scaling_factor": sf}


@torch.no_grad()
def _latents(prior, train: ImageSet, flip: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled autoencoder latents of every training image (and its mirror with ``flip``) with their labels,
    computed once: the UNet then trains without the encoder."""
    xs = train.images.float().div(255)
    views = [xs, xs.flip(-1)] if flip else [xs]
    raw = torch.cat([prior._vae_encode(v[i:i + 256].to(device)) for v in views for i in range(0, len(v), 256)])
    return raw, train.labels.repeat(len(views)).to(device)


def _noised(lat: torch.Tensor, lab: torch.Tensor, ac: torch.Tensor, n: int, g: torch.Generator, device):
    """A DDPM training batch: ``(z0, labels, t, noise, z_t)`` of ``n`` latents drawn with ``g``."""
    idx = torch.randint(len(lat), (n,), generator=g).to(device)
    z0, y = lat[idx], lab[idx]
    t = torch.randint(len(ac), (n,), generator=g).to(device)
    noise = torch.randn(z0.shape, generator=g).to(device)
    a = ac[t].view(-1, 1, 1, 1)
    return z0, y, t, noise, a.sqrt() * z0 + (1 - a).sqrt() * noise


@torch.no_grad()
def _ld3m_test(prior, test: ImageSet) -> dict[str, float]:
    """Reconstruction error of the autoencoder and of LD3M's render (encode, DDIM with blending) on test images."""
    x = test.images[:64].float().div(255).to(prior.device)
    y = test.labels[:64].to(prior.device)
    z = prior.encode(x)["z_T"]
    return {"test_ae_mse": float(F.mse_loss(prior.decode(z), x)),
            "test_ld3m_render_mse": float(F.mse_loss(prior.render({"z_T": z}, prior.conditioning(y)), x))}


def _finetune_parameters(unet: nn.Module, which: str) -> list[nn.Parameter]:
    """The UNet weights fine-tuning updates: all, or DiffFit's biases, norms and class table."""
    if which == "all":
        return list(unet.parameters())
    return [p for n, p in unet.named_parameters() if n.endswith("bias") or "norm" in n or "class_embedding" in n]


def _finetune_minimax(cfg: PriorTrainConfig, base: Path, train: ImageSet, test: ImageSet,
                      dp: DataParallel) -> tuple:
    """Minimax fine-tuning of an LD3M prior's UNet (see :mod:`generative.minimax`): diffusion loss +
    ``lambda_repr x representativeness + lambda_div x diversity`` on the predicted clean latents.

    The memories are this process's: under several processes each keeps the memories of its slice of the batch,
    as the public code's per-rank memories do, so only the diffusion term is the single-process one exactly.
    """
    from distillset.generative.minimax import MinimaxTerms, sample_similarity
    from distillset.generative.prior import from_pretrained

    device = dp.device
    prior = from_pretrained(base, kind="ld3m", num_classes=train.num_classes, image_shape=train.image_shape,
                            device=device, cache=False)
    g = torch.Generator().manual_seed(cfg.seed)
    lat, lab = _latents(prior, train, cfg.flip, device)
    lat = lat * prior.scaling_factor
    per_class = 8

    def measure() -> dict[str, float]:  # the same noise before and after
        return sample_similarity(prior, lat, lab, per_class, torch.Generator().manual_seed(cfg.seed + 1))

    before = measure()
    unet = prior.unet
    params = _finetune_parameters(unet, cfg.finetune_params)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.0)
    terms = MinimaxTerms(cfg.memory_size)
    ac = prior.alphas_cumprod.to(device)
    share = dp.share(cfg.batch_size)
    sums = {"diffusion": 0.0, "repr": 0.0, "div": 0.0}
    unet.train()
    for step in range(cfg.finetune_steps):
        z0, y, t, noise, zt = (dp.part(v) for v in _noised(lat, lab, ac, cfg.batch_size, g, device))
        for grp in opt.param_groups:
            grp["lr"] = cfg.finetune_lr * cosine(step, cfg.finetune_steps)
        eps = unet(zt, t, class_labels=y).sample
        a = ac[t].view(-1, 1, 1, 1)
        x0 = (zt - (1 - a).sqrt() * eps) / a.sqrt()
        mse = F.mse_loss(eps, noise)
        rep, div = terms(x0, z0, y)
        loss = (mse + cfg.minimax_lambda_repr * rep + cfg.minimax_lambda_div * div) * share
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dp.sync(params)
        opt.step()
        for k, v in (("diffusion", mse), ("repr", rep), ("div", div)):
            sums[k] += float(v.detach())
        if (step + 1) % 100 == 0:
            log.info("minimax step %d/%d diffusion %.4f repr %.4f div %.4f", step + 1, cfg.finetune_steps,
                     float(mse), float(rep), float(div))
    unet.eval()
    prior.requires_grad_(False)
    after = measure()
    n = cfg.finetune_steps
    return prior, {"finetune_diffusion_loss": sums["diffusion"] / n, "finetune_repr": sums["repr"] / n,
                   "finetune_div": sums["div"] / n, **_ld3m_test(prior, test),
                   **{f"base_sample_{k}": v for k, v in before.items()}, **{f"sample_{k}": v for k, v in after.items()},
                   "scaling_factor": prior.scaling_factor}


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
