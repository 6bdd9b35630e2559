"""Federated learning through distilled data: FedAvg vs FedDM vs a one-shot real coreset (and FedDM + DP), on Flower.

Every row is a full ``distillset federated`` run in Flower's simulation (10 clients, Dirichlet label skew): final
global test accuracy, bytes the clients uploaded in total, time in rounds, and for DP the largest client epsilon. The
accuracy-vs-uploaded-bytes curves of all methods go into one PNG per (data, alpha).

    OMP_NUM_THREADS=1 python benchmarks/federated.py --data mnist --alphas 0.5 0.1
    OMP_NUM_THREADS=1 python benchmarks/federated.py --data cifar10 --alphas 0.5 0.1 --dp-alpha -1

Results: a table on stdout, ``benchmarks/results/federated_<data>.md`` and ``benchmarks/results/federated_<data>_
alpha<A>.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from distillset.launch.fed_apps import run
from distillset.launch.federated import FederatedConfig, plot_curves

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"

# per data set: (train images used, test images, DM iterations, server epochs, FedAvg rounds, FedDM rounds)
BUDGET = {"mnist": {"train_size": 10000, "test_size": 2000, "iterations": 30, "server_epochs": 10,
                    "fedavg_rounds": 5, "feddm_rounds": 2, "batch_real": 32},
          "cifar10": {"train_size": 10000, "test_size": 2000, "iterations": 30, "server_epochs": 10,
                      "fedavg_rounds": 5, "feddm_rounds": 2, "batch_real": 32}}


def rows_for(alpha: float, dp: bool, b: dict) -> list[tuple[str, dict]]:
    rows = [("fedavg", {"method": "fedavg", "rounds": b["fedavg_rounds"]}),
            ("feddm", {"method": "feddm", "rounds": b["feddm_rounds"]}),
            ("coreset (one-shot)", {"method": "coreset", "rounds": 1})]  # FedDM's round 1 is one-shot FedDM
    if dp:  # DP needs init noise: the same without DP separates the cost of the init from the cost of the noise
        rows += [("feddm (init noise)", {"method": "feddm", "rounds": b["feddm_rounds"], "init": "noise"}),
                 ("feddm + DP sigma 1", {"method": "feddm", "rounds": b["feddm_rounds"], "dp_noise": 1.0, "dp_clip": 1.0,
                                 "init": "noise"}),
                 ("feddm + DP sigma 3", {"method": "feddm", "rounds": b["feddm_rounds"], "dp_noise": 3.0,
                                         "dp_clip": 1.0, "init": "noise"})]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mnist", choices=sorted(BUDGET))
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.1])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--dp-alpha", type=float, default=0.5, help="the alpha at which the DP variant also runs")
    p.add_argument("--root", default="/tmp/distillset_federated_bench")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fedavg-rounds", type=int, default=0,
                   help="FedAvg rounds (default: the budget's); more rounds continue a finished run")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distillset.federated").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    b = dict(BUDGET[args.data])
    b["fedavg_rounds"] = args.fedavg_rounds or b["fedavg_rounds"]
    data = f"npz:{SHARED / (args.data + '.npz')}"
    table = []
    for alpha in args.alphas:
        curves = {}
        for name, over in rows_for(alpha, alpha == args.dp_alpha, b):
            folder = "feddm + DP" if name == "feddm + DP sigma 1" else name  # the folder of the first DP run
            out = Path(args.root) / args.data / f"alpha{alpha}" / folder.replace(" ", "_").replace("(", "").replace(
                ")", "").replace("+", "plus")
            cfg = FederatedConfig(out=str(out), data=data, clients=args.clients, split="dirichlet", alpha=alpha,
                                  train_size=b["train_size"], test_size=b["test_size"], width=args.width,
                                  ipc=args.ipc, iterations=b["iterations"], server_epochs=b["server_epochs"],
                                  batch_real=b["batch_real"], threads=args.threads, **over)
            res = run(cfg)  # a finished row (its rounds recorded) is read back, not recomputed
            curves[name] = [(r["total_upload_bytes"], r["accuracy"]) for r in res["per_round"]]
            eps = max(res["epsilon"].values()) if res["epsilon"] else None
            table.append({"alpha": alpha, "method": name, "rounds": res["rounds"], "accuracy": res["accuracy"],
                          "upload_MB": res["total_upload_bytes"] / 1e6,
                          "download_MB": res["total_download_bytes"] / 1e6,
                          "round_s": sum(r["seconds"] for r in res["per_round"]), "epsilon": eps,
                          "curve": curves[name]})
            print(json.dumps({k: v for k, v in table[-1].items() if k != "curve"}), flush=True)
        plot_curves(RESULTS / f"federated_{args.data}_alpha{alpha}.png", curves,
                    f"{args.data}, {args.clients} clients, Dirichlet {alpha}")
    setup = (f"{b['train_size']} training images split among the clients, global model convnet width {args.width} "
             f"scored on {b['test_size']} random test images; FedDM/coreset ipc {args.ipc} per class a client holds; "
             f"DM {b['iterations']} steps (batch_real {b['batch_real']}, init real; DP rows: init noise, clip 1, the "
             f"noise multiplier named) per client and round; server {b['server_epochs']} epochs on the union; FedAvg "
             "1 local epoch per round. Machine: 2-core CPU, shared; one torch thread; Flower simulation (Ray, 1 CPU).")
    head = ("| alpha | method | rounds | accuracy | uploaded MB | downloaded MB | round time s | max client epsilon "
            "(delta 1e-5) |")
    lines = [f"# Federated: {args.data}, {args.clients} clients, Dirichlet label skew", "", setup, "", head,
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "-"
        lines.append(f"| {r['alpha']} | {r['method']} | {r['rounds']} | {r['accuracy']:.4f} | {r['upload_MB']:.3f} | "
                     f"{r['download_MB']:.3f} | {r['round_s']:.0f} | {eps} |")
    lines += ["", "Accuracy after each round against the cumulative uploaded bytes:", ""]
    for r in table:
        pts = ", ".join(f"{x / 1e6:.3f} MB: {a:.3f}" for x, a in r["curve"])
        lines.append(f"- alpha {r['alpha']} {r['method']}: {pts}")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"federated_{args.data}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
