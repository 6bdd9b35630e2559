"""Backbones on disk: our checkpoints (``model.safetensors`` + ``config.json``), timm ``local-dir:`` folders and
torchvision state dicts, all loaded offline into a :class:`Teacher` that takes ``[0, 1]`` images.

Specs accepted by :func:`load_teacher`:
    ``PATH``                       a folder written by ``distillset squeeze`` (config.json has ``arch``).
    ``local-dir:PATH``             a timm folder (config.json + model.safetensors), read by timm offline.
    ``tv:ARCH=PATH``               a torchvision state dict (``.pth``/``.safetensors``) for ``torchvision.models.ARCH``.
    ``timm:ARCH=PATH``             a timm state dict for ``timm.create_model(ARCH)``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.io import atomic_path, file_sha256, load_tensors, save_tensors, write_json
from distillset.squeeze.models import IMAGENET_MEAN, IMAGENET_STD, create_model, has_batchnorm

log = logging.getLogger("distillset.squeeze")


@dataclass
class BackboneConfig:
    """What ``config.json`` beside ``model.safetensors`` records (enough to rebuild and normalise the model)."""

    arch: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)
    model_kwargs: dict = field(default_factory=dict)
    source: str = ""
    metrics: dict = field(default_factory=dict)


class Teacher(nn.Module):
    """A trained model that takes ``[0, 1]`` images and normalises them itself.

    ``model`` is the raw network (hooks for BN statistics go there); ``config`` describes it; ``sha256`` identifies
    the weights in manifests.
    """

    def __init__(self, model: nn.Module, config: BackboneConfig, sha256: str = "", path: str = ""):
        super().__init__()
        self.model = model
        self.config = config
        self.sha256 = sha256
        self.path = path
        c = config.in_chans
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)

    @property
    def has_bn(self) -> bool:
        return has_batchnorm(self.model)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    channels_last: bool = False

    def compile(self) -> None:
        """Run the network through ``torch.compile`` from now on (eager again should compiling fail).

        ``model`` stays the raw network: its module names (statistics files, G-VBSM's layers) and the hooks on its
        layers are the compiled forward's too (dynamo traces them).
        """
        from distillset.core.compiling import FallbackCompiled

        self.__dict__["_compiled"] = FallbackCompiled(self.model)  # not a submodule: no second name for the weights

    @property
    def compiled(self) -> bool:
        """Whether the forward runs compiled (False also once compiling failed)."""
        c = self.__dict__.get("_compiled")
        return c is not None and c.compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self.__dict__.get("_compiled")
        if compiled is not None:  # the compiler handles the dtypes (no cached bf16 weights)
            return compiled(x)
        low = _autocast_low_dtype(x.device.type)
        if low is not None:
            weights = self._low_precision_weights(low)
            if weights:
                return torch.func.functional_call(self.model, weights, (x,), strict=False, tie_weights=False)
        return self.model(x)

    def _low_precision_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Conv/linear parameters of a frozen teacher cast to the autocast dtype once, not at every forward.

        Autocast caches casts only for leaf tensors that require grad, so a frozen teacher's weights would be cast
        again in every step. The copies are exactly what autocast would compute (the same round-to-nearest cast) and
        are rebuilt whenever a parameter changes (in-place update or new tensor). BatchNorm parameters stay fp32, as
        autocast leaves them. Empty (no caching) when the teacher is trained or compiled.
        """
        if hasattr(self.model, "_orig_mod"):  # torch.compile'd: leave dtype handling to the compiler
            return {}
        names = []
        for mname, m in self.model.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                for pname, p in m.named_parameters(recurse=False):
                    if p.requires_grad:
                        return {}
                    names.append((f"{mname}.{pname}" if mname else pname, p))
        key = (dtype, tuple((p.data_ptr(), p._version, p.dtype) for _, p in names))
        cache = self.__dict__.get("_low_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, {n: p.detach().to(dtype) if p.is_floating_point() else p for n, p in names})
            self.__dict__["_low_cache"] = cache
        return cache[1]

    def describe(self) -> dict:
        return {"arch": self.config.arch, "path": self.path, "sha256": self.sha256, "num_classes":
                self.config.num_classes, "img_size": self.config.img_size}


def _autocast_low_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type`` (bf16/fp16), or None outside autocast."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def save_backbone(folder: str | Path, model: nn.Module, config: BackboneConfig, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` then ``config.json`` atomically (config last: its presence marks completion)."""
    folder = Path(folder)
    state = {k: v for k, v in model.state_dict().items()}
    save_tensors(folder / "model.safetensors", state, {"arch": config.arch})
    write_json(folder / "config.json", {**asdict(config), **(extra or {})})


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise DistillError(f"checkpoint {path} does not exist; check the path.")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillError(f"cannot read checkpoint {path} ({e}); it is corrupt or not a PyTorch state dict.") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise DistillError(f"{path} does not hold a state dict.")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise DistillError(f"{where}: tensor '{k}' has shape {tuple(v.shape)} in the checkpoint but "
                               f"{tuple(own[k].shape)} in the model; the head size (num_classes) or architecture "
                               "does not match the checkpoint.")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DistillError(f"{where}: checkpoint does not match the architecture (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); check the architecture name.")


def parse_spec(spec: str) -> tuple[str, str, Path]:
    """``(kind, name, path)`` of a teacher spec: ``("own", "", FOLDER)`` for a squeeze folder, ``("local-dir", "",
    FOLDER)``, or ``("external", "tv:ARCH" | "timm:ARCH", FILE)``; the one reading of the spec forms."""
    spec = str(spec)
    if spec.startswith("local-dir:"):
        return "local-dir", "", Path(spec.removeprefix("local-dir:"))
    if spec.startswith(("tv:", "timm:")) and "=" in spec:
        name, _, path = spec.partition("=")
        return "external", name, Path(path)
    return "own", "", Path(spec)


def load_teacher(spec: str, num_classes: int | None = None, device: str | torch.device = "cpu") -> Teacher:
    """Load a trained backbone from local files (never from the network), in eval mode, gradients off."""
    spec = str(spec)
    kind, name, path = parse_spec(spec)
    if kind == "local-dir":
        teacher = _load_timm_local_dir(path, num_classes)
    elif kind == "external":
        teacher = _load_external(name, path, num_classes)
    else:
        teacher = _load_own(path)
    if num_classes is not None and teacher.config.num_classes != num_classes:
        raise DistillError(f"teacher {spec} predicts {teacher.config.num_classes} classes but the data has "
                           f"{num_classes}; use a teacher trained on this data.")
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def _weights_file(spec: str) -> Path | None:
    """The weights file a teacher spec loads (what its recorded sha256 identifies)."""
    kind, _, path = parse_spec(spec)
    if kind == "local-dir":
        return next((p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists()), None)
    return path if kind == "external" else path / "model.safetensors"


def find_moved_teacher(near: Path, sha: str, depth: int = 3) -> Path | None:
    """A ``distillset squeeze`` folder whose weights hash to ``sha``, searched below the parent and grandparent of
    ``near`` (where a moved run tree keeps its teacher beside its distilled sets), at most ``depth`` levels down.
    Matching by content makes this safe: only the very weights the manifest recorded are accepted."""
    near = Path(near).resolve()
    seen: set[Path] = set()
    for root in (near.parent, near.parent.parent):
        if not root.is_dir():
            continue
        for cfg in sorted(root.glob("/".join(["*"] * depth) + "/config.json")) + sorted(
                p for k in range(1, depth) for p in root.glob("/".join(["*"] * k) + "/config.json")):
            model = cfg.parent / "model.safetensors"
            if cfg.parent in seen or not model.is_file():
                continue
            seen.add(cfg.parent)
            if file_sha256(model) == sha:
                return cfg.parent
    return None


def load_recorded_teacher(record: dict, where: str, num_classes: int | None = None,
                          device: str | torch.device = "cpu") -> Teacher:
    """A teacher named by a file (a manifest's or labels.json's ``teachers`` entry), loaded only if its weights
    are the ones recorded.

    A teacher lives outside the folder that names it, so the name alone is not trusted: the weights file must
    exist and hash to the recorded sha256 before anything else is read. A crafted entry can then only point at
    weights whose hash its author already knows, and a teacher retrained in place is never used silently.

    Args:
        record: ``{"path": spec, "sha256": ...}`` as :meth:`Teacher.describe` wrote it.
        where: the file the record was read from (for the error message).
        num_classes: classes the teacher must predict.
        device: where the weights go.
    """
    spec, sha = (record.get("path"), record.get("sha256")) if isinstance(record, dict) else (None, None)
    if not isinstance(spec, str) or not spec or not isinstance(sha, str) or not sha:
        raise DistillError(f"{where} names a teacher without a path and sha256 ({record!r}); pass --teachers PATH.")
    weights = _weights_file(spec)
    if weights is None or not weights.is_file():
        moved = find_moved_teacher(Path(where).parent, sha) if parse_spec(spec)[0] == "own" else None
        if moved is None:
            raise DistillError(f"{where} names teacher {spec}, whose weights are not there (nor, by their sha256, in a "
                               "squeeze folder near it); pass --teachers PATH.")
        log.info("teacher %s named by %s was moved: found by its sha256 at %s", spec, where, moved)
        spec, weights = str(moved), moved / "model.safetensors"
    found = file_sha256(weights)
    if found != sha:
        raise DistillError(f"teacher {spec} named by {where} is not the one recorded there (weights sha256 "
                           f"{sha[:12]} recorded, {found[:12]} found: retrained or replaced); "
                           "pass --teachers PATH to use it anyway.")
    return load_teacher(spec, num_classes, device)


def _load_own(folder: Path) -> Teacher:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise DistillError(f"{folder} is not a distillset checkpoint (no config.json); train one with "
                           "`distillset squeeze` or use local-dir:/tv:ARCH=/timm:ARCH= specs.")
    try:
        raw = json.loads(cfg_path.read_text())
        cfg = BackboneConfig(**{k: raw[k] for k in BackboneConfig.__dataclass_fields__ if k in raw})
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise DistillError(f"{cfg_path} is corrupt ({e}); re-run `distillset squeeze`.") from None
    model = create_model(cfg.arch, cfg.num_classes, cfg.in_chans, cfg.img_size, **cfg.model_kwargs)
    weights = folder / "model.safetensors"
    _load_strict(model, load_tensors(weights), str(weights))
    return Teacher(model, cfg, file_sha256(weights), str(folder))


def _load_external(name: str, path: Path, num_classes: int | None) -> Teacher:
    sd = _read_state_dict(path)
    head = [v for k, v in sd.items() if k.endswith(("fc.weight", "classifier.weight", "head.weight",
                                                         "head.fc.weight", "classifier.1.weight"))]
    n = num_classes or (int(head[-1].shape[0]) if head else 1000)
    model = create_model(name, n, 3, 224)
    _load_strict(model, sd, str(path))
    cfg = BackboneConfig(name, n, 3, 224, list(IMAGENET_MEAN), list(IMAGENET_STD), source=str(path))
    if name.startswith("timm:"):
        import timm.data

        d = timm.data.resolve_model_data_config(model)
        cfg.mean, cfg.std, cfg.img_size = list(d["mean"]), list(d["std"]), int(d["input_size"][-1])
    return Teacher(model, cfg, file_sha256(path), str(path))


def _load_timm_local_dir(folder: Path, num_classes: int | None) -> Teacher:
    import timm
    import timm.data

    if not (folder / "config.json").exists():
        raise DistillError(f"{folder} is not a timm model folder (config.json + model.safetensors).")
    kw = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, **kw)
    except Exception as e:
        raise DistillError(f"timm could not load {folder} ({e}); check config.json and the weights file.") from None
    d = timm.data.resolve_model_data_config(model)
    weights = next((p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.exists()), None)
    cfg = BackboneConfig(f"local-dir:{folder}", model.num_classes, d["input_size"][0], d["input_size"][-1],
                         list(d["mean"]), list(d["std"]), source=str(folder))
    if num_classes is not None and weights is not None:  # timm silently skips a mismatched head: check it ourselves
        sd = _read_state_dict(weights)
        head = model.get_classifier()
        w = sd.get(next((k for k in sd if k.endswith("weight") and sd[k].ndim == 2 and
                         sd[k].shape[1] == getattr(head, "in_features", -1)), ""), None)
        if w is not None and w.shape[0] != num_classes:
            raise DistillError(f"{folder}: the checkpoint head has {w.shape[0]} classes but {num_classes} were asked "
                               "for; use a checkpoint trained on this data.")
    return Teacher(model, cfg, file_sha256(weights) if weights else "", str(folder))


def save_atomic_state(path: Path, obj: dict) -> None:
    """Pickle-free training state (tensors via torch.save of a plain dict) written atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
