"""DATM (Guo et al. 2024, "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching").

Trajectory matching (:class:`recover.objectives.mtt.MTT`, TESLA and the FTD/AST options included) with two changes:

* **Difficulty-aligned window.** Start epochs are drawn from ``[min_start_epoch, upper)`` where ``upper`` grows
  linearly from ``current_max_start_epoch`` to ``max_start_epoch`` over the first ``expansion_end`` fraction of the
  run (DATM's sequential generation). Small IPC wants early (easy) expert epochs, large IPC later (hard) ones: the
  recipes set the window per IPC as the paper does.
* **Learnable soft labels.** Every synthetic image gets a learnable logit vector, initialised from an expert's logits
  on the image (the expert at ``label_epoch``, default ``max_start_epoch``); the student's inner loss is the soft
  cross-entropy to ``softmax(logits)``. With pixels initialised from real images, an image the expert misclassifies
  is first replaced by a real image of its class that the expert classifies correctly (as DATM keeps only correctly
  classified initial images), so no label starts out contradicting its class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Parametrization, register_objective
from distillset.recover.objectives.mtt import MTT
from distillset.recover.params import PixelSet

log = logging.getLogger("distillset.recover")


@register_objective("datm", paper="Guo et al. 2024, Towards Lossless Dataset Distillation via Difficulty-Aligned "
                    "Trajectory Matching (arXiv:2310.05773)")
class DATM(MTT):
    """MTT with a growing difficulty-aligned start window and learnable soft labels."""

    @dataclass
    class Config(MTT.Config):
        """Options of DATM (besides MTT's).

        Attributes:
            current_max_start_epoch: the window's upper bound at the start of the run (grows to max_start_epoch).
            expansion_end: fraction of the iterations after which the upper bound has reached max_start_epoch.
            lr_y: learning rate of the soft-label logits in the engine's optimiser (0 = labels stay fixed).
            label_epoch: expert epoch whose network initialises the labels (-1 = max_start_epoch).
            replace_misclassified: replace initial real images the expert gets wrong by correct ones (pixel init only).
            candidates: real images examined per replaced image.
        """

        current_max_start_epoch: int = 10
        expansion_end: float = 0.3
        lr_y: float = 2.0
        label_epoch: int = -1
        replace_misclassified: bool = True
        candidates: int = 64

        def __post_init__(self):
            super().__post_init__()
            if not self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch:
                raise DistillError(f"need min_start_epoch < current_max_start_epoch <= max_start_epoch, got "
                                   f"{self.min_start_epoch}, {self.current_max_start_epoch}, {self.max_start_epoch}.")
            if not 0 < self.expansion_end <= 1:
                raise DistillError(f"expansion_end is a fraction of the run in (0, 1], got {self.expansion_end}.")

    needs_real = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        current_max_start_epoch, expansion_end, lr_y = c.current_max_start_epoch, c.expansion_end, c.lr_y
        label_epoch, replace_misclassified, candidates = c.label_epoch, c.replace_misclassified, c.candidates
        self.current_max_start_epoch, self.expansion_end = int(current_max_start_epoch), float(expansion_end)
        self.lr_y, self.label_epoch = float(lr_y), int(label_epoch)
        self.replace_misclassified, self.candidates = replace_misclassified, int(candidates)
        self.soft_labels = nn.Parameter(torch.zeros(0), requires_grad=self.lr_y > 0)
        self._initialised = False

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        # shape known now; values come from the expert at the first loss call (the images exist then)
        self.soft_labels.data = torch.zeros(len(ctx.classes), ctx.num_classes, device=ctx.device)

    def extra_parameters(self) -> list:
        groups = super().extra_parameters()
        if self.lr_y > 0:
            groups.append({"params": [self.soft_labels], "lr": self.lr_y})
        return groups

    def start_window(self, ctx: Context) -> tuple[int, int]:
        lo, hi_cap = super().start_window(ctx)
        grow = min(1.0, ctx.progress / self.expansion_end)
        upper = self.current_max_start_epoch + (self.max_start_epoch - self.current_max_start_epoch) * grow
        return lo, max(lo + 1, min(hi_cap, int(upper)))

    # ------------------------------------------------------------------------------------------------ labels

    def _label_net(self, ctx: Context):
        ep = self.max_start_epoch if self.label_epoch < 0 else self.label_epoch
        ep = min(ep, self.experts.epochs)
        theta = self.experts.trajectories[0][ep].to(ctx.device)
        return lambda x: self.net(theta, self.norm(x))

    @torch.no_grad()
    def _initialise(self, syn: Parametrization, ctx: Context) -> None:
        net = self._label_net(ctx)
        x = syn.render()
        wrong = net(x).argmax(1) != syn.labels
        if self.replace_misclassified and bool(wrong.any()):
            if isinstance(syn, PixelSet) and ctx.real is not None:
                self._replace(syn, torch.nonzero(wrong).flatten(), net, ctx)
            else:
                log.info("datm: %d initial images are misclassified by the expert; kept (only pixel sets initialised "
                         "from real data are replaced)", int(wrong.sum()))
        self.soft_labels.data.copy_(net(syn.render()).float())
        self._initialised = True

    @torch.no_grad()
    def _replace(self, syn: PixelSet, wrong: torch.Tensor, net, ctx: Context) -> None:
        replaced = 0
        for k in wrong.tolist():
            c = int(syn.labels[k])
            cand = ctx.real.indices(c, self.candidates, ctx.generator)
            imgs = ctx.real.get(cand)
            ok = torch.nonzero(net(imgs).argmax(1) == c).flatten()
            if ok.numel():
                img = imgs[ok[0]].to(syn.data.device)
                syn.data[k] = (img - syn.mean[0]) / syn.std[0]
                replaced += 1
        log.info("datm: replaced %d of %d initial images the expert misclassified", replaced, len(wrong))

    def label_source(self, syn: Parametrization) -> torch.Tensor:
        return self.soft_labels

    def inner_loss(self, logits, idx, syn, labels) -> torch.Tensor:
        target = torch.softmax(labels[idx], 1)
        return -(target * F.log_softmax(logits, 1)).sum(1).mean()

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        if not self._initialised:
            self._initialise(syn, ctx)
        out = super().loss(syn, ctx)
        with torch.no_grad():
            agree = (self.soft_labels.argmax(1) == syn.labels).float().mean()
        self._logs["label_agree"] = float(agree)
        return out

    # -------------------------------------------------------------------------------------------- state / output

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "initialised": torch.tensor(int(self._initialised))}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self._initialised = bool(int(state.get("initialised", torch.tensor(0))))

    def final_state(self) -> dict[str, torch.Tensor]:
        """The learned lr and the soft-label logits (one row per image, in the unit's image order)."""
        return {**super().final_state(), "soft_labels": self.soft_labels.detach().float().cpu()}
