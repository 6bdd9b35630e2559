"""Expert trajectories of the projection heads of a frozen contrastive model (Wu et al.'s experts, on two towers).

Each expert is a fresh :class:`~distillset.squeeze.clip.Heads` (or LoRA heads on the model's own projections)
trained with plain SGD on cached real features: the frozen image tower's features of the training images and the
frozen text tower's embeddings of their captions (a random one of each image's captions per step). Its flattened
parameters are recorded at initialisation and after every epoch, stored exactly as the MTT experts are
(``replay_buffer_{k}.safetensors`` with one ``(epochs + 1, P)`` tensor ``trajectory`` and the metadata
:func:`~distillset.squeeze.trajectories.load_buffers` reads), with ``arch = "clip_heads"`` and the head sizes in
``model_kwargs``.
"""

from __future__ import annotations

import json
import logging
import math

import torch
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.io import save_tensors
from distillset.core.partition import mix_seed
from distillset.squeeze.clip import Heads, contrastive_loss
from distillset.squeeze.trajectories import ExpertBuffers, FlatModel

log = logging.getLogger("distillset.squeeze")

HEADS_ARCH = "clip_heads"


def make_heads(kwargs: dict, base: Heads | None, seed: int) -> Heads:
    """Fresh heads of the sizes in ``kwargs`` (``image_dim, text_dim, embed_dim, rank``), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Heads(kwargs["image_dim"], kwargs["text_dim"], kwargs["embed_dim"], kwargs.get("rank", 0), base)


def side_masks(heads: Heads) -> dict[str, torch.Tensor]:
    """Boolean masks over the flat parameter vector: which entries belong to the image and to the text head."""
    flat = FlatModel(heads)
    sides = torch.cat([torch.full((n,), heads.side_of(name) == "image") for name, n in zip(flat.names, flat.numels)])
    return {"image": sides, "text": ~sides}


def sample_captions(text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random caption embedding per image of ``text`` ``(N, K, W)``."""
    k = torch.randint(text.shape[1], (text.shape[0],), generator=generator)
    return text[torch.arange(text.shape[0]), k]


def train_heads(heads: nn.Module, image_feats: torch.Tensor, text_feats: torch.Tensor, steps: int, batch_size: int,
                lr: float, scale: float, seed: int, momentum: float = 0.0, snapshot_every: int = 0) -> list[torch.Tensor]:
    """SGD on the contrastive loss of pairs ``(image_feats[i], text_feats[i])`` (``text_feats`` may be ``(N, K, W)``:
    a random caption per step). Returns the flat parameters at the start and every ``snapshot_every`` steps."""
    g = torch.Generator().manual_seed(seed)
    flat = FlatModel(heads)
    opt = torch.optim.SGD([p for p in heads.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    n = image_feats.shape[0]
    bs = min(batch_size, n)
    snaps = [flat.flatten().cpu()]
    perm, pos = torch.randperm(n, generator=g), 0
    for s in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        j = perm[pos:pos + bs]
        pos += bs
        t = text_feats[j] if text_feats.ndim == 2 else sample_captions(text_feats[j], g)
        zi, zt = heads((image_feats[j], t))
        loss = contrastive_loss(zi, zt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if snapshot_every and (s + 1) % snapshot_every == 0:
            snaps.append(flat.flatten().cpu())
    if not math.isfinite(float(loss.detach())):
        raise DistillError("the heads' contrastive loss became NaN/inf; lower the head learning rate.")
    return snaps


def record_expert(k: int, path, image_feats: torch.Tensor, text_feats: torch.Tensor, kwargs: dict,
                  base: Heads | None, epochs: int, batch_size: int, lr: float, scale: float, seed: int,
                  meta: dict) -> None:
    """Train expert ``k`` for ``epochs`` (one snapshot per epoch) and write its replay buffer atomically."""
    s = mix_seed(seed, 11, k)
    heads = make_heads(kwargs, base, s)
    per_epoch = max(1, image_feats.shape[0] // min(batch_size, image_feats.shape[0]))
    snaps = train_heads(heads, image_feats, text_feats, epochs * per_epoch, batch_size, lr, scale, s,
                        snapshot_every=per_epoch)
    traj = torch.stack(snaps)
    save_tensors(path, {"trajectory": traj}, {
        "arch": HEADS_ARCH, "model_kwargs": json.dumps(kwargs), "num_params": json.dumps(int(traj.shape[1])),
        "epochs": json.dumps(epochs), "lr": json.dumps(lr), "momentum": json.dumps(0.0), "num_classes": "0",
        **{k2: (v if isinstance(v, str) else json.dumps(v)) for k2, v in meta.items()}})


def check_experts(ex: ExpertBuffers, heads: Heads) -> None:
    """One-line error when buffers were not recorded for these heads."""
    if ex.meta["arch"] != HEADS_ARCH:
        raise DistillError(f"expert buffers in {ex.paths[0].parent} record {ex.meta['arch']}, not the projection heads "
                           "of a contrastive model; record them with `distillset vl train`.")
    p = sum(q.numel() for q in heads.parameters() if q.requires_grad)
    if ex.num_params != p:
        raise DistillError(f"expert buffers in {ex.paths[0].parent} hold {ex.num_params} parameters but these heads "
                           f"have {p}; record the experts with this model (distillset vl train).")
