"""Bi-trajectory matching (Wu et al., "Vision-Language Dataset Distillation", TMLR'24): MTT on two towers.

The synthetic set is N images (pixels, :class:`PairParams`) and N text embeddings (continuous vectors in the frozen
text tower's output space). A student starts from an expert's heads at a random epoch ``t``, takes ``syn_steps``
SGD steps on the contrastive loss of synthetic pairs (images through the frozen image tower, so the gradient reaches
the pixels; text embeddings straight into the text head) with a learnable step size, and is scored by MTT's
normalised distance on each tower separately:

    L = ||theta_img - theta*_img(t+M)||^2 / ||theta_img(t) - theta*_img(t+M)||^2
      + ||theta_txt - theta*_txt(t+M)||^2 / ||theta_txt(t) - theta*_txt(t+M)||^2

With LoRA heads (``rank > 0`` experts) the matched parameters are the low-rank factors, the paper's LoRA matching.
Each step averages the loss over ``experts_per_step`` (expert, start) draws; in a multi-process run each process
takes its share of the draws and the gradients are summed across processes, so the result does not depend on the
number of processes. The draws come from a generator seeded by (seed, step), the same on every process.

The loop around this loss lives in ``distillset vl distill`` (:mod:`launch.vl`): the recover engine's work units are
classes of labelled images, and a set of image-text pairs has neither classes nor labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed
from distillset.recover.base import Context, Objective, register_objective
from distillset.squeeze.clip import ClipModel, Heads, check_text_width, contrastive_loss
from distillset.squeeze.trajectories import ExpertBuffers, FlatModel
from distillset.squeeze.vl_experts import check_experts, make_heads, side_masks


class PairParams(nn.Module):
    """The learnable synthetic pairs: ``pixels`` ``(N, C, H, W)`` in [0, 1] and ``text`` ``(N, W)`` embeddings."""

    def __init__(self, pixels: torch.Tensor, text: torch.Tensor):
        super().__init__()
        if pixels.shape[0] != text.shape[0]:
            raise DistillError(f"{pixels.shape[0]} synthetic images but {text.shape[0]} text embeddings; a pair set "
                               "needs one embedding per image.")
        self.pixels = nn.Parameter(pixels.detach().clone().float())
        self.text = nn.Parameter(text.detach().clone().float())

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def render(self) -> torch.Tensor:
        return self.pixels

    @torch.no_grad()
    def project_(self) -> None:
        self.pixels.clamp_(0, 1)

    @torch.no_grad()
    def images_uint8(self) -> torch.Tensor:
        return (self.pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@register_objective("bimtt", paper="Wu et al. 2024, Vision-Language Dataset Distillation (TMLR; "
                    "princetonvisualai/multimodal_dataset_distillation)",
                    description="bi-trajectory matching of image and text projection heads (run by `distillset vl "
                    "distill`)")
class BiTrajectoryMatching(Objective):
    """MTT's normalised parameter distance on the image and the text head of a frozen contrastive model."""

    @dataclass
    class Config:
        """Options of bi-trajectory matching.

        Attributes:
            expert_epochs: M, expert epochs between the start and the target.
            syn_steps: N, student SGD steps on synthetic pairs per loss evaluation.
            min_start_epoch: lowest start epoch.
            max_start_epoch: start epochs are drawn from [min_start_epoch, max_start_epoch) (clipped to epochs - M).
            batch_syn: synthetic pairs per student step (0 = all).
            lr_teacher: initial value of the learnable student step size (the experts' lr).
            learn_lr: learn the step size.
            experts_per_step: (expert, start) draws averaged per step (split across processes).
            temperature: fixed softmax temperature of the students' contrastive loss (the experts').
        """

        expert_epochs: int = 2
        syn_steps: int = 20
        min_start_epoch: int = 0
        max_start_epoch: int = 10
        batch_syn: int = 50
        lr_teacher: float = 0.1
        learn_lr: bool = True
        experts_per_step: int = 2
        temperature: float = 0.07

        def __post_init__(self):
            if self.expert_epochs < 1 or self.syn_steps < 1 or self.experts_per_step < 1:
                raise DistillError("expert_epochs, syn_steps and experts_per_step must be >= 1.")
            if not 0 <= self.min_start_epoch < self.max_start_epoch:
                raise DistillError(f"need 0 <= min_start_epoch < max_start_epoch, got {self.min_start_epoch}, "
                                   f"{self.max_start_epoch}.")
            if not 0 < self.temperature <= 10 or self.lr_teacher <= 0:
                raise DistillError("temperature must be in (0, 10] and lr_teacher > 0.")

    joint_classes = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self.syn_lr = nn.Parameter(torch.tensor(float(self.cfg.lr_teacher)), requires_grad=self.cfg.learn_lr)
        self._logs: dict[str, float] = {}

    def setup(self, ctx: Context) -> None:
        raise DistillError("bimtt distils image-text pairs, which the class-based recover engine does not hold; run "
                           "it with `distillset vl distill`.")

    def setup_pairs(self, model: ClipModel, experts: ExpertBuffers, device: torch.device | str) -> None:
        """Bind the frozen model and the head experts (checked against each other)."""
        c = self.cfg
        kw = experts.meta["model_kwargs"]
        if kw["image_dim"] != model.visual.dim or kw["text_dim"] != model.spec.text_width:
            raise DistillError(f"the experts in {experts.paths[0].parent} were recorded on {kw['image_dim']}-d image "
                               f"and {kw['text_dim']}-d text features but the model gives {model.visual.dim} and "
                               f"{model.spec.text_width}; record the experts with this model.")
        if c.expert_epochs + c.min_start_epoch > experts.epochs:
            raise DistillError(f"the experts have {experts.epochs} epochs, fewer than min_start_epoch + expert_epochs "
                               f"= {c.min_start_epoch + c.expert_epochs}; record longer trajectories or lower them.")
        self.model, self.experts = model.eval().requires_grad_(False), experts
        heads = make_heads(kw, model.heads if kw.get("rank", 0) else None, 0).to(device)
        check_experts(experts, heads)
        self.heads = FlatModel(heads)
        self.masks = {k: v.to(device) for k, v in side_masks(heads).items()}
        self.scale = 1.0 / c.temperature
        self.syn_lr.data = self.syn_lr.data.to(device)
        self.device = device

    def extra_parameters(self) -> list:
        return [self.syn_lr] if self.cfg.learn_lr else []

    def draws(self, step: int, seed: int) -> list[tuple[int, int, int]]:
        """``(expert, start epoch, inner seed)`` of every draw of ``step`` (a pure function of seed and step)."""
        c, ex = self.cfg, self.experts
        g = torch.Generator().manual_seed(mix_seed(seed, 17, step))
        hi = max(min(c.max_start_epoch, ex.epochs - c.expert_epochs + 1), c.min_start_epoch + 1)
        out = []
        for d in range(c.experts_per_step):
            e = int(torch.randint(len(ex.trajectories), (1,), generator=g))
            t = int(torch.randint(c.min_start_epoch, hi, (1,), generator=g))
            out.append((e, t, mix_seed(seed, 19, step, d)))
        return out

    def draw_loss(self, image_feats: torch.Tensor, text: torch.Tensor, draw: tuple[int, int, int]) -> torch.Tensor:
        """The bi-trajectory loss of one (expert, start) draw, differentiable in the features, text and step size."""
        c = self.cfg
        e, t, s = draw
        traj = self.experts.trajectories[e]
        theta0, target = traj[t].to(self.device), traj[t + c.expert_epochs].to(self.device)
        n = image_feats.shape[0]
        bs = c.batch_syn or n
        g = torch.Generator().manual_seed(s)
        theta = theta0.clone().requires_grad_(True)
        chunks: list[torch.Tensor] = []
        for _ in range(c.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(n, generator=g).split(bs))
            idx = chunks.pop(0).to(self.device)
            zi, zt = self.heads(theta, (image_feats[idx], text[idx]))
            inner = contrastive_loss(zi, zt, self.scale)
            grad = torch.autograd.grad(inner, theta, create_graph=True)[0]
            theta = theta - self.syn_lr * grad
        loss = theta.new_zeros(())
        for m in self.masks.values():
            start = ((theta0[m] - target[m]) ** 2).sum().clamp_min(1e-12)
            loss = loss + ((theta[m] - target[m]) ** 2).sum() / start
        return loss

    def step_loss(self, syn: PairParams, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This process's share of the step's loss: the sum over its draws divided by all draws (so summing the
        processes' gradients gives the gradient of the mean)."""
        check_text_width(syn.text, self.model.spec.text_width, "synthetic pairs")
        draws = self.draws(step, seed)
        mine = draws[rank::world]
        if not mine:
            return (syn.pixels.sum() + syn.text.sum() + self.syn_lr) * 0.0
        image_feats = self.model.image_features(syn.render())
        losses = [self.draw_loss(image_feats, syn.text, d) for d in mine]
        total = torch.stack(losses).sum() / len(draws)
        self._logs = {"match": float(total.detach()) * len(draws) / len(mine), "syn_lr": float(self.syn_lr.detach())}
        return total

    def final_state(self) -> dict[str, torch.Tensor]:
        return {"lr": self.syn_lr.detach().reshape(1).float().cpu()}

    def logs(self) -> dict[str, float]:
        return dict(self._logs)


def frozen_heads_dims(model: ClipModel) -> dict:
    """The head sizes of ``model`` as experts record them (``rank`` added by the caller)."""
    return {"image_dim": model.visual.dim, "text_dim": model.spec.text_width, "embed_dim": model.spec.embed_dim}


__all__ = ["BiTrajectoryMatching", "Heads", "PairParams", "frozen_heads_dims"]
