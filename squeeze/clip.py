"""A small CLIP-style contrastive model, trainable from scratch on image-caption pairs, and its BPE tokenizer.

* The tokenizer is a byte-pair encoding trained with Hugging Face ``tokenizers`` on the training captions (lower-cased,
  whitespace/punctuation pre-tokenised, ``[PAD]=0 [UNK] [SOS] [EOS]``).
* The image tower is a distillset backbone (the ConvNet family, ``timm:NAME``, ...; its pooled features, no head);
  the text tower is open_clip's :class:`~open_clip.transformer.TextTransformer` with our vocabulary, pooled at
  ``[EOS]`` and without its own projection; the contrastive loss is open_clip's :class:`~open_clip.loss.ClipLoss`.
* The two projection layers (:class:`Heads`) are separate from the towers: vision-language distillation freezes the
  towers and matches trajectories of the heads (Wu et al., TMLR'24), so ``encode_*_features`` give the
  pre-projection features and :class:`Heads` maps them into the joint space.

A model is saved as a folder: ``config.json`` (architecture, input statistics, tokenizer hash), ``model.safetensors``
and ``tokenizer.json``. open_clip is used only for its classes; nothing is downloaded (no ``pretrained=``). A user
with pretrained weights points ``image_weights`` at a local state dict of the image backbone, or ``init`` at a saved
model folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.io import load_tensors, read_json, save_tensors, write_json, write_text


def _require_vl_extra() -> None:
    """One line, not an ImportError traceback, where the ``vl`` extra is not installed."""
    import importlib.util

    missing = [m for m in ("open_clip", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise DistillError(f"vision-language distillation needs {' and '.join(missing)}: pip install "
                           "'distillset[vl]' (open_clip_torch, tokenizers).")

log = logging.getLogger("distillset.squeeze")

SPECIALS = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")
PAD, UNK, SOS, EOS = range(4)
MAX_UNK = 0.2  # a tokenizer that maps more of the captions to [UNK] than this was trained on other data


# ----------------------------------------------------------------------------------------------------------- tokenizer


class CaptionTokenizer:
    """A BPE tokenizer (``tokenizers``) with fixed special ids; ``encode`` gives padded ``(n, context)`` ids."""

    def __init__(self, tok, context_length: int):
        self.tok, self.context_length = tok, int(context_length)
        for i, name in enumerate(SPECIALS):
            if tok.token_to_id(name) != i:
                raise DistillError(f"tokenizer has no {name} at id {i}; it was not made by `distillset vl train` "
                                   "(train one on your captions with it).")

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, context_length: int) -> CaptionTokenizer:
        _require_vl_extra()
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, context_length)

    @classmethod
    def load(cls, path: str | Path, context_length: int) -> CaptionTokenizer:
        _require_vl_extra()
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.exists():
            raise DistillError(f"tokenizer file {path} does not exist; train one with `distillset vl train`.")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception type)
            raise DistillError(f"{path} is not a tokenizers JSON file ({e}).") from None
        return cls(tok, context_length)

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    def to_json(self) -> str:
        return self.tok.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, enc in enumerate(self.tok.encode_batch(list(texts))):
            ids = [SOS] + enc.ids[:self.context_length - 2] + [EOS]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def unknown_fraction(self, texts: list[str]) -> float:
        """Share of the tokens of ``texts`` that are ``[UNK]``."""
        ids = [i for enc in self.tok.encode_batch(list(texts)) for i in enc.ids]
        return sum(i == UNK for i in ids) / max(1, len(ids))

    def check_fits(self, texts: list[str], where: str) -> None:
        frac = self.unknown_fraction(texts[:2000])
        if frac > MAX_UNK:
            raise DistillError(f"{where}: {frac:.0%} of the caption tokens are unknown to the tokenizer; it was "
                               "trained on other data: train one on these captions (leave tokenizer empty).")


# --------------------------------------------------------------------------------------------------------- the model


@dataclass
class ClipSpec:
    """Architecture of the contrastive model (saved in config.json).

    Attributes:
        arch: image backbone: a registry name (convnet, convnet_bn, resnet18_cifar, ...) or timm:NAME.
        model_kwargs: keyword arguments of the image backbone (e.g. width).
        image_size: input resolution of the image tower.
        in_chans: image channels.
        embed_dim: width of the joint image-text space.
        text_width: width of the text transformer (the text embeddings the distilled set holds).
        text_layers: transformer blocks of the text tower.
        text_heads: attention heads of the text tower.
        context_length: tokens per caption (longer captions are cut).
        vocab_size: BPE vocabulary size (of the trained tokenizer).
        mean: per-channel input mean (set from the training images).
        std: per-channel input std.
    """

    arch: str = "convnet"
    model_kwargs: dict = field(default_factory=lambda: {"width": 64})
    image_size: int = 32
    in_chans: int = 3
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32
    vocab_size: int = 2000
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self):
        if self.embed_dim < 1 or self.text_width < 1 or self.text_layers < 1 or self.context_length < 3:
            raise DistillError("embed_dim, text_width, text_layers must be >= 1 and context_length >= 3.")
        if self.text_width % self.text_heads:
            raise DistillError(f"text_width {self.text_width} must be a multiple of text_heads {self.text_heads}.")
        if self.vocab_size < 16:
            raise DistillError(f"vocab_size must be >= 16, got {self.vocab_size}.")


class Heads(nn.Module):
    """The two projection layers into the joint space: ``forward((image_features, text_embeddings))`` gives the
    L2-normalised image and text embeddings. ``rank > 0``: LoRA heads, ``W0 + B A`` with ``W0`` frozen (buffers,
    e.g. the pretrained projections) and only ``A, B`` (and the biases) trained, the paper's LoRA matching."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, rank: int = 0, base: Heads | None = None):
        super().__init__()
        self.rank = int(rank)
        self.image = nn.Linear(image_dim, embed_dim)
        self.text = nn.Linear(text_dim, embed_dim)
        if self.rank:
            if base is None:
                raise DistillError("LoRA heads need the base projections they adapt (a trained model's heads).")
            for side, lin in (("image", self.image), ("text", self.text)):
                src = getattr(base, side)
                w0 = base.weight(side).detach().clone()
                self.register_buffer(f"{side}_w0", w0)
                lin.weight.requires_grad_(False)
                with torch.no_grad():
                    lin.bias.copy_(src.bias.detach())
                # LoRA's initialisation: A random, B zero, so training starts at the base projection
                self.register_parameter(f"{side}_a", nn.Parameter(torch.randn(self.rank, w0.shape[1]) / w0.shape[1] ** .5))
                self.register_parameter(f"{side}_b", nn.Parameter(torch.zeros(w0.shape[0], self.rank)))
            del self.image.weight, self.text.weight  # the weight is W0 + B A, never a free tensor
        self.image_dim, self.text_dim, self.embed_dim = image_dim, text_dim, embed_dim

    def weight(self, side: str) -> torch.Tensor:
        if not self.rank:
            return getattr(self, side).weight
        return getattr(self, f"{side}_w0") + getattr(self, f"{side}_b") @ getattr(self, f"{side}_a")

    def side_of(self, name: str) -> str:
        """``image`` or ``text``: the tower a parameter of this module projects."""
        return "image" if name.startswith("image") else "text"

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        f_img, f_txt = pair
        zi = F.linear(f_img, self.weight("image"), self.image.bias)
        zt = F.linear(f_txt, self.weight("text"), self.text.bias)
        return F.normalize(zi, dim=-1), F.normalize(zt, dim=-1)


