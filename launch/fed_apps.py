"""The Flower apps of ``distillset federated``: a ClientApp whose local update is FedDM's distribution matching (through
the recover engine), FedAvg's local epochs or a one-shot real coreset, and a ServerApp running the rounds with the
:class:`FedDM` strategy (or Flower's own ``FedAvg``), recording every finished round so a killed server resumes.

Both apps find the run folder in the Flower run config (``run-dir``, set by the Flower App's pyproject.toml or
``flwr run --run-config``) or, in the simulation, from the factory that built them; the client's shard is named by its
node config (``partition-id``, which Flower's simulation sets and a deployment SuperNode gets from
``--node-config``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from distillset.core.data import ImageSet
from distillset.core.errors import DistillError
from distillset.core.io import load_tensors, read_json, save_tensors, write_json
from distillset.core.partition import mix_seed
from distillset.launch.fed_parts import dp_epsilon, payload_bytes
from distillset.launch.federated import FederatedConfig, load_config, prepare, round_records, shard_path, summarise

log = logging.getLogger("distillset.federated")

# the global model sees fixed, data-independent normalisation: no client statistic has to be shared
MEAN_STD = 0.5


def _norm(channels: int) -> tuple[list[float], list[float]]:
    return [MEAN_STD] * channels, [MEAN_STD] * channels


def initial_state(cfg: FederatedConfig, num_classes: int, image_shape) -> dict[str, torch.Tensor]:
    from distillset.squeeze.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(cfg.seed, 3))
        model = create_model(cfg.arch, num_classes, image_shape[0], image_shape[-1], width=cfg.width)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------ client side


def read_shard(path: Path) -> tuple[ImageSet, np.ndarray]:
    """A client's shard with its labels renumbered over the classes it holds, and those classes' global ids."""
    from distillset.core.data import Source

    if not path.exists():
        raise DistillError(f"client shard {path} does not exist; prepare the run folder first (distillset "
                           "federated writes it).")
    with np.load(path) as z:
        classes = z["classes"].astype(np.int64)
    return Source(f"npz:{path}").load("train"), classes


def _student(cfg: FederatedConfig, epochs: int, lr: float, protocol: str):
    from distillset.relabel.student import StudentSpec

    return StudentSpec(arch=cfg.arch, model_kwargs={"width": cfg.width}, epochs=epochs, protocol=protocol,
                       batch_size=cfg.batch_size, lr=lr, autocast="none")


def _as_global(local: ImageSet, classes: np.ndarray, num_classes: int, names: list[str]) -> ImageSet:
    return ImageSet(local.images, torch.as_tensor(classes)[local.labels], names[:num_classes])


def client_update(cfg: FederatedConfig, run_dir: Path, client: int, server_round: int,
                  state: dict[str, torch.Tensor], work: Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """One client's update of a round: the tensors it uploads and its metrics.

    fedavg: the weights after ``local_epochs`` on its shard from the global ones. feddm: a DM set of ``ipc`` images
    per class it holds (at least ``min_class_images``), synthesised by the recover engine under networks sampled
    around the global weights, with its class counts (left out under DP: they are not noised; and under DP only
    classes with at least ``batch_real`` images, so no image enters a batch twice). coreset: ``ipc``
    random real images per class it holds, with its class counts.
    """
    torch.set_num_threads(cfg.threads)
    if (server_round, client) in cfg.failures():
        raise RuntimeError(f"client {client} dropped in round {server_round} (injected by the fail option)")
    split = read_json(run_dir / "split.json")
    names, num_classes = split["class_names"], len(split["class_names"])
    local, classes = read_shard(shard_path(run_dir, client))
    seed = mix_seed(cfg.seed, 11, server_round, client)
    metrics: dict = {"num-examples": len(local), "partition-id": client}
    if cfg.method == "fedavg":
        from distillset.relabel.student import fit_student

        model = fit_student(_as_global(local, classes, num_classes, names),
                            _student(cfg, cfg.local_epochs, cfg.local_lr, cfg.local_protocol),
                            *_norm(local.image_shape[0]), seed, "cpu", init_state=state)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics
    counts = np.bincount(local.labels.numpy(), minlength=len(classes))
    # under DP a class must fill a batch without repeats: a repeated image would weigh twice in the clipped sum
    keep = counts >= max(cfg.min_class_images, cfg.batch_real if cfg.dp_noise else 1)
    if cfg.method == "coreset":
        g = torch.Generator().manual_seed(seed)
        pick = []
        for c in np.nonzero(keep)[0]:
            idx = torch.nonzero(local.labels == int(c)).flatten()
            pick.append(idx[torch.randperm(len(idx), generator=g)[:cfg.ipc]])
        pick = torch.cat(pick)
        images, labels = local.images[pick], torch.as_tensor(classes)[local.labels[pick]]
    else:
        images, labels, eps = _distil(cfg, run_dir, client, server_round, state, local, classes, keep, seed, work)
        if eps is not None:
            metrics["epsilon"] = eps
    up = {"images": images.contiguous(), "labels": labels.long()}
    if not cfg.dp_noise:
        full = np.zeros(num_classes, dtype=np.int64)
        full[classes[keep]] = counts[keep]
        up["counts"] = torch.as_tensor(full)
    return up, metrics


def _distil(cfg, run_dir, client, server_round, state, local, classes, keep, seed, work):
    """The client's DM set of this round: the recover engine (method dm) on its shard, networks around ``state``."""
    from distillset.core.distilled import load_distilled
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import run as recover_run

    work = Path(work or run_dir / "clients" / str(client)) / f"round_{server_round:03d}"
    shard = shard_path(run_dir, client)
    if not keep.all():  # classes with too few images are left out: a shard of the others
        rows = torch.nonzero(torch.as_tensor(keep)[local.labels]).flatten()
        x = local.images[rows].permute(0, 2, 3, 1).numpy()
        kept = np.nonzero(keep)[0]
        y = np.searchsorted(kept, local.labels[rows].numpy())
        shard = work / "shard.npz"
        if not shard.exists():
            work.mkdir(parents=True, exist_ok=True)
            np.savez(shard, x_train=x, y_train=y, x_test=x[:1], y_test=y[:1],
                     class_names=np.array([str(c) for c in kept]))
        classes = classes[kept]
    base = work / "global.safetensors"
    if not base.exists():
        save_tensors(base, state)
    options = {"arch": cfg.arch, "width": cfg.width, "base_weights": str(base), "perturb": cfg.perturb,
               "batch_real": cfg.batch_real, "aug": cfg.matching_aug}
    if cfg.dp_noise:
        options.update(dp_noise=cfg.dp_noise, dp_clip=cfg.dp_clip)
    rc = RecoverConfig(out=str(work / "dm"), data=f"npz:{shard}", method="dm", options=options, ipc=cfg.ipc,
                       param_options={"init": cfg.init},
                       iterations=cfg.iterations, lr=cfg.syn_lr, optimizer="sgd", momentum=0.5, schedule="constant",
                       classes_per_unit=0, seed=seed, autocast="none", channels_last=False,
                       log_every=max(1, cfg.iterations), augmentation="none")
    recover_run(rc)
    syn, _ = load_distilled(work / "dm")
    labels = torch.as_tensor(classes)[syn.labels]
    eps = None
    if cfg.dp_noise:
        per_class = np.bincount(local.labels.numpy(), minlength=len(keep))[keep]
        rate = min(1.0, cfg.batch_real / int(per_class.min()))
        eps = dp_epsilon(cfg.dp_noise, rate, cfg.iterations * server_round, cfg.dp_delta)
    return syn.images, labels, eps


