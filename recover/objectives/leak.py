"""Gradient leakage as objectives of the engine: DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020).

A client that shares the gradient of its loss on a private batch (federated SGD) shares the batch: dummy images
(and, for DLG, dummy soft labels) are optimised until the gradient they produce on the same model matches the
captured one. It is gradient matching against one fixed gradient, DC's mathematics with the real batch replaced
by the captured gradient, so both methods reuse :func:`distillset.recover.objectives.dc.gradient_distance` (DLG's
distance ``||grad' - grad||^2`` summed over every parameter tensor is its ``mse`` metric).

* ``dlg``: images and label logits are learned together; the dummy loss is the cross-entropy of the model's output
  against ``softmax(logits)`` (a soft label per image, mean over the batch).
* ``idlg``: the labels are read from the last layer's gradient first (:func:`idlg_labels`), then only the images
  are learned, against those hard labels.

The captured gradient lives in a *gradient file* (safetensors, :func:`save_gradient` / :func:`load_gradient`): one
tensor per model parameter, named as ``model.named_parameters()``, and metadata naming the architecture, the batch
size, the loss and the sha256 of the shared model's weights. The attacker knows the shared model: the run's teacher
is that model, and a gradient file whose tensors do not fit its parameters (another architecture) or whose weights
hash differs is refused in one line before any work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.io import save_tensors
from distillset.recover.base import Context, Objective, Parametrization, register_objective
from distillset.recover.objectives.dc import gradient_distance

GRADIENT_FORMAT = "distillset-gradient/1"
META_KEY = "distillset"  # safetensors metadata is str -> str: the record is one JSON string under this key


# ------------------------------------------------------------------------------------------------ the gradient file


def model_gradients(teacher: nn.Module, images: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor],
                    create_graph: bool = False) -> dict[str, torch.Tensor]:
    """Gradients of ``loss_of(teacher(images))`` with respect to every parameter of ``teacher.model``, by name.

    The victim's capture and the attacker's dummy gradients both come from here, so they are computed the same way.
    The teacher itself is left frozen: the parameters are swapped for leaf copies that require grad
    (``torch.func.functional_call``), so nothing of the shared model is modified.

    Args:
        teacher: a :class:`distillset.squeeze.checkpoint.Teacher` (takes ``[0, 1]`` images, normalises itself).
        images: ``(B, C, H, W)`` in ``[0, 1]``.
        loss_of: the scalar loss of the logits.
        create_graph: keep the graph (the attacker differentiates the gradient distance).
    """
    leaves = {name: p.detach().requires_grad_(True) for name, p in teacher.model.named_parameters()}
    logits = torch.func.functional_call(teacher, {f"model.{n}": v for n, v in leaves.items()}, (images,),
                                        strict=False)
    grads = torch.autograd.grad(loss_of(logits.float()), list(leaves.values()), create_graph=create_graph)
    return dict(zip(leaves, grads))


def capture_gradient(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a client shares: the gradient of the mean cross-entropy of its batch (``images`` in ``[0, 1]``)."""
    grads = model_gradients(teacher, images, lambda out: F.cross_entropy(out, labels))
    return {n: g.detach() for n, g in grads.items()}


def save_gradient(path: str | Path, grads: dict[str, torch.Tensor], *, teacher, batch_size: int,
                  model: str = "", extra: dict | None = None) -> None:
    """Write a gradient file atomically: the tensors and the record that lets an attacker (and a check) use it.

    Args:
        path: the ``.safetensors`` file to write.
        grads: parameter name -> gradient, as :func:`capture_gradient` returns.
        teacher: the shared model the gradient was computed on (its architecture and weights hash are recorded).
        batch_size: images behind the gradient.
        model: where the shared model lies, relative to the file's folder ("" if the reader must be told).
        extra: more JSON-able facts to record (e.g. the source of the images).
    """
    c = teacher.config
    meta = {"format": GRADIENT_FORMAT, "arch": c.arch, "model_kwargs": c.model_kwargs, "num_classes": c.num_classes,
            "image_shape": [c.in_chans, c.img_size, c.img_size], "batch_size": int(batch_size),
            "loss": "cross_entropy (mean over the batch)", "weights_sha256": teacher.sha256, "model": model,
            "parameters": {n: list(g.shape) for n, g in grads.items()}, **(extra or {})}
    save_tensors(path, grads, {META_KEY: json.dumps(meta, sort_keys=True)})


