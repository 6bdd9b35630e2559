"""The pure parts of ``distillset federated``: non-IID client splits, payload byte counts and the privacy accountant.

Kept free of Flower so that they are tested (and reused by benchmarks) without starting a federated runtime.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from distillset.core.errors import DistillError

SPLITS = ("dirichlet", "pathological", "iid")


def _check_clients(n: int, clients: int) -> None:
    if clients < 1:
        raise DistillError(f"clients must be >= 1, got {clients}.")
    if clients > n:
        raise DistillError(f"{clients} clients but only {n} training images: every client needs at least one image; "
                           "lower --clients or use more data.")


def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, seed: int, tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: every class's images are divided among the clients in proportions ~ Dirichlet(alpha).

    Small ``alpha`` gives each client few classes (0.1: mostly one or two), large ``alpha`` tends to IID. The draw is
    repeated (up to ``tries`` times, from the same seeded stream) until every client holds at least one image, as
    the usual FedAvg benchmarks do; a seed that never gets there is a clear error.

    Returns:
        One sorted index array per client; together they partition ``range(len(labels))``.
    """
    if not alpha > 0 or not math.isfinite(alpha):
        raise DistillError(f"Dirichlet alpha must be a finite number > 0, got {alpha}; small values (0.1) give "
                           "strong label skew, large ones (100) nearly IID clients.")
    labels = np.asarray(labels)
    _check_clients(len(labels), clients)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.nonzero(labels == c)[0])
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) > 0:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DistillError(f"Dirichlet({alpha}) left a client without images in {tries} draws of {clients} clients over "
                       f"{len(labels)} images; raise alpha, lower --clients or use more data.")


def pathological_split(labels: np.ndarray, clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes (McMahan et al.'s pathological non-IID split).

    Classes are dealt round-robin from a seeded permutation (client k gets the k*s-th .. (k*s+s-1)-th class, wrapping
    around), so every class is held by about ``clients * s / classes`` clients, who share its images equally.
    """
    labels = np.asarray(labels)
    _check_clients(len(labels), clients)
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise DistillError(f"classes_per_client must be between 1 and the {len(classes)} classes of the data, got "
                           f"{classes_per_client}.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for k in range(clients):
        for j in range(classes_per_client):
            holders[int(order[(k * classes_per_client + j) % len(order)])].append(k)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c, ks in holders.items():
        if not ks:
            continue  # fewer client slots than classes: this class stays unused
        idx = rng.permutation(np.nonzero(labels == c)[0])
        if len(idx) < len(ks):
            raise DistillError(f"class {c} has {len(idx)} images for {len(ks)} clients holding it; lower --clients "
                               "or classes_per_client.")
        for k, chunk in zip(ks, np.array_split(idx, len(ks))):
            parts[k].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid_split(labels: np.ndarray, clients: int, seed: int) -> list[np.ndarray]:
    """A seeded uniform split (the IID reference)."""
    labels = np.asarray(labels)
    _check_clients(len(labels), clients)
    idx = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(idx, clients)]


def split(labels: np.ndarray, clients: int, kind: str, alpha: float, classes_per_client: int,
          seed: int) -> list[np.ndarray]:
    """The split named by ``kind`` (``dirichlet``, ``pathological`` or ``iid``)."""
    if kind == "dirichlet":
        return dirichlet_split(labels, clients, alpha, seed)
    if kind == "pathological":
        return pathological_split(labels, clients, classes_per_client, seed)
    if kind == "iid":
        return iid_split(labels, clients, seed)
    raise DistillError(f"unknown split '{kind}'; use one of {', '.join(SPLITS)}.")


def class_counts(labels: np.ndarray, parts: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) image counts of a split."""
    return np.stack([np.bincount(np.asarray(labels)[p], minlength=num_classes) for p in parts])


def payload_bytes(arrays: Iterable) -> int:
    """Bytes of the tensors of a payload: numel x element size, summed (the serialisation's header excluded).

    Takes numpy arrays, torch tensors or Flower ``Array`` objects (anything with ``shape`` and ``dtype``).
    """
    total = 0
    for a in arrays:
        dtype = str(a.dtype).removeprefix("torch.")
        total += int(np.prod(a.shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """(epsilon, delta)-DP of ``steps`` subsampled Gaussian mechanisms, by opacus' RDP accountant.

    Args:
        noise_multiplier: noise std / L2 sensitivity (``dp_noise`` of DM).
        sample_rate: the probability an example enters a step (batch / images of its class; 1 = no amplification).
        steps: mechanisms composed (DM steps per round x rounds).
        delta: the target delta (conventionally below 1 / images of the client).
    """
    from opacus.accountants import RDPAccountant

    if noise_multiplier <= 0:
        return math.inf
    if not 0 < sample_rate <= 1 or steps < 1 or not 0 < delta < 1:
        raise DistillError(f"the accountant needs 0 < sample_rate <= 1, steps >= 1 and 0 < delta < 1; got "
                           f"{sample_rate}, {steps}, {delta}.")
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))
