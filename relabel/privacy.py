"""Privacy of distilled data: membership inference on models trained on a set, and visual nearest neighbours.

Membership inference ("Privacy for Free", Dong et al., ICML'22): a target model is trained on some image set made
from the *members*; the attacker sees an example and guesses whether it was a member. Members and non-members are
disjoint and of equal size, so a coin flip scores 50 %. Reported per target:

* the loss-threshold attack (Yeom et al. 2018): member if the example's cross-entropy is below a threshold tau.
  Its **advantage** at the best tau is ``2 x (balanced accuracy - 50 %)``, which with equal sizes is
  ``max_tau (TPR - FPR)``; beside it ROC AUC and the TPR at 1 % FPR (Carlini et al.'s low-FPR view), through
  torchmetrics' ROC.
* optionally a LiRA-style attack (Carlini et al., S&P'22, online variant): shadow targets trained by the same
  pipeline on random halves of the member + non-member pool give, per example, Gaussians of its logit-scaled
  confidence when in and when out; the score is the log-likelihood ratio (a global variance when few shadows
  include an example, as the paper's small-shadow setting).

Visual privacy: for every synthetic image its nearest training images by L2 in pixels, by SSIM (torchmetrics) and
in a teacher's feature space, with the same statistics of held-out real images as the reference of "how close a
real image that was not trained on comes to the training set".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillset.core.data import ImageSet
from distillset.core.errors import DistillError
from distillset.relabel.evaluators import register_evaluator
from distillset.squeeze.inputs import InputTransform

# ------------------------------------------------------------------------------------------------- splits and scores


def split_members(labels: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint member / non-member indices, ``per_class`` of each per class (stratified, seeded)."""
    if per_class < 1:
        raise DistillError(f"members per class must be >= 1, got {per_class}.")
    g = torch.Generator().manual_seed(int(seed))
    members, non = [], []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2 * per_class:
            raise DistillError(f"class {c} has {len(idx)} training images but {per_class} members and {per_class} "
                               f"non-members need {2 * per_class}; lower members_per_class to at most "
                               f"{len(idx) // 2}.")
        idx = idx[torch.randperm(len(idx), generator=g)]
        members.append(idx[:per_class])
        non.append(idx[per_class:2 * per_class])
    return torch.cat(members), torch.cat(non)


def check_split(members: torch.Tensor, non_members: torch.Tensor) -> None:
    """Members and non-members must be disjoint and of equal size (else 50 % is not the coin flip)."""
    if len(members) != len(non_members):
        raise DistillError(f"{len(members)} members but {len(non_members)} non-members; the attack needs equal "
                           "sizes (the advantage's 50 % baseline assumes it): draw as many non-members as members.")
    common = set(members.tolist()) & set(non_members.tolist())
    if common:
        raise DistillError(f"{len(common)} examples are both members and non-members (e.g. index "
                           f"{min(common)}); the two sets must be disjoint.")
    if len(set(members.tolist())) != len(members):
        raise DistillError("the members list repeats an example; each example is a member once.")