@dataclass
class CapturedGradient:
    """A gradient file read back: ``grads`` by parameter name, and its record."""

    path: Path
    grads: dict[str, torch.Tensor]
    meta: dict

    @property
    def batch_size(self) -> int:
        return int(self.meta["batch_size"])

    def check_model(self, teacher) -> None:
        """Refuse, in one line, a shared model the gradient cannot have come from: other parameter names or shapes
        (another architecture, head or width), or other weights than the recorded hash."""
        own = {n: tuple(p.shape) for n, p in teacher.model.named_parameters()}
        theirs = {n: tuple(g.shape) for n, g in self.grads.items()}
        c = teacher.config
        arch = f"{self.meta.get('arch', '?')} for {'x'.join(map(str, self.meta.get('image_shape', ['?'])))} images"
        mine = f"{c.arch} for {c.in_chans}x{c.img_size}x{c.img_size} images"
        if own != theirs:
            diff = sorted(set(own) ^ set(theirs)) or sorted(n for n in own if own[n] != theirs[n])
            name = diff[0]
            raise DistillError(f"{self.path} holds the gradient of a {arch} ({len(theirs)} tensors) but the model is a "
                               f"{mine} ({len(own)} tensors; '{name}' is {theirs.get(name, 'absent')} in the file, "
                               f"{own.get(name, 'absent')} in the model): pass the model the gradient was computed "
                               "on (--model).")
        sha = self.meta.get("weights_sha256")
        if sha and teacher.sha256 and sha != teacher.sha256:
            raise DistillError(f"{self.path} was computed on other weights of {arch} (sha256 {sha[:12]}) than the "
                               f"model given ({teacher.sha256[:12]}): pass the model the gradient was computed on "
                               "(--model).")

    def ordered(self, teacher, device) -> list[torch.Tensor]:
        """The gradient tensors in the order of ``teacher.model.named_parameters()``, on ``device``."""
        return [self.grads[n].to(device).float() for n, _ in teacher.model.named_parameters()]


