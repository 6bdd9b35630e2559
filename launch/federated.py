"""``distillset federated``: federated learning through distilled data (FedDM) against FedAvg, on Flower.

The run folder holds everything a round needs, so the server and the clients (Flower's simulation or separate
deployment processes on one machine) agree through it:

    config.yaml, config.json   the run's config (the apps read config.json)
    split.json                 per-client class counts of the non-IID split
    clients/client_K.npz       client K's shard (only its own images; labels renumbered over the classes it has)
    clients/K/round_R/         client K's DM run of round R (the recover engine's output folder)
    rounds/round_R.json        metrics of finished round R; rounds/global_R.safetensors its global weights
    metrics.csv, results.json  one row per round; accuracy_vs_bytes.png
    flower_app/pyproject.toml  the Flower App to start the same ServerApp/ClientApp in deployment (``flwr run``)

Methods: ``feddm`` (clients upload DM sets synthesised under networks around the global weights, the server trains
on their union), ``fedavg`` (clients upload weights after local epochs) and ``coreset`` (one shot: clients upload a
random real subset of the same size: the privacy-naive upper bound of one-shot uploads).

This module holds the config and the run folder; the Flower apps and ``run`` (the command) are in
:mod:`distillset.launch.fed_apps`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distillset.core.config import fingerprint, from_dict, to_dict, write_config
from distillset.core.errors import DistillError
from distillset.core.io import atomic_path, read_json, require_folder, write_csv, write_json, write_text

log = logging.getLogger("distillset.federated")

METHODS = ("feddm", "fedavg", "coreset")
# fields that leave what a round computes as it was (more rounds continue a run)
NON_SEMANTIC = ("out", "rounds", "timeout", "num_cpus", "threads", "fail", "prepare_only")


@dataclass
class FederatedConfig:
    """Federated learning on a non-IID split: FedDM (distilled uploads), FedAvg or a one-shot real coreset.

    Attributes:
        out: run folder (config, client shards, per-round records and global weights, metrics.csv, plot).
        data: data source spec (its train split is divided among the clients, its test split scores the global
            model on the server).
        method: feddm (upload DM-synthesised sets), fedavg (upload weights) or coreset (one-shot random real
            images, ipc per class per client).
        clients: number of clients K.
        split: dirichlet (label skew Dirichlet(alpha)), pathological (classes_per_client classes each) or iid.
        alpha: Dirichlet concentration (> 0; 0.1 = strong skew).
        classes_per_client: classes each client holds under the pathological split.
        train_size: use a seeded random subset of this many training images (0 = all).
        test_size: score the global model on a seeded random subset of N test images (0 = all).
        rounds: communication rounds (1 = one-shot distillation; coreset is one-shot only).
        arch: the global (and client) model, a registry name (ConvNet family for feddm's matching networks).
        width: channels per ConvNet layer.
        ipc: synthetic (feddm) or real (coreset) images per class per client and round.
        iterations: DM optimisation steps per client and round.
        init: how a client's synthetic images start: real (random real images of the class, DM's usual start: few
            steps then upload images close to real ones) or noise (needed under dp_noise, where nothing may be
            copied from the data).
        syn_lr: learning rate of the synthetic images (SGD, momentum 0.5, as DM).
        batch_real: real images per class per DM step.
        perturb: spread of the networks sampled around the global weights (FedDM's P_w(w_r)): a Gaussian
            direction scaled filter-wise to each filter's norm, times this factor; 0 = w_r itself.
        matching_aug: DM's Siamese augmentation (dsa, diffaugment or none).
        min_class_images: a client distils (and counts) only the classes it holds at least this many images of;
            classes it lacks are left out of its upload (never an error). Under dp_noise a class needs at least
            batch_real images (a batch without repeats keeps each image's contribution within dp_clip).
        server_epochs: epochs the server trains the global model on the union of a round's uploads.
        server_lr: its SGD learning rate.
        server_protocol: student protocol of that training (matching = DSA augmentation, plain = none).
        local_epochs: FedAvg: epochs of local training per round.
        local_lr: FedAvg: local SGD learning rate.
        local_protocol: FedAvg: protocol of the local training.
        batch_size: batch size of server and local training.
        dp_noise: FedDM + DP: Gaussian noise multiplier on each client's matched statistics (0 = off; see the
            dm objective's dp_noise); epsilon per client is reported by opacus' RDP accountant.
        dp_clip: per-example L2 clipping norm of the real embeddings under dp_noise.
        dp_delta: the delta of the reported (epsilon, delta).
        seed: seed of the split, the initial model and every client's update.
        timeout: seconds the server waits for a round's replies; clients that have not answered by then count as
            dropped for that round.
        num_cpus: CPUs Flower's simulation (Ray) may use; clients run one per CPU.
        threads: torch threads per client and on the server.
        fail: injected client failures 'ROUND:CLIENT' (the client raises in that round), to exercise the
            dropped-client path; the round continues with the others.
        prepare_only: write the run folder (shards, config, Flower App) and stop: for Flower's deployment runtime,
            ``flwr run OUT/flower_app CONNECTION`` against a SuperLink whose SuperNodes have ``--node-config
            partition-id=K``.
    """

    out: str = "output/federated"
    data: str = "digits"
    method: str = "feddm"
    clients: int = 10
    split: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    train_size: int = 0
    test_size: int = 0
    rounds: int = 5
    arch: str = "convnet"
    width: int = 32
    ipc: int = 10
    iterations: int = 200
    init: str = "real"
    syn_lr: float = 1.0
    batch_real: int = 64
    perturb: float = 0.05
    matching_aug: str = "dsa"
    min_class_images: int = 1
    server_epochs: int = 30
    server_lr: float = 0.01
    server_protocol: str = "matching"
    local_epochs: int = 1
    local_lr: float = 0.01
    local_protocol: str = "plain"
    batch_size: int = 64
    dp_noise: float = 0.0
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    seed: int = 0
    timeout: float = 3600.0
    num_cpus: int = 1
    threads: int = 1
    fail: list[str] = field(default_factory=list)
    prepare_only: bool = False

    def __post_init__(self):
        from distillset.launch.fed_parts import SPLITS

        if self.method not in METHODS:
            raise DistillError(f"unknown federated method '{self.method}'; use one of {', '.join(METHODS)}.")
        if self.split not in SPLITS:
            raise DistillError(f"unknown split '{self.split}'; use one of {', '.join(SPLITS)}.")
        if self.split == "dirichlet" and not self.alpha > 0:
            raise DistillError(f"Dirichlet alpha must be > 0, got {self.alpha}; 0.1 is strong label skew, 100 nearly "
                               "IID.")
        for name in ("clients", "rounds", "ipc", "iterations", "batch_real", "server_epochs", "local_epochs",
                     "batch_size", "num_cpus", "threads", "min_class_images", "width"):
            if getattr(self, name) < 1:
                raise DistillError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.method == "coreset" and self.rounds != 1:
            raise DistillError(f"coreset is a one-shot baseline (the clients' real images are sent once); set "
                               f"rounds: 1, got {self.rounds}.")
        if self.dp_noise < 0 or self.dp_clip <= 0 or not 0 < self.dp_delta < 1:
            raise DistillError("dp_noise must be >= 0, dp_clip > 0 and 0 < dp_delta < 1.")
        if self.dp_noise and self.method != "feddm":
            raise DistillError(f"dp_noise is FedDM's mechanism on the matched statistics; method '{self.method}' "
                               "has none (drop dp_noise or use method: feddm).")
        if self.init not in ("real", "noise"):
            raise DistillError(f"init must be real or noise, got '{self.init}'.")
        if self.dp_noise and self.init == "real":
            raise DistillError("dp_noise with init: real would upload images started from real ones, which no "
                               "noise on the statistics protects; set init: noise.")
        if self.perturb < 0 or self.syn_lr <= 0 or self.server_lr <= 0 or self.local_lr <= 0:
            raise DistillError("perturb must be >= 0 and the learning rates > 0.")
        if self.timeout <= 0:
            raise DistillError(f"timeout must be > 0 seconds, got {self.timeout}.")
        self.failures()  # parsed once here, so a bad entry fails when the recipe is read

    def failures(self) -> set[tuple[int, int]]:
        out = set()
        for f in self.fail:
            r, _, k = str(f).partition(":")
            if not (r.isdigit() and k.isdigit()):
                raise DistillError(f"fail entries are 'ROUND:CLIENT' (e.g. '2:0'), got {f!r}.")
            out.add((int(r), int(k)))
        return out


# ------------------------------------------------------------------------------------------------------ the folder


def load_config(run_dir: str | Path) -> FederatedConfig:
    """The config a run folder was prepared with (what the Flower apps read)."""
    data = read_json(Path(run_dir) / "config.json")
    data.pop("fingerprint", None)
    return from_dict(FederatedConfig, data)


def shard_path(run_dir: str | Path, client: int) -> Path:
    return Path(run_dir) / "clients" / f"client_{client:03d}.npz"


def _train_images(cfg: FederatedConfig):
    from distillset.core.data import ImageSet, Source

    train = Source(cfg.data).load("train")
    if cfg.train_size and cfg.train_size < len(train):
        g = np.random.default_rng(cfg.seed + 17)
        keep = np.sort(g.choice(len(train), cfg.train_size, replace=False))
        train = ImageSet(train.images[keep], train.labels[keep], train.class_names)
    return train


def prepare(cfg: FederatedConfig) -> Path:
    """Write the run folder's config, the client shards and the Flower App (skipped when already there).

    A folder prepared with another config (semantic fields) is refused: its rounds were computed under that one.
    """
    from distillset.launch.fed_parts import class_counts, split

    out = require_folder(cfg.out)
    fp = fingerprint(cfg, ignore=NON_SEMANTIC)
    if (out / "config.json").exists():
        old = read_json(out / "config.json")
        if old.get("fingerprint", fp) != fp:
            raise DistillError(f"{out} holds a federated run with another config; use a new --out, or delete {out} "
                               "to start over.")
    write_config(out, cfg)
    write_json(out / "config.json", {**to_dict(cfg), "out": str(out.resolve())} | {"fingerprint": fp})
    if not (out / "split.json").exists():
        train = _train_images(cfg)
        labels = train.labels.numpy()
        parts = split(labels, cfg.clients, cfg.split, cfg.alpha, cfg.classes_per_client, cfg.seed)
        for k, idx in enumerate(parts):
            present = np.unique(labels[idx])
            local = np.searchsorted(present, labels[idx])  # renumbered 0..m-1 over the classes the client holds
            x = train.images[idx].permute(0, 2, 3, 1).numpy()
            buf = io.BytesIO()
            np.savez(buf, x_train=x, y_train=local, x_test=x[:1], y_test=local[:1], classes=present,
                     class_names=np.array([train.class_names[c] for c in present]))
            with atomic_path(shard_path(out, k)) as tmp:
                tmp.write_bytes(buf.getvalue())
        counts = class_counts(labels, parts, train.num_classes)
        write_json(out / "split.json", {"kind": cfg.split, "alpha": cfg.alpha, "class_names": train.class_names,
                                        "image_shape": list(train.image_shape), "counts": counts.tolist()})
    write_flower_app(out)
    return out


def write_flower_app(run_dir: Path) -> Path:
    """A Flower App folder naming distillset's ServerApp/ClientApp, for ``flwr run APP CONNECTION``.

    The apps live in the installed package (``distillset.launch.fed_apps``); the folder only declares them and the
    run config (``run-dir``, this folder's parent, overridable with ``--run-config``).
    """
    app = Path(run_dir) / "flower_app"
    text = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "distillset-federated"
version = "1.0.0"
description = "distillset federated: FedDM / FedAvg ServerApp and ClientApp"
license = "Apache-2.0"
dependencies = ["flwr>=1.20"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "distillset"

[tool.flwr.app.components]
serverapp = "distillset.launch.fed_apps:server_app"
clientapp = "distillset.launch.fed_apps:client_app"

[tool.flwr.app.config]
run-dir = "{Path(run_dir).resolve()}"
"""
    write_text(app / "pyproject.toml", text)
    return app


# ------------------------------------------------------------------------------------------------------ results


def round_records(run_dir: str | Path) -> list[dict]:
    """The records of the finished rounds, in order."""
    folder = Path(run_dir) / "rounds"
    recs = [read_json(p) for p in sorted(folder.glob("round_*.json"))] if folder.exists() else []
    return sorted(recs, key=lambda r: r["round"])


def summarise(run_dir: Path, cfg: FederatedConfig, seconds: float) -> dict:
    """metrics.csv (one row per round), results.json and the accuracy-vs-bytes plot of the run."""
    recs = round_records(run_dir)
    rows, up, down = [], 0, 0
    for r in recs:
        up += sum(c["upload_bytes"] for c in r["clients"])
        down += sum(c["download_bytes"] for c in r["clients"])
        rows.append({"round": r["round"], "accuracy": r["accuracy"], "clients_ok": len(r["clients"]),
                     "clients_failed": len(r["failed"]), "upload_bytes": sum(c["upload_bytes"] for c in r["clients"]),
                     "download_bytes": sum(c["download_bytes"] for c in r["clients"]), "total_upload_bytes": up,
                     "total_download_bytes": down, "seconds": r["seconds"],
                     "epsilon_max": max((c.get("epsilon", 0.0) for c in r["clients"]), default=0.0)})
    write_csv(run_dir / "metrics.csv", rows)
    last = recs[-1] if recs else {}
    eps = {str(c["partition"]): c["epsilon"] for c in last.get("clients", []) if "epsilon" in c}
    result = {"method": cfg.method, "rounds": len(recs), "accuracy": last.get("accuracy"),
              "total_upload_bytes": up, "total_download_bytes": down, "seconds": seconds, "per_round": rows,
              "epsilon": eps or None, "delta": cfg.dp_delta if eps else None, "config": to_dict(cfg)}
    write_json(run_dir / "results.json", result)
    plot_curves(run_dir / "accuracy_vs_bytes.png", {cfg.method: [(x["total_upload_bytes"], x["accuracy"])
                                                                 for x in rows]})
    return result


def plot_curves(path: Path, curves: dict[str, list[tuple[float, float]]], title: str = "") -> None:
    """Global test accuracy against the total bytes the clients uploaded, one line per method (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("total bytes uploaded by the clients")
    ax.set_ylabel("global test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
