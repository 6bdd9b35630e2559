"""``distillset vl ...``: vision-language dataset distillation (Wu et al., TMLR'24) on image-caption pairs.

* ``vl train``: a BPE tokenizer and a small CLIP-style model trained on the real pairs (:mod:`squeeze.clip`), cached
  features of both splits under the frozen towers, and expert trajectories of the projection heads
  (:mod:`squeeze.vl_experts`), in ``OUT/clip``, ``OUT/features.safetensors`` and ``OUT/experts``.
* ``vl distill``: N synthetic pairs (pixels + text embeddings) by bi-trajectory matching
  (:mod:`recover.objectives.bimtt`), in ``OUT/pairs.safetensors`` + ``OUT/manifest.json``; ranks split the
  (expert, start) draws of every step and sum their gradients, so 2 processes give the 1-process result.
* ``vl evaluate``: fresh heads trained on the distilled pairs, on random real pairs of the same count, on herding
  and k-center selections in the joint embedding, and on the full data; recall@1/5/10 both ways on the test split
  (:mod:`relabel.retrieval`), several seeds.
* ``vl export``: the pairs as webdataset shards (``KEY.png``, ``KEY.npy`` text embedding, ``KEY.txt`` the nearest
  real caption, ``KEY.json``) or a Hugging Face dataset on disk.

The recover engine is not used for ``vl distill``: its work units are classes of labelled images written as labelled
PNG shards, and a pair set has no classes; the loop here is the engine's plain case (one unit, Adam on the
synthetic tensors, the objective's learnable step size) and the objective holds all the mathematics.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillset.core.config import fingerprint, to_dict, write_config
from distillset.core.errors import DistillError
from distillset.core.io import (
    load_tensors,
    read_json,
    require_folder,
    save_tensors,
    write_csv,
    write_json,
    write_text,
)
from distillset.core.pairs import load_pairs
from distillset.core.partition import mix_seed
from distillset.core.runtime import Runtime, get_runtime

log = logging.getLogger("distillset.vl")

FEATURES = "features.safetensors"
PAIRS = "pairs.safetensors"


# ================================================================================================================ train


@dataclass
class VLTrainConfig:
    """Train the tokenizer, the contrastive model and the head experts on real image-caption pairs.

    Attributes:
        out: output folder (clip/, features.safetensors, experts/, results.json, config.yaml).
        data: image-caption source: npz:PATH (with captions_*), wds:PATH (KEY.png + KEY.txt) or folder:PATH.
        image_size: resolution of the image tower (images are resized to it).
        arch: image backbone: a registry name (convnet, convnet_bn, ...) or timm:NAME (no pretrained download).
        model_kwargs: keyword arguments of the image backbone (e.g. {width: 64}).
        image_weights: a local state dict (safetensors/.pth) of the image backbone to start from ("" = random).
        init: a saved model folder (an earlier OUT/clip) to start from ("" = from scratch).
        tokenizer: a tokenizer.json to reuse ("" = train a BPE tokenizer on the training captions).
        vocab_size: BPE vocabulary size.
        context_length: tokens per caption.
        embed_dim: width of the joint space.
        text_width: width of the text transformer (and of the distilled text embeddings).
        text_layers: text transformer blocks.
        text_heads: text attention heads.
        clip_epochs: epochs of contrastive training of the whole model (0 = keep init as it is).
        clip_batch: pairs per contrastive step.
        clip_lr: AdamW learning rate.
        clip_weight_decay: AdamW weight decay.
        num_experts: head experts to record.
        expert_epochs: epochs per expert (one snapshot per epoch).
        expert_lr: SGD learning rate of the experts' heads.
        expert_batch: pairs per expert step.
        temperature: fixed softmax temperature of the heads' contrastive loss (experts, students, evaluation).
        lora_rank: record LoRA experts of this rank on the model's own projections (0 = full heads from scratch).
        seed: base seed.
        max_train: use only the first N training pairs (0 = all), for debugging.
    """

    out: str = "output/vl"
    data: str = ""
    image_size: int = 32
    arch: str = "convnet"
    model_kwargs: dict = field(default_factory=lambda: {"width": 64})
    image_weights: str = ""
    init: str = ""
    tokenizer: str = ""
    vocab_size: int = 2000
    context_length: int = 32
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    clip_epochs: int = 30
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_weight_decay: float = 0.1
    num_experts: int = 8
    expert_epochs: int = 20
    expert_lr: float = 0.1
    expert_batch: int = 256
    temperature: float = 0.07
    lora_rank: int = 0
    seed: int = 0
    max_train: int = 0

    def __post_init__(self):
        if not self.data:
            raise DistillError("vl train needs --data: an image-caption source (e.g. npz:../shared/data/"
                               "flickr8k_64.npz).")
        if self.image_size < 8:
            raise DistillError(f"image_size must be >= 8, got {self.image_size}.")
        if self.clip_epochs < 0 or self.num_experts < 1 or self.expert_epochs < 2:
            raise DistillError("clip_epochs must be >= 0, num_experts >= 1 and expert_epochs >= 2.")
        if self.clip_batch < 2 or self.expert_batch < 2:
            raise DistillError("clip_batch and expert_batch must be >= 2 (a contrastive batch needs negatives).")
        if self.expert_lr <= 0 or self.clip_lr <= 0 or not 0 < self.temperature <= 10:
            raise DistillError("expert_lr and clip_lr must be > 0, temperature in (0, 10].")
        if self.lora_rank < 0:
            raise DistillError(f"lora_rank must be >= 0, got {self.lora_rank}.")


MODEL_FIELDS = ("data", "image_size", "arch", "model_kwargs", "image_weights", "init", "tokenizer", "vocab_size",
                "context_length", "embed_dim", "text_width", "text_layers", "text_heads", "clip_epochs", "clip_batch",
                "clip_lr", "clip_weight_decay", "seed", "max_train")
EXPERT_FIELDS = ("expert_epochs", "expert_lr", "expert_batch", "temperature", "lora_rank")


def _fp(cfg, names: tuple[str, ...]) -> str:
    import hashlib
    import json

    d = {k: v for k, v in to_dict(cfg).items() if k in names}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _train_pairs(cfg: VLTrainConfig):
    train = load_pairs(cfg.data, "train", cfg.image_size)
    if cfg.max_train:
        train = train.subset(range(min(cfg.max_train, len(train))))
    return train


def _caption_tensor(captions: list[list[str]], emb: torch.Tensor) -> torch.Tensor:
    """Flat caption embeddings as ``(N, K, W)``; images with fewer captions repeat theirs cyclically (none dropped)."""
    k = max(len(c) for c in captions)
    rows, pos = [], 0
    for caps in captions:
        e = emb[pos:pos + len(caps)]
        pos += len(caps)
        rows.append(e[torch.arange(k) % len(caps)])
    return torch.stack(rows)


def _build_model(cfg: VLTrainConfig, train, out: Path):
    from distillset.squeeze.clip import (
        CaptionTokenizer,
        ClipModel,
        ClipSpec,
        load_clip,
        load_image_weights,
        load_state,
        save_clip,
        train_clip,
    )
    from distillset.squeeze.data import channel_stats

    folder = out / "clip"
    fp = _fp(cfg, MODEL_FIELDS)
    if (folder / "config.json").exists() and read_json(folder / "config.json").get("fingerprint") == fp:
        model, tok, meta = load_clip(folder)
        log.info("vl train: model in %s already trained (same config); reusing it", folder)
        return model, tok, meta.get("losses", [])
    texts = [c for caps in train.captions for c in caps]
    if cfg.init:
        base, tok, _ = load_clip(cfg.init)
        tok.check_fits(texts, f"--init {cfg.init}")
        if base.spec.image_size != cfg.image_size:
            raise DistillError(f"--init {cfg.init} takes {base.spec.image_size}px images but --image-size is "
                               f"{cfg.image_size}; use the same size.")
    elif cfg.tokenizer:
        tok = CaptionTokenizer.load(cfg.tokenizer, cfg.context_length)
        tok.check_fits(texts, f"--tokenizer {cfg.tokenizer}")
    else:
        tok = CaptionTokenizer.train(texts, cfg.vocab_size, cfg.context_length)
    mean, std = channel_stats(train.images)
    spec = ClipSpec(arch=cfg.arch, model_kwargs=dict(cfg.model_kwargs), image_size=cfg.image_size,
                    in_chans=train.image_shape[0], embed_dim=cfg.embed_dim, text_width=cfg.text_width,
                    text_layers=cfg.text_layers, text_heads=cfg.text_heads, context_length=cfg.context_length,
                    vocab_size=tok.vocab_size, mean=mean, std=std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(cfg.seed, 3))
        model = ClipModel(spec)
    if cfg.init:
        if base.spec.text_width != spec.text_width or base.visual.dim != model.visual.dim:
            raise DistillError(f"--init {cfg.init} has another architecture (text width {base.spec.text_width}, image "
                               f"features {base.visual.dim}); pass the same model options or drop --init.")
        load_state(model, base.state_dict(), cfg.init)
    if cfg.image_weights:
        load_image_weights(model, cfg.image_weights)
    losses = train_clip(model, tok, train.images, train.captions, cfg.clip_epochs, cfg.clip_batch, cfg.clip_lr,
                        cfg.clip_weight_decay, mix_seed(cfg.seed, 5)) if cfg.clip_epochs else []
    save_clip(folder, model, tok, {"fingerprint": fp, "data": cfg.data, "losses": losses})
    return model, tok, losses


def _features(model, tok, cfg: VLTrainConfig, train, out: Path) -> dict[str, torch.Tensor]:
    from distillset.squeeze.clip import encode_images, encode_texts

    path = out / FEATURES
    fp = read_json(out / "clip" / "config.json")["fingerprint"]
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fp:
                return load_tensors(path)
    test = load_pairs(cfg.data, "test", cfg.image_size)
    feats = {}
    for split, s in (("train", train), ("test", test)):
        texts, owner = s.flat()
        emb = encode_texts(model, tok, texts)
        feats[f"{split}_image"] = encode_images(model, s.images)
        feats[f"{split}_text"] = _caption_tensor(s.captions, emb)
        if split == "test":  # retrieval scores every test caption, once each
            feats["test_text_flat"], feats["test_owner"] = emb, owner
    save_tensors(path, feats, {"fingerprint": fp})
    return feats


def _expert_meta(cfg: VLTrainConfig, model) -> dict:
    return {"fingerprint": _fp(cfg, MODEL_FIELDS + EXPERT_FIELDS), "data": cfg.data,
            "image_shape": [model.spec.in_chans, cfg.image_size, cfg.image_size], "mean": model.spec.mean,
            "std": model.spec.std}


def run_train(cfg: VLTrainConfig, rt: Runtime | None = None) -> dict:
    from distillset.recover.objectives.bimtt import frozen_heads_dims
    from distillset.relabel.retrieval import recall_at_k
    from distillset.squeeze.trajectories import _buffer_meta
    from distillset.squeeze.vl_experts import record_expert

    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    if not rt.is_main:  # one CPU-sized model: the main process trains, the others wait
        rt.wait()
        return read_json(out / "results.json")
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    train = _train_pairs(cfg)
    model, tok, losses = _build_model(cfg, train, out)
    feats = _features(model, tok, cfg, train, out)
    kwargs = {**frozen_heads_dims(model), "rank": cfg.lora_rank}
    meta = _expert_meta(cfg, model)
    base = model.heads if cfg.lora_rank else None
    done = 0
    for k in range(cfg.num_experts):
        path = out / "experts" / f"replay_buffer_{k}.safetensors"
        if path.exists() and _buffer_meta(path).get("fingerprint") == meta["fingerprint"]:
            done += 1
            continue
        record_expert(k, path, feats["train_image"], feats["train_text"], kwargs, base, cfg.expert_epochs,
                      cfg.expert_batch, cfg.expert_lr, 1 / cfg.temperature, cfg.seed, meta)
    with torch.no_grad():  # the pretrained heads themselves, a reference for every number vl evaluate reports
        zi, zt = model.heads((feats["test_image"], feats["test_text_flat"]))
    res = {"clip_losses": losses, "vocab_size": tok.vocab_size, "image_feature_dim": model.visual.dim,
           "train_pairs": len(train), "experts": cfg.num_experts, "experts_reused": done,
           "pretrained_heads_test": recall_at_k(zi, zt, feats["test_owner"])}
    write_json(out / "results.json", res)
    log.info("vl train: %d pairs, %d experts in %s; pretrained heads mean recall %.1f", len(train), cfg.num_experts,
             out / "experts", res["pretrained_heads_test"]["mean_recall"])
    rt.wait()
    return res


def load_trained(folder: str | Path):
    """``(model, tokenizer, features, experts folder)`` of a ``vl train`` output folder."""
    from distillset.squeeze.clip import load_clip

    folder = Path(folder)
    if not (folder / "clip" / "config.json").exists() or not (folder / FEATURES).exists():
        raise DistillError(f"{folder} is not a `distillset vl train` output (no clip/ or {FEATURES}); run vl train "
                           f"--out {folder} first.")
    model, tok, _ = load_clip(folder / "clip")
    return model, tok, load_tensors(folder / FEATURES), folder / "experts"


# ============================================================================================================== distill


@dataclass
class VLDistillConfig:
    """Distil N image-text pairs by bi-trajectory matching.

    Attributes:
        out: output folder (pairs.safetensors, manifest.json, losses.csv, config.yaml).
        model: a `distillset vl train` output folder (model, features, experts).
        pairs: N, synthetic pairs.
        iterations: outer optimisation steps.
        lr_image: learning rate of the pixels ([0, 1] units).
        lr_text: learning rate of the text embeddings.
        lr_lr: learning rate of the student step size.
        optimizer: adam, or sgd (momentum 0.5, as MTT and Wu et al.; its steps are linear in the gradient, so runs
            on different process counts agree to float rounding, where Adam's first steps amplify rounding of
            near-zero gradients to a full +-lr).
        init: real (N random real pairs: an image and one of its captions' embeddings) or noise.
        options: options of the bimtt objective (expert_epochs, syn_steps, max_start_epoch, lr_teacher, ...).
        seed: base seed.
        log_every: log the matching loss every N steps.
    """

    out: str = "output/vl_distill"
    model: str = "output/vl"
    pairs: int = 100
    iterations: int = 200
    lr_image: float = 0.01
    lr_text: float = 0.01
    lr_lr: float = 1e-3
    optimizer: str = "adam"
    init: str = "real"
    options: dict = field(default_factory=dict)
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        from distillset.core.config import from_dict
        from distillset.recover.objectives.bimtt import BiTrajectoryMatching

        if self.pairs < 2:
            raise DistillError(f"pairs must be >= 2 (a contrastive batch needs negatives), got {self.pairs}.")
        if self.iterations < 0 or self.lr_image < 0 or self.lr_text < 0 or self.lr_lr < 0:
            raise DistillError("iterations and the learning rates must be >= 0.")
        if self.optimizer not in ("adam", "sgd"):
            raise DistillError(f"unknown optimizer '{self.optimizer}'; use adam or sgd.")
        if self.init not in ("real", "noise"):
            raise DistillError(f"unknown init '{self.init}'; use real or noise.")
        from_dict(BiTrajectoryMatching.Config, self.options, what="objective 'bimtt'")


def init_pairs(cfg: VLDistillConfig, model, feats: dict, train_images: torch.Tensor):
    """Initial pixels and text embeddings, and the real pair each started from (``-1`` for noise)."""
    n_train = feats["train_image"].shape[0]
    if cfg.pairs > n_train:
        raise DistillError(f"{cfg.pairs} pairs asked but the training split has {n_train} images; lower --pairs.")
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, 31))
    idx = torch.randperm(n_train, generator=g)[:cfg.pairs]
    cap = torch.randint(feats["train_text"].shape[1], (cfg.pairs,), generator=g)
    if cfg.init == "real":
        pixels = train_images[idx].float() / 255
        text = feats["train_text"][idx, cap]
        return pixels, text, idx, cap
    c, s = model.spec.in_chans, model.spec.image_size
    pixels = torch.rand(cfg.pairs, c, s, s, generator=g)
    text = torch.randn(cfg.pairs, model.spec.text_width, generator=g) * feats["train_text"].std()
    return pixels, text, torch.full((cfg.pairs,), -1), torch.full((cfg.pairs,), -1)


def run_distill(cfg: VLDistillConfig, rt: Runtime | None = None) -> dict:
    from distillset.core.config import from_dict
    from distillset.recover.objectives.bimtt import BiTrajectoryMatching, PairParams
    from distillset.squeeze.trajectories import load_buffers

    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    model_config = Path(cfg.model) / "clip" / "config.json"
    # the model's own fingerprint too: a model folder retrained in place must not pass for the one distilled with
    fp = fingerprint(cfg, ("out", "log_every")) + ":" + str(read_json(model_config).get("fingerprint") if
                                                            model_config.exists() else None)
    if (out / "manifest.json").exists() and (out / PAIRS).exists():
        old = read_json(out / "manifest.json")
        if old.get("fingerprint") == fp:
            log.info("vl distill: %s is finished (same config); skipping", out)
            return old["metrics"]
        raise DistillError(f"{out} holds pairs distilled with another config; choose another --out or delete it.")
    model, _, feats, experts_dir = load_trained(cfg.model)
    train_images = load_pairs(read_json(model_config)["data"], "train",
                              model.spec.image_size).images[:feats["train_image"].shape[0]]
    objective = BiTrajectoryMatching(from_dict(BiTrajectoryMatching.Config, cfg.options, what="objective 'bimtt'"))
    objective.setup_pairs(model.to(rt.device), load_buffers(experts_dir), rt.device)
    pixels, text, idx, cap = init_pairs(cfg, model, feats, train_images)
    syn = PairParams(pixels, text).to(rt.device)
    groups = [{"params": [syn.pixels], "lr": cfg.lr_image}, {"params": [syn.text], "lr": cfg.lr_text}]
    groups += [{"params": objective.extra_parameters(), "lr": cfg.lr_lr}] if objective.extra_parameters() else []
    opt = torch.optim.Adam(groups) if cfg.optimizer == "adam" else torch.optim.SGD(groups, momentum=0.5)
    params = [p for gr in groups for p in gr["params"]]
    rows = []
    for step in range(cfg.iterations):
        loss = objective.step_loss(syn, step, cfg.seed, rt.rank, rt.world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if rt.world > 1:  # every rank took its share of the draws: the gradient of the mean is the sum
            import torch.distributed as dist

            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            grads = [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]
            total = torch.tensor([float(loss.detach())], device=rt.device)
            dist.all_reduce(total)
            value = float(total)
        else:
            value = float(loss.detach())
        for p, g in zip(params, grads):
            p.grad = g
        if not math.isfinite(value):
            raise DistillError(f"vl distill: the matching loss became NaN/inf at step {step}; lower --lr-image, "
                               "--lr-text or the objective's lr_teacher.")
        opt.step()
        syn.project_()
        objective.syn_lr.data.clamp_(min=1e-6)  # a negative step size would walk the student uphill
        rows.append({"step": step, "match": value, "syn_lr": float(objective.syn_lr.detach())})
        if cfg.log_every and step % cfg.log_every == 0:
            log.info("vl distill step %d: match %.4f, lr %.4f", step, value, rows[-1]["syn_lr"])
    metrics = {"first_match": rows[0]["match"] if rows else None, "last_match": rows[-1]["match"] if rows else None,
               "syn_lr": float(objective.syn_lr.detach())}
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, cfg)
        write_csv(out / "losses.csv", rows)
        save_tensors(out / PAIRS, {"images": syn.images_uint8(), "pixels": syn.pixels.detach().cpu(),
                                   "text": syn.text.detach().cpu(), "init_index": idx, "init_caption": cap,
                                   **objective.final_state()})
        write_json(out / "manifest.json", {
            "method": "bimtt", "parametrization": "pixels+text_embeddings", "fingerprint": fp, "config": to_dict(cfg),
            "model": str(Path(cfg.model).resolve()), "pairs": cfg.pairs, "image_shape": list(syn.pixels.shape[1:]),
            "text_width": int(syn.text.shape[1]), "world": rt.world, "metrics": metrics})
    rt.wait()
    return metrics


def load_distilled_pairs(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    if not (folder / "manifest.json").exists() or not (folder / PAIRS).exists():
        raise DistillError(f"{folder} holds no distilled pairs (manifest.json + {PAIRS}); run `distillset vl distill "
                           f"--out {folder}` first.")
    return load_tensors(folder / PAIRS), read_json(folder / "manifest.json")


# ============================================================================================================= evaluate


@dataclass
class VLEvaluateConfig:
    """Retrieval recall of heads trained on distilled pairs beside random, herding, k-center and full real pairs.

    Attributes:
        out: output folder (metrics.json, results.csv, config.yaml).
        model: the `distillset vl train` output folder the pairs were distilled with.
        distilled: distilled-pair folders (`distillset vl distill` outputs) to evaluate.
        baselines: any of random, herding, kcenter (at each distilled set's pair count, or at --pairs) and full.
        pairs: pair counts of the baselines when no distilled set gives them.
        seeds: seeds of the head training (and of the random pairs).
        steps: SGD steps of every head training.
        batch_size: pairs per step (capped at the set size).
        lr: SGD learning rate of the heads.
        temperature: softmax temperature of the heads' contrastive loss.
        rank: LoRA rank of the heads (0 = full heads from a random initialisation).
    """

    out: str = "output/vl_eval"
    model: str = "output/vl"
    distilled: list = field(default_factory=list)
    baselines: list = field(default_factory=lambda: ["random", "herding", "kcenter", "full"])
    pairs: list = field(default_factory=list)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 300
    batch_size: int = 256
    lr: float = 0.1
    temperature: float = 0.07
    rank: int = 0

    def __post_init__(self):
        bad = [b for b in self.baselines if b not in ("random", "herding", "kcenter", "full")]
        if bad:
            raise DistillError(f"unknown baseline '{bad[0]}'; use random, herding, kcenter or full.")
        if not self.seeds:
            raise DistillError("seeds must name at least one seed.")
        if any(int(n) < 2 for n in self.pairs):
            raise DistillError("every pair count must be >= 2.")
        self.head_training()  # its checks, before any work

    def head_training(self):
        """How every set's fresh heads are trained (checked by :class:`~distillset.relabel.retrieval.HeadTraining`)."""
        from distillset.relabel.retrieval import HeadTraining

        return HeadTraining(self.steps, self.batch_size, self.lr, self.temperature, self.rank)


def joint_embedding(model, feats: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every real (image, caption) pair in the pretrained joint space ``[z_img, z_txt]``, with its image and caption
    index (the space herding and k-center select in)."""
    n, k, _ = feats["train_text"].shape
    with torch.no_grad():
        zi, zt = model.heads((feats["train_image"].repeat_interleave(k, 0), feats["train_text"].reshape(n * k, -1)))
    return torch.cat([zi, zt], 1), torch.arange(n).repeat_interleave(k), torch.arange(k).repeat(n)


def select_pairs(kind: str, n: int, seed: int, model, feats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image index, caption index)`` of ``n`` real pairs: random images with a random caption each, or herding /
    k-center over all (image, caption) pairs in the joint embedding (one pair per image kept)."""
    from distillset.recover.objectives.coreset import herding, kcenter

    n_img, k = feats["train_text"].shape[:2]
    if n > n_img:
        raise DistillError(f"{n} pairs asked but the training split has {n_img} images; lower the pair count.")
    g = torch.Generator().manual_seed(mix_seed(seed, 37))
    if kind == "random":
        return torch.randperm(n_img, generator=g)[:n], torch.randint(k, (n,), generator=g)
    joint, img, cap = joint_embedding(model, feats)
    order = (herding if kind == "herding" else kcenter)(joint, min(len(joint), 4 * n))
    seen: dict[int, int] = {}
    for j in order.tolist():  # distinct images: the same count of pictures as every other set
        seen.setdefault(int(img[j]), int(cap[j]))
        if len(seen) == n:
            break
    if len(seen) < n:  # the greedy order revisited images; fill with the rest in selection order of images
        rest = [i for i in torch.randperm(n_img, generator=g).tolist() if i not in seen]
        for i in rest[:n - len(seen)]:
            seen[i] = 0
    keys = list(seen)
    return torch.tensor(keys), torch.tensor([seen[i] for i in keys])


def run_evaluate(cfg: VLEvaluateConfig, rt: Runtime | None = None) -> dict:
    from distillset.relabel.retrieval import evaluate_pairs, summarise
    from distillset.squeeze.clip import check_text_width

    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    if not rt.is_main:
        rt.wait()
        return {}
    model, _, feats, _ = load_trained(cfg.model)
    train = cfg.head_training()
    dims = {"image_dim": model.visual.dim, "text_dim": model.spec.text_width, "embed_dim": model.spec.embed_dim}
    base = model.heads if cfg.rank else None
    test = (feats["test_image"], feats["test_text_flat"], feats["test_owner"])
    seeds = [int(s) for s in cfg.seeds]
    rows, results = [], {}

    def record(name: str, n: int, res: dict) -> None:
        results[name] = res
        rows.append({"set": name, "pairs": n, **{k: v for k, v in res.items() if k != "per_seed"}})
        log.info("vl evaluate %s (%d pairs): mean recall %.2f", name, n, res["mean_recall"])

    counts = list(dict.fromkeys(int(n) for n in cfg.pairs))
    for folder in cfg.distilled:
        t, _ = load_distilled_pairs(folder)
        check_text_width(t["text"], model.spec.text_width, f"distilled pairs in {folder}")
        if tuple(t["images"].shape[1:]) != (model.spec.in_chans, model.spec.image_size, model.spec.image_size):
            raise DistillError(f"{folder} holds {tuple(t['images'].shape[1:])} images but the model takes "
                               f"{model.spec.image_size}px; evaluate with the model the pairs were distilled with.")
        from distillset.squeeze.clip import encode_images

        n = int(t["images"].shape[0])
        counts.append(n)
        record(f"distilled:{Path(folder).name}", n,
               evaluate_pairs(encode_images(model, t["images"]), t["text"], *test, dims, train, seeds, base))
    for n in dict.fromkeys(counts):
        for kind in ("random", "herding", "kcenter"):
            if kind not in cfg.baselines:
                continue
            if kind == "random":  # random pairs are redrawn per seed
                runs = []
                for s in seeds:
                    img, cap = select_pairs(kind, n, s, model, feats)
                    runs += evaluate_pairs(feats["train_image"][img], feats["train_text"][img, cap], *test, dims,
                                           train, [s], base)["per_seed"]
                record(f"{kind}:{n}", n, summarise(runs))
            else:  # a greedy selection is one set (selected once); the seeds vary its heads
                img, cap = select_pairs(kind, n, seeds[0], model, feats)
                record(f"{kind}:{n}", n, evaluate_pairs(feats["train_image"][img], feats["train_text"][img, cap],
                                                        *test, dims, train, seeds, base))
    if "full" in cfg.baselines:
        record("full", int(feats["train_image"].shape[0]),
               evaluate_pairs(feats["train_image"], feats["train_text"], *test, dims, train, seeds, base))
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    write_csv(out / "results.csv", rows, floats=".2f")
    write_json(out / "metrics.json", results)
    rt.wait()
    return results


# =============================================================================================================== export


@dataclass
class VLExportConfig:
    """Export distilled pairs: images, text embeddings and the nearest real caption of each embedding.

    Attributes:
        distilled: a `distillset vl distill` output folder.
        model: the `distillset vl train` folder it was distilled with (for the nearest real captions).
        out: the folder to create (must not exist, unless overwrite).
        format: wds (webdataset shards KEY.png/.npy/.txt/.json + _info.json) or hf (a Hugging Face dataset on disk).
        maxcount: pairs per shard (wds).
        overwrite: replace an existing export folder.
    """

    distilled: str = "output/vl_distill"
    model: str = "output/vl"
    out: str = "output/vl_export"
    format: str = "wds"
    maxcount: int = 1000
    overwrite: bool = False

    def __post_init__(self):
        if self.format not in ("wds", "hf"):
            raise DistillError(f"unknown export format '{self.format}'; use wds or hf.")
        if self.maxcount < 1:
            raise DistillError(f"maxcount must be >= 1, got {self.maxcount}.")


def nearest_captions(text: torch.Tensor, model_folder: str | Path) -> tuple[list[str], torch.Tensor]:
    """The training caption nearest (cosine, in the text tower's space) to each embedding, and its similarity."""
    _, _, feats, _ = load_trained(model_folder)
    data = read_json(Path(model_folder) / "clip" / "config.json")["data"]
    n = feats["train_text"].shape[0]
    captions = load_pairs(data, "train").captions[:n]
    k = feats["train_text"].shape[1]
    bank = F.normalize(feats["train_text"].reshape(n * k, -1), dim=1)
    sim = F.normalize(text, dim=1) @ bank.T
    best = sim.max(1)
    return [captions[int(j) // k][int(j) % len(captions[int(j) // k])] for j in best.indices], best.values


def run_export(cfg: VLExportConfig, rt: Runtime | None = None) -> dict:
    from distillset.core.data import encode_png, write_tar
    from distillset.launch.export import _export_hf_pairs, staged_folder

    rt = rt or get_runtime()
    out = Path(cfg.out)
    if not rt.is_main:
        rt.wait()
        return {}
    t, manifest = load_distilled_pairs(cfg.distilled)
    names, sims = nearest_captions(t["text"], cfg.model)
    n = int(t["images"].shape[0])
    keys = [f"pair_{i:06d}" for i in range(n)]
    with staged_folder(out, cfg.overwrite) as tmp:
        if cfg.format == "wds":
            import json

            files = []
            for k, s in enumerate(range(0, n, cfg.maxcount)):
                rows = []
                for i in range(s, min(n, s + cfg.maxcount)):
                    buf = io.BytesIO()
                    np.save(buf, t["text"][i].numpy().astype(np.float32))
                    rows.append((keys[i], {"png": encode_png(t["images"][i]), "npy": buf.getvalue(),
                                           "txt": names[i].encode(),
                                           "json": json.dumps({"nearest_caption": names[i],
                                                               "nearest_cosine": round(float(sims[i]), 4)}).encode()}))
                files.append(f"train-{k:06d}.tar")
                write_tar(tmp / files[-1], rows)
            write_json(tmp / "_info.json", {"name": "bimtt", "image_shape": manifest["image_shape"],
                                            "text_width": manifest["text_width"],
                                            "splits": {"train": {"name": "train", "num_samples": n,
                                                                 "filenames": files}}})
        else:
            _export_hf_pairs(t["images"], t["text"], names, tmp)
        write_json(tmp / "manifest.json", manifest)
        write_text(tmp / "README.md", f"# {n} distilled image-text pairs (bimtt)\n\nEach pair: an image, a "
                   f"{manifest['text_width']}-d text embedding in the text tower of {manifest['model']}, and the "
                   "nearest real training caption of that embedding (for reading; the embedding is the data).\n")
    rt.wait()
    return {"pairs": n, "format": cfg.format, "out": str(out)}