def load_gradient(path: str | Path) -> CapturedGradient:
    """Read a gradient file (one-line errors for a missing, corrupt or foreign file)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"gradient file {path} does not exist; capture one with `distillset attack leak --data "
                           "SPEC` (it writes trials/NNN/gradient.safetensors).")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            grads = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (a safetensors handle, not a dict)
    except Exception as e:  # noqa: BLE001  (safetensors raises several types for truncated or foreign files)
        raise DistillError(f"{path} is not a readable safetensors file ({e}); it is corrupt or truncated.") from None
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != GRADIENT_FORMAT or "batch_size" not in meta:
        raise DistillError(f"{path} is not a distillset gradient file (no '{META_KEY}' record of format "
                           f"{GRADIENT_FORMAT}); capture one with `distillset attack leak`.")
    return CapturedGradient(path, grads, meta)


# --------------------------------------------------------------------------------------------------- the label rule


def last_layer(teacher) -> tuple[str, str | None]:
    """Names of the classifier's weight and bias (``None`` without bias): the last 2-D parameter with one row per
    class, and the bias beside it."""
    params = dict(teacher.model.named_parameters())
    k = teacher.config.num_classes
    weights = [n for n, p in params.items() if p.ndim == 2 and p.shape[0] == k]
    if not weights:
        raise DistillError(f"{teacher.config.arch} has no linear layer with one row per class ({k}); the iDLG label "
                           "rule reads the last layer's gradient: use dlg.")
    w = weights[-1]
    b = w.removesuffix("weight") + "bias"
    return w, b if b in params and params[b].shape == (k,) else None


def idlg_labels(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch_size: int,
                mean_probs: torch.Tensor | None = None) -> torch.Tensor:
    """The labels behind a cross-entropy gradient, read from the last linear layer (iDLG).

    For one image, the gradient of the loss with respect to logit ``i`` is ``p_i - y_i``: negative for the true
    class only. The bias gradient is exactly that vector; the weight gradient's row ``i`` is it times the layer's
    input, whose entries are non-negative after a sigmoid or ReLU, so the row sums have the same signs. The label
    is the class with the negative entry (iDLG's rule; it holds for any weights).

    For a batch (mean loss over ``B`` images) the bias gradient is ``mean_n p_n - counts / B``, so the number of
    images of each class is ``B * (mean_probs - bias_grad)``; ``mean_probs``, the model's mean prediction on the
    unknown batch, is estimated by the caller (here: on random images, as LLG+ does with dummy inputs). The counts
    are rounded to sum to ``B`` and every class with a negative entry keeps at least one image (it must be present:
    probabilities are non-negative). Without a bias, the ``B`` most negative rows are taken (distinct labels
    assumed). This extension is not exact: report the label accuracy it reaches.

    Returns:
        ``(B,)`` long labels, sorted.
    """
    signal = (bias_grad if bias_grad is not None else weight_grad.sum(1)).double()
    if batch_size == 1:
        return signal.argmin().view(1)
    if bias_grad is None or mean_probs is None:
        return torch.sort(torch.topk(-signal, min(batch_size, signal.numel())).indices).values
    want = (batch_size * (mean_probs.double().to(signal.device) - signal)).clamp(min=0)
    floor = (signal < 0).double()  # present classes keep at least one image (at most B are negative, exactly)
    if floor.sum() > batch_size:  # only through rounding noise: keep the B most negative
        floor = torch.zeros_like(floor).index_fill_(0, torch.topk(-signal, batch_size).indices, 1.0)
    counts = torch.maximum(want.round(), floor)
    while counts.sum() > batch_size:  # take from the class rounded up most (never below its floor)
        excess = torch.where(counts > floor, counts - want, torch.full_like(want, -math.inf))
        counts[excess.argmax()] -= 1
    while counts.sum() < batch_size:  # give to the class rounded down most
        counts[(want - counts).argmax()] += 1
    return torch.repeat_interleave(torch.arange(signal.numel(), device=signal.device), counts.long())


# ------------------------------------------------------------------------------------------------------ objectives


class _GradientLeak(Objective):
    """Match the gradient of the dummy batch on the shared model (the run's teacher) to a captured gradient."""

    @dataclass
    class Config:
        """Options of the gradient-leakage objectives.

        Attributes:
            gradient: the gradient file to invert (``distillset attack leak`` writes trials/NNN/gradient.safetensors).
            metric: gradient distance: mse (DLG's squared L2 summed over every parameter tensor), cos (one cosine
                over all tensors, as inverting-gradients attacks use) or ours (DC's layer-wise 1 - cosine).
        """

        gradient: str = ""
        metric: str = "mse"

        def __post_init__(self):
            if not self.gradient:
                raise DistillError("gradient leakage needs options.gradient: a gradient file (`distillset attack leak` "
                                   "captures one and runs the attack).")
            gradient_distance([torch.ones(1, 1)], [torch.ones(1, 1)], self.metric)  # validates the name

    needs_teacher = True
    joint_classes = True  # the batch is one unit: its images share one gradient

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self.captured: CapturedGradient | None = None
        self._logs: dict[str, float] = {}
        self._final: torch.Tensor | None = None

    def setup(self, ctx: Context) -> None:
        self.teacher = ctx.teachers[0]
        self.captured = load_gradient(self.cfg.gradient)
        self.captured.check_model(self.teacher)
        if len(ctx.classes) != self.captured.batch_size:
            raise DistillError(f"{self.cfg.gradient} is the gradient of {self.captured.batch_size} image(s) but the "
                               f"work unit has {len(ctx.classes)}; run the attack with `distillset attack leak "
                               "--gradient FILE` (it sizes the unit to the batch).")
        self.target = self.captured.ordered(self.teacher, ctx.device)
        self.prepare_labels(ctx)

    def prepare_labels(self, ctx: Context) -> None:
        """Set up what the dummy loss needs besides the images (learned logits or the read labels)."""
        raise NotImplementedError

    def dummy_loss(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def labels(self) -> torch.Tensor:
        """The recovered label of every dummy image, ``(B,)`` long."""
        raise NotImplementedError

    def distance(self, images: torch.Tensor) -> torch.Tensor:
        """The gradient distance of ``images`` (differentiable) to the captured gradient."""
        grads = model_gradients(self.teacher, images, self.dummy_loss, create_graph=True)
        return gradient_distance(self.target, list(grads.values()), self.cfg.metric)

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        d = self.distance(syn.render())
        self._logs = {"grad_distance": float(d.detach())}
        return d

    def finalize(self, syn: Parametrization) -> None:
        # the distance of the images as written: L-BFGS's last move is not always followed by an evaluation
        with torch.enable_grad():
            self._final = self.distance(syn.render().detach().clamp(0, 1)).detach()

    def final_state(self) -> dict[str, torch.Tensor]:
        out = {"labels": self.labels().detach().cpu()}
        if self._final is not None:
            out["grad_distance"] = self._final.cpu().view(1)
        return out

    def logs(self) -> dict[str, float]:
        return dict(self._logs)


@register_objective("dlg", paper="Zhu et al. 2019, Deep Leakage from Gradients (NeurIPS, arXiv:1906.08935)",
                    description="gradient leakage: dummy images and soft labels whose gradient matches a captured one")
class DLG(_GradientLeak):
    """DLG: the images and one label logit vector per image are optimised together (L-BFGS in the paper); the
    dummy loss is the cross-entropy against ``softmax(logits)``. The logits start as standard normal draws from the
    unit's generator and are the objective's extra parameters, so the engine's optimiser moves them with the
    images and its checkpoints keep them."""

    def prepare_labels(self, ctx: Context) -> None:
        self.logits = nn.Parameter(ctx.randn(len(ctx.classes), ctx.num_classes))

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.logits]

    def dummy_loss(self, logits: torch.Tensor) -> torch.Tensor:
        return -(F.softmax(self.logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean()

    def labels(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    def final_state(self) -> dict[str, torch.Tensor]:
        return {**super().final_state(), "label_logits": self.logits.detach().cpu()}


@register_objective("idlg", paper="Zhao et al. 2020, iDLG: Improved Deep Leakage from Gradients (arXiv:2001.02610)",
                    description="gradient leakage: the label read from the last layer's gradient, then the images")
class IDLG(_GradientLeak):
    """iDLG: the labels are read analytically from the last layer's gradient (:func:`idlg_labels`: exact for one
    image; an estimate of the class counts for a batch), then only the images are optimised against them."""

    def prepare_labels(self, ctx: Context) -> None:
        w, b = last_layer(self.teacher)
        g = self.captured.grads
        n = self.captured.batch_size
        mean_probs = None
        if n > 1:  # the unknown batch's mean prediction, estimated on random images from the unit's generator
            with torch.no_grad():
                mean_probs = F.softmax(self.teacher(ctx.rand(64, *ctx.image_shape)).float(), -1).mean(0)
        self._labels = idlg_labels(g[w].to(ctx.device), g[b].to(ctx.device) if b else None, n,
                                   mean_probs).to(ctx.device)

    def dummy_loss(self, logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, self._labels)

    def labels(self) -> torch.Tensor:
        return self._labels