# ------------------------------------------------------------------------------------------------------ server side


def union_of_uploads(uploads: list[dict[str, torch.Tensor]], ipc: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Images, labels and per-image weights of the union of a round's uploads.

    An image of class c from client k stands for the ``counts[k, c]`` real images it summarises, so its weight is
    ``counts[k, c] / ipc`` (normalised to mean 1): without counts (DP) every image weighs the same.
    """
    images = torch.cat([u["images"] for u in uploads])
    labels = torch.cat([u["labels"] for u in uploads])
    weights = []
    for u in uploads:
        if "counts" in u:
            weights.append(u["counts"][u["labels"]].float() / ipc)
        else:
            weights.append(torch.ones(len(u["labels"])))
    w = torch.cat(weights)
    return images, labels, w / w.mean()


def server_update(cfg: FederatedConfig, state: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]],
                  names: list[str], server_round: int) -> dict[str, torch.Tensor]:
    """FedDM's server step: train the global model (from its current weights) on the union of the uploads, each
    image weighted by the real images it stands for (weighted cross-entropy through one-hot soft targets)."""
    from distillset.relabel.student import fit_student

    torch.set_num_threads(cfg.threads)
    images, labels, w = union_of_uploads(uploads, cfg.ipc)
    targets = torch.nn.functional.one_hot(labels, len(names)).float() * w[:, None]
    model = fit_student(ImageSet(images, labels, names), _student(cfg, cfg.server_epochs, cfg.server_lr,
                                                                   cfg.server_protocol),
                        *_norm(images.shape[1]), mix_seed(cfg.seed, 13, server_round), "cpu", soft_targets=targets,
                        init_state=state)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluate_state(cfg: FederatedConfig, state: dict[str, torch.Tensor], test: ImageSet) -> float:
    from distillset.squeeze.data import evaluate_model
    from distillset.squeeze.models import create_model

    model = create_model(cfg.arch, test.num_classes, test.image_shape[0], test.image_shape[-1], width=cfg.width)
    model.load_state_dict(state)
    return evaluate_model(model.eval(), test, *_norm(test.image_shape[0]), "cpu")


def _flwr():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise DistillError("distillset federated needs Flower; install the extra: pip install "
                           "'distillset[federated]'.") from None
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    return ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict


def _strategy_classes():
    """FedDM as a Flower ``Strategy`` (defined on first use: Flower is an optional extra)."""
    from flwr.serverapp.strategy import Strategy
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    ArrayRecord, _, Message, MessageType, MetricRecord, RecordDict = _flwr()

    class FedDM(Strategy):
        """FedDM (Xiong et al., CVPR'23) and the one-shot coreset: every client receives the global weights w_r and
        answers with a small image set (+ class counts); the server trains w_r on their union."""

        def __init__(self, cfg: FederatedConfig, names: list[str]):
            self.cfg, self.names = cfg, names
            self._state: dict[str, torch.Tensor] | None = None

        def summary(self) -> None:
            log.info("FedDM: %d clients, ipc %d, %d DM steps per round, server trains %d epochs", self.cfg.clients,
                     self.cfg.ipc, self.cfg.iterations, self.cfg.server_epochs)

        def configure_train(self, server_round, arrays, config, grid) -> Iterable:
            node_ids, _ = sample_nodes(grid, self.cfg.clients, self.cfg.clients)
            self._state = arrays.to_torch_state_dict()
            config["server-round"] = server_round
            record = RecordDict({"arrays": arrays, "config": config})
            return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in node_ids]

        def aggregate_train(self, server_round, replies):
            uploads = [{k: torch.as_tensor(v) for k, v in m.content["arrays"].to_torch_state_dict().items()}
                       for m in replies if not m.has_error()]
            if not uploads:
                return None, None
            state = server_update(self.cfg, self._state, uploads, self.names, server_round)
            return ArrayRecord(state), MetricRecord({"images": sum(len(u["labels"]) for u in uploads)})

        def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable:
            return []  # the global model is scored on the server's test split

        def aggregate_evaluate(self, server_round, replies):
            return None

    return FedDM


def make_strategy(cfg: FederatedConfig, names: list[str]):
    if cfg.method == "fedavg":
        from flwr.serverapp.strategy import FedAvg

        return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.clients,
                      min_available_nodes=cfg.clients)
    return _strategy_classes()(cfg, names)


def _test_set(cfg: FederatedConfig) -> ImageSet:
    from distillset.core.data import Source

    test = Source(cfg.data).load("test")
    if cfg.test_size and cfg.test_size < len(test):  # seeded random, not the first N: test splits may be sorted
        keep = np.sort(np.random.default_rng(cfg.seed + 29).choice(len(test), cfg.test_size, replace=False))
        test = ImageSet(test.images[keep], test.labels[keep], test.class_names)
    return test


def serve(grid, run_dir: Path) -> None:
    """The server's rounds: resume after the last recorded round, then for each round send w_r to every client,
    aggregate the replies that came (failures and timeouts are recorded and the round goes on with the others),
    score the new global model and record the round atomically (weights first, then the metrics that mark it
    finished)."""
    ArrayRecord, ConfigRecord, *_ = _flwr()
    cfg = load_config(run_dir)
    torch.set_num_threads(cfg.threads)
    split = read_json(run_dir / "split.json")
    names = split["class_names"]
    test = _test_set(cfg)
    done = round_records(run_dir)
    rounds = run_dir / "rounds"
    if done:
        state = load_tensors(rounds / f"global_{done[-1]['round']:03d}.safetensors")
    else:
        state = initial_state(cfg, len(names), split["image_shape"])
    strategy = make_strategy(cfg, names)
    for r in range(len(done) + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        arrays = ArrayRecord(state)
        down = payload_bytes(arrays.values())
        messages = list(strategy.configure_train(r, arrays, ConfigRecord({}), grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.timeout))
        ok = [m for m in replies if not m.has_error()]
        failed = [{"node": int(m.metadata.src_node_id), "reason": _last_line(str(m.error.reason))} for m in replies
                  if m.has_error()]
        missing = len(messages) - len(replies)
        if failed or missing:
            log.warning("round %d: %d of %d clients failed or timed out (%s); the round goes on with the %d others",
                        r, len(failed) + missing, len(messages), "; ".join(f["reason"] for f in failed),
                        len(ok))
        if not ok:
            raise DistillError(f"round {r}: no client answered ({len(failed)} failed, {missing} timed out); the "
                               f"server stops after round {r - 1}, re-run the same command to resume.")
        new, _ = strategy.aggregate_train(r, ok)
        state = new.to_torch_state_dict()
        acc = evaluate_state(cfg, state, test)
        clients = []
        for m in ok:
            met = m.content["metrics"]
            rec = {"partition": int(met["partition-id"]), "node": int(m.metadata.src_node_id),
                   "upload_bytes": payload_bytes(m.content["arrays"].values()), "download_bytes": down,
                   "examples": int(met["num-examples"])}
            if "epsilon" in met:
                rec["epsilon"] = float(met["epsilon"])
            clients.append(rec)
        clients.sort(key=lambda c: c["partition"])
        save_tensors(rounds / f"global_{r:03d}.safetensors", state)
        record = {"round": r, "accuracy": acc, "clients": clients, "failed": failed, "timed_out": missing,
                  "seconds": time.perf_counter() - t0}
        write_json(rounds / f"round_{r:03d}.json", record)
        log.info("round %d/%d: global test accuracy %.4f, %d clients, %.1f s", r, cfg.rounds, acc, len(ok),
                 record["seconds"])


def _last_line(reason: str) -> str:
    """The message of a client's failure (Flower forwards the whole remote traceback)."""
    lines = [x.strip() for x in reason.replace("\\n", "\n").splitlines() if x.strip()]
    return (lines[-1] if lines else reason)[:300]


def _run_dir(context, default: Path | None) -> Path:
    rd = context.run_config.get("run-dir") if context.run_config else None
    if rd:
        return Path(str(rd))
    if default is None:
        raise DistillError("the Flower run config has no 'run-dir'; pass --run-config \"run-dir='FOLDER'\" to flwr "
                           "run (a folder prepared by distillset federated).")
    return default


def make_server_app(run_dir: Path | None = None):
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        serve(grid, _run_dir(context, run_dir))

    return app


def make_client_app(run_dir: Path | None = None):
    from flwr.clientapp import ClientApp

    ArrayRecord, _, Message, _, MetricRecord, RecordDict = _flwr()
    app = ClientApp()

    @app.train()
    def train(msg, context):
        folder = _run_dir(context, run_dir)
        cfg = load_config(folder)
        client = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        state = msg.content["arrays"].to_torch_state_dict()
        work = context.node_config.get("work-dir")
        up, metrics = client_update(cfg, folder, client, server_round, state, Path(str(work)) if work else None)
        content = RecordDict({"arrays": ArrayRecord(up), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


def simulate(run_dir: Path, cfg: FederatedConfig) -> None:
    """Run the remaining rounds in Flower's simulation runtime (Ray), one process per concurrent client."""
    _flwr()
    from flwr.simulation import run_simulation

    run_dir = Path(run_dir).resolve()
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cfg.num_cpus, "include_dashboard": False}}
    run_simulation(server_app=make_server_app(run_dir), client_app=make_client_app(run_dir),
                   num_supernodes=cfg.clients, backend_config=backend)
    done = len(list((run_dir / "rounds").glob("round_*.json")))
    if done < cfg.rounds:
        raise DistillError(f"the federated run stopped after {done} of {cfg.rounds} rounds (see the log above); "
                           "re-run the same command to resume.")


def run(cfg: FederatedConfig, rt=None) -> dict:
    """``distillset federated``: prepare the run folder and run the rounds in Flower's simulation (finished rounds
    are skipped), then write metrics.csv, results.json and the accuracy-vs-bytes plot."""
    t0 = time.perf_counter()
    out = prepare(cfg)
    if cfg.prepare_only:
        log.info("federated: %s is prepared; run it with `flwr run %s CONNECTION` (SuperNodes with --node-config "
                 "partition-id=0..%d)", out, out / "flower_app", cfg.clients - 1)
        return {"prepared": str(out), "flower_app": str(out / "flower_app")}
    done = len(round_records(out))
    if done < cfg.rounds:
        if done:
            log.info("federated: rounds 1-%d are finished in %s; resuming at round %d", done, out, done + 1)
        simulate(out, cfg)
    result = summarise(out, cfg, time.perf_counter() - t0)
    log.info("federated %s: %d rounds, accuracy %.4f, %d bytes uploaded in total", cfg.method, result["rounds"],
             result["accuracy"] or 0.0, result["total_upload_bytes"])
    return result


def _module_app(factory):
    """An app a Flower App (pyproject components) names: it reads ``run-dir`` from the run config."""
    try:
        return factory()
    except (DistillError, ImportError):  # Flower is an optional extra: the module still imports without it
        return None


server_app = _module_app(make_server_app)
client_app = _module_app(make_client_app)
