"""distillset federated: non-IID splits, byte accounting, the RDP accountant, DM's networks around given weights and
its Gaussian mechanism, the server's rounds (failures, resume after a kill), Flower's simulation and one deployment
(SuperLink + SuperNodes as separate processes on localhost)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distillset.core.errors import DistillError
from distillset.core.io import load_tensors, read_json, save_tensors
from distillset.launch.fed_parts import (
    class_counts,
    dirichlet_split,
    dp_epsilon,
    iid_split,
    pathological_split,
    payload_bytes,
)
from distillset.launch.federated import FederatedConfig, prepare, round_records
from tests.procs import free_port

flwr = pytest.importorskip("flwr", reason="the federated extra (flwr) is not installed")

LABELS = np.repeat(np.arange(10), 50)  # 500 images, 50 per class


def tiny(tmp_path: Path, **kw) -> FederatedConfig:
    """A digits run that takes seconds: 3 clients, 8-channel ConvNet, 2 images per class, 5 DM steps."""
    base = {"out": str(tmp_path / "run"), "data": "digits", "clients": 3, "rounds": 2, "width": 8, "ipc": 2, "iterations": 5,
                "batch_real": 16, "server_epochs": 2, "test_size": 300}
    return FederatedConfig(**{**base, **kw})


def test_dirichlet_is_a_seeded_partition_whose_skew_follows_alpha():
    a = dirichlet_split(LABELS, 5, 0.5, seed=1)
    assert [x.tolist() for x in a] == [x.tolist() for x in dirichlet_split(LABELS, 5, 0.5, seed=1)]
    assert [x.tolist() for x in a] != [x.tolist() for x in dirichlet_split(LABELS, 5, 0.5, seed=2)]
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(len(LABELS))) and min(map(len, a)) > 0

    def classes_held(alpha):
        return np.mean([(c > 0).sum() for c in class_counts(LABELS, dirichlet_split(LABELS, 5, alpha, 0), 10)])

    assert classes_held(0.05) < classes_held(1.0) < classes_held(100.0) + 1e-9
    assert classes_held(100.0) == 10


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_alpha_must_be_positive(alpha):
    with pytest.raises(DistillError, match="alpha must be a finite number > 0"):
        dirichlet_split(LABELS, 5, alpha, 0)


def test_more_clients_than_images_is_a_clear_error():
    for fn in (lambda: dirichlet_split(LABELS[:4], 5, 0.5, 0), lambda: pathological_split(LABELS[:4], 5, 1, 0),
               lambda: iid_split(LABELS[:4], 5, 0)):
        with pytest.raises(DistillError, match="5 clients but only 4 training images"):
            fn()


def test_pathological_gives_every_client_exactly_k_classes():
    parts = pathological_split(LABELS, 10, 2, seed=3)
    counts = class_counts(LABELS, parts, 10)
    assert ((counts > 0).sum(1) == 2).all()
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))  # 10 x 2 slots cover the classes
    assert [p.tolist() for p in parts] == [p.tolist() for p in pathological_split(LABELS, 10, 2, seed=3)]
    with pytest.raises(DistillError, match="classes_per_client must be between 1 and the 10"):
        pathological_split(LABELS, 10, 11, 0)


def test_payload_bytes_is_numel_times_element_size():
    from flwr.app import ArrayRecord

    rec = ArrayRecord({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4).long(),
                       "w": torch.zeros(3, 5)})
    assert payload_bytes(rec.values()) == 4 * 64 + 4 * 8 + 15 * 4
    assert payload_bytes([np.zeros((2, 3), np.float16)]) == 12


def test_dp_epsilon_is_finite_and_grows_with_rounds_and_shrinks_with_noise():
    e1, e5 = dp_epsilon(1.0, 0.1, 100, 1e-5), dp_epsilon(1.0, 0.1, 500, 1e-5)
    assert 0 < e1 < e5 < float("inf")
    assert dp_epsilon(2.0, 0.1, 100, 1e-5) < e1
    assert dp_epsilon(0.0, 0.1, 100, 1e-5) == float("inf")
    with pytest.raises(DistillError, match="sample_rate"):
        dp_epsilon(1.0, 1.5, 10, 1e-5)


def test_dm_networks_start_from_base_weights_then_perturb(tmp_path):
    from distillset.recover.base import Context
    from distillset.recover.objectives.model_aug import NetConfig, build_net

    ctx = Context(device=torch.device("cpu"), classes=torch.zeros(1).long(), num_classes=10, image_shape=(1, 8, 8),
                  generator=torch.Generator().manual_seed(0))
    ref = build_net("convnet", ctx, 123, width=8)
    save_tensors(tmp_path / "w.safetensors", ref.state_dict())
    same = NetConfig(width=8, base_weights=str(tmp_path / "w.safetensors")).net_source().sample(ctx)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), ref.state_dict().values()))
    near = NetConfig(width=8, base_weights=str(tmp_path / "w.safetensors"), perturb=0.1).net_source().sample(ctx)
    w0, w1 = ref.state_dict(), near.state_dict()
    conv = next(k for k, v in w0.items() if v.ndim == 4)
    rel = float((w1[conv] - w0[conv]).norm() / w0[conv].norm())
    assert 0.05 < rel < 0.2  # filter-wise: 0.1 of each filter's norm
    fewer = Context(**{**ctx.__dict__, "num_classes": 3})  # a client with 3 classes: the classifier stays random
    net = NetConfig(width=8, base_weights=str(tmp_path / "w.safetensors")).net_source().sample(fewer)
    assert torch.equal(net.state_dict()[conv], w0[conv])
    save_tensors(tmp_path / "w16.safetensors", build_net("convnet", ctx, 1, width=16).state_dict())
    with pytest.raises(DistillError, match="do not fit a convnet of width 8"):
        NetConfig(width=8, base_weights=str(tmp_path / "w16.safetensors")).net_source().sample(ctx)
    with pytest.raises(DistillError, match="set only one"):
        NetConfig(base_weights=str(tmp_path / "w.safetensors"), model_pool=2)
    with pytest.raises(DistillError, match="is not a file"):
        NetConfig(base_weights=str(tmp_path / "none.safetensors"))


def test_dm_gaussian_mechanism_clips_each_embedding_and_adds_calibrated_noise():
    from distillset.recover.base import Context, get

    ctx = Context(device=torch.device("cpu"), classes=torch.zeros(1).long(), num_classes=2, image_shape=(1, 8, 8),
                  generator=torch.Generator().manual_seed(0))
    emb = torch.full((50, 4), 10.0)  # norm 20 each: clipped to 1
    exact = get("objective", "dm").from_options(width=8, dp_noise=1e-9, dp_clip=1.0)._real_mean(emb, ctx)
    assert torch.allclose(exact, torch.full((4,), 0.5), atol=1e-6)  # unit vectors (0.5, 0.5, 0.5, 0.5), mean
    noisy = get("objective", "dm").from_options(width=8, dp_noise=2.0, dp_clip=1.0)
    draws = torch.stack([noisy._real_mean(emb, ctx) for _ in range(2000)])
    assert abs(float(draws.std()) - 2.0 / 50) < 0.004  # sum noise std = noise x clip, over the batch of 50
    assert torch.equal(get("objective", "dm").from_options(width=8)._real_mean(emb, ctx), emb.mean(0))
    with pytest.raises(DistillError, match="dp_noise must be >= 0"):
        get("objective", "dm").from_options(dp_noise=-1.0)


def test_config_refuses_bad_combinations(tmp_path):
    for kw, pattern in [({"method": "coreset", "rounds": 2}, "one-shot"),
                        ({"method": "fedavg", "dp_noise": 1.0}, "has none"),
                        ({"dp_noise": 1.0}, "set init: noise"),
                        ({"alpha": 0.0}, "alpha must be > 0"),
                        ({"fail": ["x"]}, "ROUND:CLIENT"),
                        ({"method": "fedsgd"}, "unknown federated method")]:
        with pytest.raises(DistillError, match=pattern):
            tiny(tmp_path, **kw)
    cfg = tiny(tmp_path, clients=5000)
    with pytest.raises(DistillError, match="5000 clients but only"):
        prepare(cfg)


def test_shards_hold_only_the_clients_images_and_the_union_weights_by_counts(tmp_path):
    from distillset.launch.fed_apps import read_shard, union_of_uploads

    cfg = tiny(tmp_path, split="pathological", classes_per_client=2, clients=4)
    run = prepare(cfg)
    split = read_json(run / "split.json")
    counts = np.array(split["counts"])
    for k in range(4):
        local, classes = read_shard(run / "clients" / f"client_{k:03d}.npz")
        assert len(local) == counts[k].sum() and classes.tolist() == np.nonzero(counts[k])[0].tolist()
        assert local.num_classes == 2  # labels renumbered over the classes it holds
    up = [{"images": torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "labels": torch.tensor([0, 1]),
           "counts": torch.tensor([30, 10])},
          {"images": torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "labels": torch.tensor([0, 0])}]
    _, labels, w = union_of_uploads(up, ipc=1)
    assert labels.tolist() == [0, 1, 0, 0] and torch.allclose(w, torch.tensor([30, 10, 1, 1.0]) / 10.5)
    with pytest.raises(DistillError, match="another config"):
        prepare(tiny(tmp_path, split="pathological", classes_per_client=3, clients=4))


def test_a_client_distils_only_the_classes_it_holds(tmp_path):
    """A client without images of most classes uploads images of its own classes only (global labels, counts zero
    elsewhere); a class below min_class_images is left out too, and DP uploads no counts but reports epsilon."""
    from distillset.launch.fed_apps import client_update, initial_state

    cfg = tiny(tmp_path, split="pathological", classes_per_client=2, clients=4, iterations=2)
    run = prepare(cfg)
    split = read_json(run / "split.json")
    counts = np.array(split["counts"])
    state = initial_state(cfg, 10, split["image_shape"])
    up, met = client_update(cfg, run, 1, 1, state)
    held = np.nonzero(counts[1])[0]
    assert sorted(set(up["labels"].tolist())) == held.tolist() and len(up["labels"]) == 2 * len(held)
    assert up["images"].dtype == torch.uint8 and up["counts"].tolist() == counts[1].tolist()
    assert met["num-examples"] == counts[1].sum() and "epsilon" not in met
    few = tiny(tmp_path, split="pathological", classes_per_client=2, clients=4, iterations=2,
               min_class_images=int(counts[1][held].max()))  # only the larger of its two classes qualifies
    up, _ = client_update(few, run, 1, 1, state, work=tmp_path / "few")  # its own DM folder: another config
    assert set(up["labels"].tolist()) == {int(held[np.argmax(counts[1][held])])}
    dp = tiny(tmp_path, split="pathological", classes_per_client=2, clients=4, iterations=2, dp_noise=1.0,
              init="noise")
    up, met = client_update(dp, run, 2, 1, state, work=tmp_path / "dp")
    assert "counts" not in up and 0 < met["epsilon"] < float("inf")


class LocalGrid:
    """A Grid that answers every message by calling the client update in-process (the server loop without Flower's
    runtime): node n is partition n; ``die_in`` raises (a killed server) when that round is sent."""

    def __init__(self, cfg, run, die_in: int = 0):
        self.cfg, self.run, self.die_in = cfg, run, die_in

    def get_node_ids(self):
        return list(range(self.cfg.clients))

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

        from distillset.launch.fed_apps import client_update

        out = []
        for m in messages:
            r = int(m.content["config"]["server-round"])
            if r == self.die_in:
                raise KeyboardInterrupt("server killed")
            try:
                up, met = client_update(self.cfg, self.run, m.metadata.dst_node_id, r,
                                        m.content["arrays"].to_torch_state_dict())
                reply = Message(RecordDict({"arrays": ArrayRecord(up), "metrics": MetricRecord(met)}), reply_to=m)
            except RuntimeError as e:
                reply = Message(Error(code=0, reason=str(e)), reply_to=m)
            out.append(reply)
        return out


def test_server_records_failures_and_resumes_after_a_kill(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from distillset.launch.fed_apps import serve

    for attr in ("_run_id", "_task_id", "_node_id"):  # what Flower's runtime sets in the ServerApp's process
        monkeypatch.setattr(TaskIdentity, attr, 1)

    cfg = tiny(tmp_path, rounds=3, fail=["2:1"])
    run = prepare(cfg)
    with pytest.raises(KeyboardInterrupt):
        serve(LocalGrid(cfg, run, die_in=2), run)
    recs = round_records(run)
    assert [r["round"] for r in recs] == [1]
    first = load_tensors(run / "rounds" / "global_001.safetensors")
    serve(LocalGrid(cfg, run), run)  # resumes at round 2 from the recorded weights
    recs = round_records(run)
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(first.values(),
                                                  load_tensors(run / "rounds" / "global_001.safetensors").values()))
    assert [c["partition"] for c in recs[1]["clients"]] == [0, 2] and "dropped in round 2" in recs[1]["failed"][0][
        "reason"]
    assert len(recs[2]["clients"]) == 3
    n_img = sum(c["upload_bytes"] for c in recs[0]["clients"])
    assert n_img > 0 and recs[0]["clients"][0]["download_bytes"] == payload_bytes(first.values())


def test_simulation_two_rounds_three_clients_writes_metrics_and_reruns_skip(tmp_path):
    from distillset.launch.fed_apps import run

    cfg = tiny(tmp_path, fail=["2:1"])
    t0 = time.perf_counter()
    res = run(cfg)
    assert res["rounds"] == 2 and 0.0 <= res["accuracy"] <= 1.0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("round,accuracy,clients_ok,clients_failed") and len(rows) == 3
    assert rows[2].split(",")[2:4] == ["2", "1"]  # round 2 went on without the dropped client
    recs = round_records(tmp_path / "run")
    for c in recs[0]["clients"]:  # uint8 images + int64 labels + int64 counts of the 10 classes
        shard = np.load(tmp_path / "run" / "clients" / f"client_{c['partition']:03d}.npz")
        held = len(np.unique(shard["y_train"]))
        assert c["upload_bytes"] == held * 2 * 64 + held * 2 * 8 + 10 * 8
    assert (tmp_path / "run" / "accuracy_vs_bytes.png").stat().st_size > 0
    t1 = time.perf_counter()
    again = run(cfg)  # both rounds recorded: no simulation is started
    assert again["accuracy"] == res["accuracy"] and time.perf_counter() - t1 < 0.25 * (t1 - t0)


def _flower_cli(module: str, fn: str, name: str, *args) -> list[str]:
    """Flower's console scripts run by this interpreter (the one that imports this worktree's distillset)."""
    return [sys.executable, "-c", f"import sys; from {module} import {fn}; sys.argv[0] = {name!r}; sys.exit({fn}())",
            *args]


def test_deployment_superlink_and_supernodes_on_localhost(tmp_path):
    """One round of FedAvg with the same apps in Flower's deployment runtime: a SuperLink and two SuperNodes as
    separate processes, the run submitted with ``flwr run`` to the Flower App folder the run folder holds."""
    pytest.importorskip("flwr.superlink.cli", reason="Flower's SuperLink is not installed")
    cfg = tiny(tmp_path, method="fedavg", clients=2, rounds=1, timeout=120)
    run = prepare(cfg)
    bin_dir = tmp_path / "bin"  # the SuperLink/SuperNode start flwr-serverapp/flwr-clientapp by name: this Python
    bin_dir.mkdir()
    for name, mod, fn in [("flwr-serverapp", "flwr.superlink.cli", "flwr_serverapp"),
                          ("flwr-clientapp", "flwr.supernode.cli", "flwr_clientapp"),
                          ("flower-superexec", "flwr.supercore.cli", "flower_superexec")]:
        (bin_dir / name).write_text(f"#!{sys.executable}\nimport sys\nfrom {mod} import {fn}\nsys.argv[0] = "
                                    f"{name!r}\nsys.exit({fn}())\n")
        (bin_dir / name).chmod(0o755)
    port = free_port()
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(home),
           "OMP_NUM_THREADS": "1"}
    logs, procs = tmp_path / "logs", []
    logs.mkdir()

    def start(name: str, cmd: list[str]) -> None:
        with open(logs / f"{name}.log", "w") as f:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))

    try:
        start("superlink", _flower_cli("flwr.superlink.cli", "flower_superlink", "flower-superlink", "--insecure",
                                       "--host", "127.0.0.1", "--port", str(port),
                                       "--disable-runtime-dependency-installation"))
        for k in range(2):
            start(f"supernode{k}", _flower_cli("flwr.supernode.cli", "flower_supernode", "flower-supernode",
                                               "--insecure", "--superlink", f"127.0.0.1:{port}", "--port",
                                               str(free_port()), "--node-config",
                                               f"partition-id={k} num-partitions=2"))
        deadline = time.time() + 60
        while True:  # the CLI does not retry: wait until the SuperLink listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or procs[0].poll() is not None:
                    pytest.fail(f"the SuperLink did not start: {(logs / 'superlink.log').read_text()[-2000:]}")
                time.sleep(0.3)
        r = subprocess.run(_flower_cli("flwr.cli.app", "app", "flwr", "run", str(run / "flower_app"), "local-test",
                                       "--stream"), env=env, check=False, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        recs = round_records(run)
        assert len(recs) == 1 and [c["partition"] for c in recs[0]["clients"]] == [0, 1], r.stdout[-3000:]
        assert recs[0]["clients"][0]["upload_bytes"] == recs[0]["clients"][0]["download_bytes"]  # FedAvg: weights
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_cli_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distillset.launch.cli", "federated", "--alpha", "0", "--out",
                        str(tmp_path / "x")], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "alpha must be > 0" in r.stderr
    assert "Traceback" not in r.stderr