@torch.no_grad()
def example_outputs(model: torch.nn.Module, images: ImageSet, mean, std, device, zca=None,
                    batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``(cross-entropy loss, logit-scaled confidence)`` of ``model`` on ``images`` (no augmentation).

    The confidence is LiRA's ``log p_y - log(1 - p_y)``, computed from the logits without forming ``1 - p_y``
    (which rounds to 0 for confidently fitted members).
    """
    norm = InputTransform(mean, std, zca).to(device)
    model.eval()
    losses, conf = [], []
    for i in range(0, len(images), batch):
        x = images.images[i:i + batch].to(device).float() / 255
        y = images.labels[i:i + batch].to(device)
        logits = model(norm(x)).float()
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        conf.append((true - torch.logsumexp(others, 1)).cpu())
    return torch.cat(losses), torch.cat(conf)


def threshold_attack(member_scores: torch.Tensor, non_scores: torch.Tensor) -> dict:
    """The best threshold attack on scores where *higher* means *member* (pass ``-loss`` for the loss attack).

    Returns advantage (``max (TPR - FPR)`` over thresholds = 2 x (best balanced accuracy - 0.5) for equal sizes),
    the balanced accuracy and threshold reaching it, ROC AUC, TPR at 1 % FPR, and a down-sampled ROC curve.

    The best threshold is chosen on the very scores it is scored on, so even a model that leaks nothing gets a
    positive advantage (about the two-sample Kolmogorov-Smirnov statistic, ~0.87 sqrt(2 / n) for n per side).
    ``advantage_heldout`` removes that bias: the threshold is chosen on one half of each side and applied to the
    other half (both ways, averaged); it is ~0 for a model that leaks nothing.
    """
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    if len(member_scores) != len(non_scores):
        raise DistillError(f"{len(member_scores)} member scores but {len(non_scores)} non-member scores; the "
                           "attack needs equal sizes.")
    raw = torch.cat([member_scores, non_scores]).double()
    # torchmetrics reads scores outside [0, 1] as logits and squashes them (ties where a sigmoid saturates): pass
    # ranks in [0, 1] instead, which leave every ROC point unchanged
    values, inverse = raw.unique(return_inverse=True)
    scores = inverse.double() / max(1, len(values) - 1)
    target = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(non_scores))]).long()
    fpr, tpr, _ = binary_roc(scores, target, thresholds=None)
    gap = tpr - fpr
    best = int(torch.argmax(gap))
    low = tpr[fpr <= 0.01]
    halves = []
    for a, b in ((0, 1), (1, 0)):
        ma, na = member_scores[a::2].double(), non_scores[a::2].double()
        mb, nb = member_scores[b::2].double(), non_scores[b::2].double()
        tau = _best_threshold(ma, na)
        halves.append(float((mb >= tau).double().mean() - (nb >= tau).double().mean()))
    keep = torch.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().long()
    return {
        "advantage": float(gap[best]), "balanced_accuracy": float(0.5 + gap[best] / 2),
        "threshold": _best_threshold(member_scores.double(), non_scores.double()), "auc": float(binary_auroc(scores, target, thresholds=None)),
        "tpr_at_1pct_fpr": float(low.max()) if len(low) else 0.0,
        "advantage_heldout": sum(halves) / 2,
        "null_advantage": 0.87 * (2 / len(member_scores)) ** 0.5,
        "roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()},
    }


def _best_threshold(member_scores: torch.Tensor, non_scores: torch.Tensor) -> float:
    """The threshold maximising ``TPR - FPR`` (member if score >= threshold)."""
    cand = torch.cat([member_scores, non_scores]).unique()  # sorted
    tpr = 1 - torch.searchsorted(member_scores.sort().values, cand).double() / len(member_scores)
    fpr = 1 - torch.searchsorted(non_scores.sort().values, cand).double() / len(non_scores)
    return float(cand[int(torch.argmax(tpr - fpr))])


def advantage_at(member_loss: torch.Tensor, non_loss: torch.Tensor, tau: float) -> float:
    """The advantage of the loss attack at one threshold, as the paper writes it:
    ``2 x (|{member: l < tau}| + |{non-member: l >= tau}|) / (|members| + |non-members|) - 1``."""
    hits = int((member_loss < tau).sum()) + int((non_loss >= tau).sum())
    return 2 * hits / (len(member_loss) + len(non_loss)) - 1


def lira_scores(target_conf: torch.Tensor, shadow_conf: torch.Tensor, shadow_in: torch.Tensor,
                min_per_side: int = 2) -> torch.Tensor:
    """LiRA's per-example log-likelihood ratio (online; higher = member).

    Args:
        target_conf: ``(n,)`` logit-scaled confidence of the target model on each example.
        shadow_conf: ``(k, n)`` the same for ``k`` shadow models.
        shadow_in: ``(k, n)`` bool, whether example ``i`` was in shadow ``j``'s training pool.
        min_per_side: below this many in (or out) shadows for an example, the global mean shift and variance are
            used (per-example Gaussians need samples on both sides).
    """
    if shadow_conf.shape != shadow_in.shape or shadow_conf.shape[1] != target_conf.shape[0]:
        raise DistillError(f"shadow scores {tuple(shadow_conf.shape)} and memberships {tuple(shadow_in.shape)} "
                           f"do not match {target_conf.shape[0]} examples.")
    inn, out = shadow_in.float(), (~shadow_in).float()
    n_in, n_out = inn.sum(0), out.sum(0)
    mu_in = (shadow_conf * inn).sum(0) / n_in.clamp(min=1)
    mu_out = (shadow_conf * out).sum(0) / n_out.clamp(min=1)
    # one variance for all examples: the paper's choice with few shadows, stabler than per-example estimates
    resid = torch.cat([(shadow_conf - mu_in)[shadow_in], (shadow_conf - mu_out)[~shadow_in]])
    var = resid.var().clamp(min=1e-6) if resid.numel() > 1 else torch.tensor(1.0)
    shift = (mu_in - mu_out)[(n_in >= min_per_side) & (n_out >= min_per_side)]
    mean_shift = shift.mean() if shift.numel() else torch.tensor(0.0)
    mu_in = torch.where(n_in >= min_per_side, mu_in, mu_out + mean_shift)
    mu_out = torch.where(n_out >= min_per_side, mu_out, mu_in - mean_shift)
    return ((target_conf - mu_out) ** 2 - (target_conf - mu_in) ** 2) / (2 * var)


# ------------------------------------------------------------------------------------------------- nearest neighbours


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def nearest_l2(queries: torch.Tensor, pool: torch.Tensor, k: int, batch: int = 2048) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """``(distances, indices)`` ``(n, k)`` of the ``k`` nearest pool images of each query, L2 per pixel in [0, 1]
    (root mean square difference, so numbers compare across image sizes)."""
    q = _unit(queries).flatten(1)
    best_d, best_i = None, None
    for s in range(0, len(pool), batch):
        p = _unit(pool[s:s + batch]).flatten(1)
        d = torch.cdist(q, p).pow(2) / q.shape[1]
        d, i = _merge(best_d, best_i, d, s, k)
        best_d, best_i = d, i
    return best_d.clamp(min=0).sqrt(), best_i


def nearest_features(q_feat: torch.Tensor, p_feat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cosine distances, indices)`` of the ``k`` nearest pool features of each query feature."""
    q, p = F.normalize(q_feat.float(), dim=1), F.normalize(p_feat.float(), dim=1)
    d = 1 - q @ p.T
    d, i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
    return d, i


def nearest_ssim(queries: torch.Tensor, pool: torch.Tensor, k: int, batch: int = 4096) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """``(ssim, indices)`` of the ``k`` pool images most similar to each query by SSIM (torchmetrics; 7 x 7
    Gaussian window, shrunk for images smaller than 11 px)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    h = queries.shape[-1]
    kernel = 11 if h >= 16 else 3  # digits are 8 px: the default 11-px window does not fit
    out_s, out_i = [], []
    p_all = _unit(pool)
    for q in _unit(queries):
        scores = []
        for s in range(0, len(p_all), batch):
            p = p_all[s:s + batch]
            scores.append(ssim(q.expand_as(p).contiguous(), p, data_range=1.0, kernel_size=kernel,
                               reduction="none"))
        sc = torch.cat(scores)
        v, i = torch.topk(sc, min(k, len(sc)))
        out_s.append(v)
        out_i.append(i)
    return torch.stack(out_s), torch.stack(out_i)


def _merge(best_d, best_i, d, offset, k):
    """Keep the ``k`` smallest of the running best and a new block of distances."""
    i = torch.arange(offset, offset + d.shape[1]).expand(d.shape[0], -1)
    if best_d is not None:
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
    v, j = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
    return v, i.gather(1, j)


@torch.no_grad()
def features(teacher, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Penultimate features of a loaded teacher (which normalises its own ``[0, 1]`` inputs) for uint8 images."""
    from distillset.relabel.diversity import penultimate

    dev = next(teacher.parameters()).device
    return torch.cat([penultimate(teacher.model, teacher.normalize(images[s:s + batch].to(dev).float() / 255))
                      .flatten(1).float().cpu() for s in range(0, len(images), batch)])


def nearest_summary(syn: ImageSet, train: ImageSet, reference: ImageSet, k: int, teacher=None,
                    ssim_per_class: bool = True) -> dict:
    """Nearest training images of each synthetic image (and of each held-out reference image) by L2, SSIM and
    teacher features; returns per-image neighbours and per-set means."""
    result: dict = {"k": k, "num_synthetic": len(syn), "num_train": len(train), "num_reference": len(reference)}
    per_image: dict[str, dict] = {}
    f_train = features(teacher, train.images) if teacher is not None else None
    for name, q in (("synthetic", syn), ("reference", reference)):
        d_l2, i_l2 = nearest_l2(q.images, train.images, k)
        entry = {"l2": d_l2, "l2_index": i_l2}
        if ssim_per_class:  # SSIM against the query's own class (memorisation of a class's image is the question)
            s_v, s_i = [], []
            for j in range(len(q)):
                pool = torch.nonzero(train.labels == q.labels[j]).flatten()
                v, i = nearest_ssim(q.images[j:j + 1], train.images[pool], k)
                s_v.append(v[0])
                s_i.append(pool[i[0]])
            entry["ssim"], entry["ssim_index"] = torch.stack(s_v), torch.stack(s_i)
        if teacher is not None:
            d_f, i_f = nearest_features(features(teacher, q.images), f_train, k)
            entry["feature"], entry["feature_index"] = d_f, i_f
        per_image[name] = entry
        result[name] = {
            "l2_nearest_mean": float(d_l2[:, 0].mean()),
            "l2_nearest_min": float(d_l2[:, 0].min()),
            "same_class_nearest_l2": float((train.labels[i_l2[:, 0]] == q.labels).float().mean()),
        }
        if "ssim" in entry:
            result[name]["ssim_nearest_mean"] = float(entry["ssim"][:, 0].mean())
            result[name]["ssim_nearest_max"] = float(entry["ssim"][:, 0].max())
        if "feature" in entry:
            result[name]["feature_nearest_mean"] = float(entry["feature"][:, 0].mean())
    ref_l2 = per_image["reference"]["l2"][:, 0]
    # the share of synthetic images closer to a training image than the closest 5 % of held-out real images: a
    # copy of a training image lands there, a new image mostly does not
    tau = float(torch.quantile(ref_l2, 0.05)) if len(ref_l2) > 1 else float(ref_l2.min())
    result["copy_threshold_l2"] = tau
    result["synthetic"]["share_closer_than_reference_5pct"] = float((per_image["synthetic"]["l2"][:, 0]
                                                                     < tau).float().mean())
    result["reference"]["share_closer_than_reference_5pct"] = float((ref_l2 < tau).float().mean())
    result["_per_image"] = per_image
    return result


def roc_plot(path, curves: dict[str, dict]) -> None:
    """ROC curves (log-scaled FPR, as the low-FPR regime is where attacks matter) of several targets in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distillset.core.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=110)
    for name, roc in curves.items():
        fpr = [max(f, 1e-4) for f in roc["fpr"]]
        ax.plot(fpr, roc["tpr"], label=name)
    ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("membership inference (loss attack)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)



# --------------------------------------------------------------------------------------- the evaluate-side evaluator


@register_evaluator("mia", description="loss-threshold membership inference on a hard-label student of the set (and "
                    "of the random baseline): training images vs as many test images",
                    paper="Dong et al. 2022, Privacy for Free: How does Dataset Condensation Help Privacy? (ICML)")
def mia_evaluator(p, cfg, rt=None) -> dict:
    """``evaluators: [mia]`` in ``distillset evaluate``: the loss attack on a hard-label student of the set (and of
    the random baseline), members = training images of the source the set was made from, non-members = as many
    test images. A first look; ``distillset privacy mia`` runs the controlled experiment (disjoint member split,
    several targets and seeds)."""
    from distillset.relabel.evaluate import random_set
    from distillset.relabel.student import StudentSpec, fit_student

    device = rt.device if rt is not None else "cpu"
    train = p.fit(p.source.load("train"))
    n = min(len(train), len(p.test), 1000)
    g = torch.Generator().manual_seed(cfg.seed)
    members = train.subset(torch.randperm(len(train), generator=g)[:n])
    non = p.test.subset(torch.randperm(len(p.test), generator=g)[:n])
    out = {"members": n, "note": "members: training images of the source (the set saw them through distillation); "
           "non-members: test images"}
    sets = {"distilled": p.distilled}
    if cfg.baseline:
        sets["random"] = random_set(p, cfg)
    arch = p.archs[0]
    for name, images in sets.items():
        spec = StudentSpec(arch, p.model_kwargs[arch], cfg.epochs, cfg.protocol, cfg.batch_size, cfg.lr or None,
                           min_scale=cfg.min_scale, flip=cfg.flip)
        model = fit_student(images, spec, p.mean, p.std, cfg.seed, device, zca=p.zca)
        l_m, _ = example_outputs(model, members, p.mean, p.std, device, p.zca)
        l_n, _ = example_outputs(model, non, p.mean, p.std, device, p.zca)
        a = threshold_attack(-l_m, -l_n)
        a.pop("roc")
        out[name] = a
    return out