class ImageTower(nn.Module):
    """A backbone's pooled features (its classifier removed)."""

    def __init__(self, spec: ClipSpec):
        super().__init__()
        from distillset.squeeze.models import create_model

        with warnings.catch_warnings():  # a 0-class classifier is an empty Linear; torch warns while initialising it
            warnings.simplefilter("ignore", UserWarning)
            self.backbone = create_model(spec.arch, 0, spec.in_chans, spec.image_size, **spec.model_kwargs)
        # registry ConvNets expose embed(); timm models built with num_classes=0 return pooled features
        self._embed = getattr(self.backbone, "embed", None)
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            self.dim = int(self(torch.zeros(2, spec.in_chans, spec.image_size, spec.image_size)).shape[1])
            self.backbone.train(was)
        if self.dim < 1:
            raise DistillError(f"image backbone {spec.arch} gives no features; use a ConvNet or a timm: model.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._embed(x) if self._embed is not None else self.backbone(x)
        return f.flatten(1)


class ClipModel(nn.Module):
    """Image tower + text tower (open_clip TextTransformer) + :class:`Heads` + a learnable logit scale."""

    def __init__(self, spec: ClipSpec):
        super().__init__()
        _require_vl_extra()
        from open_clip.transformer import TextTransformer

        self.spec = spec
        self.visual = ImageTower(spec)
        self.text = TextTransformer(context_length=spec.context_length, vocab_size=spec.vocab_size,
                                    width=spec.text_width, heads=spec.text_heads, layers=spec.text_layers,
                                    output_dim=None, proj_type="none", pad_id=PAD, eos_id=EOS, pool_type="eos")
        self.heads = Heads(self.visual.dim, spec.text_width, spec.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def image_features(self, x01: torch.Tensor) -> torch.Tensor:
        """Pre-projection features of ``[0, 1]`` images (normalised here), differentiable in the pixels."""
        return self.visual((x01 - self.mean) / self.std)

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Pre-projection text embeddings (the space the distilled text lives in)."""
        return self.text(ids)

    def forward(self, x01: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads((self.image_features(x01), self.text_features(ids)))


# --------------------------------------------------------------------------------------------------- save and load


def save_clip(folder: str | Path, model: ClipModel, tok: CaptionTokenizer, extra: dict | None = None) -> None:
    """``tokenizer.json``, ``model.safetensors``, then ``config.json`` (last: its presence marks completion)."""
    folder = Path(folder)
    write_text(folder / "tokenizer.json", tok.to_json())
    save_tensors(folder / "model.safetensors", model.state_dict(), {"kind": "distillset-clip"})
    write_json(folder / "config.json", {"spec": asdict(model.spec), "tokenizer_sha256": tok.sha256(),
                                        **(extra or {})})


def load_clip(folder: str | Path, device: torch.device | str = "cpu") -> tuple[ClipModel, CaptionTokenizer, dict]:
    """A saved model in eval mode, its tokenizer and its config.json (checked against each other)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise DistillError(f"{folder} holds no config.json; train a model with `distillset vl train --out {folder}`.")
    meta = read_json(folder / "config.json")
    try:
        spec = ClipSpec(**meta["spec"])
    except (KeyError, TypeError) as e:
        raise DistillError(f"{folder}/config.json is not a distillset CLIP config ({e}).") from None
    tok = CaptionTokenizer.load(folder / "tokenizer.json", spec.context_length)
    if tok.sha256() != meta.get("tokenizer_sha256") or tok.vocab_size != spec.vocab_size:
        raise DistillError(f"{folder}/tokenizer.json is not the tokenizer this model was trained with (vocab "
                           f"{tok.vocab_size} vs {spec.vocab_size}); put the model's own tokenizer.json back.")
    model = ClipModel(spec)
    load_state(model, load_tensors(folder / "model.safetensors"), str(folder / "model.safetensors"))
    return model.to(device).eval(), tok, meta


def load_state(module: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict state-dict load with a one-line error for shape or key mismatches."""
    from distillset.squeeze.checkpoint import _load_strict

    _load_strict(module, sd, where)


def load_image_weights(model: ClipModel, path: str) -> None:
    """Local pretrained weights of the image backbone (safetensors or a PyTorch state dict; classifier keys of the
    checkpoint are ignored, the tower has none)."""
    from distillset.squeeze.checkpoint import _read_state_dict

    sd = _read_state_dict(Path(path))
    own = model.visual.backbone.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(("classifier", "fc.", "head"))}
    load_state(model.visual.backbone, sd, path)


# ------------------------------------------------------------------------------------------------------- features


@torch.no_grad()
def encode_images(model: ClipModel, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Pre-projection features of uint8 images ``(N, C, H, W)`` (eval mode, no gradient)."""
    dev = next(model.parameters()).device
    out = [model.image_features(images[i:i + batch].to(dev).float() / 255) for i in range(0, len(images), batch)]
    return torch.cat(out).cpu()


@torch.no_grad()
def encode_texts(model: ClipModel, tok: CaptionTokenizer, texts: list[str], batch: int = 512) -> torch.Tensor:
    """Pre-projection text embeddings of captions (eval mode, no gradient)."""
    dev = next(model.parameters()).device
    out = [model.text_features(tok.encode(texts[i:i + batch]).to(dev)) for i in range(0, len(texts), batch)]
    return torch.cat(out).cpu()


def check_text_width(emb: torch.Tensor, width: int, where: str) -> None:
    """One-line error when text embeddings do not live in the model's text space."""
    if emb.ndim != 2 or emb.shape[1] != width:
        raise DistillError(f"{where}: text embeddings have shape {tuple(emb.shape)} but the text encoder's width is "
                           f"{width}; distil with (or evaluate on) the model whose text tower made them.")


# ---------------------------------------------------------------------------------------------------- training


def contrastive_loss(zi: torch.Tensor, zt: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """open_clip's symmetric InfoNCE over a batch of matching pairs."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(zi, zt, scale)


def train_clip(model: ClipModel, tok: CaptionTokenizer, images: torch.Tensor, captions: list[list[str]],
               epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
               show: bool = False) -> list[float]:
    """Train every part of the model on the pairs (a random caption of each image per step, random flips);
    returns the mean loss of each epoch."""
    from distillset.core.runtime import progress

    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(images)
    steps = max(1, n // batch_size)  # drop the last partial batch: a 3-pair batch gives a noisy contrastive loss
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    ids_all = [tok.encode(c) for c in captions]  # tokenise once
    losses = []
    bar = progress(total=total, desc="clip", enabled=show)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        run = 0.0
        for s in range(steps):
            j = perm[s * batch_size:(s + 1) * batch_size]
            pick = [int(torch.randint(len(captions[int(i)]), (1,), generator=g)) for i in j]
            ids = torch.stack([ids_all[int(i)][k] for i, k in zip(j, pick)]).to(dev)
            x = images[j].to(dev).float() / 255
            flip = torch.rand(len(j), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1).to(dev), x.flip(-1), x)
            zi, zt = model(x, ids)
            loss = contrastive_loss(zi, zt, model.logit_scale.exp().clamp(max=100))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach())
            bar.update(1)
        if not math.isfinite(run):
            raise DistillError("the contrastive loss became NaN/inf; lower --lr.")
        losses.append(run / steps)
    bar.close()
    model.eval()
    return losses


def spec_to_json(spec: ClipSpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)
