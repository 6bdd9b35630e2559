"""D4M and Minimax rows of the rectified benchmark, on a latent diffusion prior trained here, beside random real images.

1. Trains a small LD3M prior (AutoencoderKL f4 + class-conditional UNet2DModel, `distillset prior train`) on the
   training split at ``--size`` px, then fine-tunes it (`prior train --finetune minimax --from-prior`) once per
   ``--finetune NAME:LAMBDA_REPR,LAMBDA_DIV`` (``0,0`` = the same extra diffusion steps without the minimax terms, the
   control that separates the terms from more training).
2. Rows, all through `benchmarks/rectified.py`'s machinery (one ConvNet-3 BN teacher, FKD soft labels, the same
   SRe2L-protocol students with soft and hard labels, random real images at the same IPC): ``random``; ``d4m``
   (k-means prototypes of the base prior's latents, img2img); ``sample_base`` (class-conditional DDIM samples of the
   base prior: `recover --method minimax` on the prior that was not fine-tuned); one ``minimax`` row per fine-tuned
   prior.
3. Writes the table with the priors' reconstruction errors and the sample similarities Minimax's terms act on.

    OMP_NUM_THREADS=1 python benchmarks/generative_methods.py --data npz:../shared/data/tinyimagenet10_64.npz

Writes ``benchmarks/results/generative_methods_<data>.md``. Everything is cached under ``--root``: a re-run resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rectified import render, run_row, train_teacher
from distillset.core.runtime import get_runtime
from distillset.generative.train import PriorTrainConfig
from distillset.generative.train import run as train_prior

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_finetune(spec: str) -> tuple[str, float, float]:
    name, _, lams = spec.partition(":")
    try:
        lr, ld = (float(v) for v in lams.split(","))
    except ValueError:
        raise SystemExit(f"--finetune expects NAME:LAMBDA_REPR,LAMBDA_DIV, got {spec!r}") from None
    return name, lr, ld


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=f"npz:{SHARED / 'tinyimagenet10_64.npz'}")
    p.add_argument("--root", default="benchmarks/output/generative_methods")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--teacher-width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=200, help="student epochs (and stored soft-label epochs)")
    p.add_argument("--students", type=int, default=2)
    p.add_argument("--ae-steps", type=int, default=300)
    p.add_argument("--unet-steps", type=int, default=600)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--unet-width", type=int, default=32)
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--memory-size", type=int, default=64)
    p.add_argument("--finetune", action="append", default=[],
                   help="NAME:LAMBDA_REPR,LAMBDA_DIV (default: ft_plain:0,0 minimax:0.002,0.008 minimax_x50:0.1,0.4)")
    p.add_argument("--d4m-strength", type=float, default=0.7)
    p.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rt = get_runtime()
    t_all = time.time()
    tag = Path(a.data.split(":", 1)[-1]).stem
    root = Path(a.root) / f"{tag}_{a.size}"
    base_cfg = PriorTrainConfig(out=str(root / "prior_base"), data=a.data, kind="ld3m", image_size=a.size,
                                autoencoder="kl", down=4, width=a.width, unet_width=a.unet_width,
                                ae_steps=a.ae_steps, unet_steps=a.unet_steps, sample_steps=a.ddim_steps,
                                batch_size=32, lr=2e-3, seed=0)
    priors = {"base": (base_cfg.out, train_prior(base_cfg, rt))}
    for spec in a.finetune or ["ft_plain:0,0", "minimax:0.002,0.008", "minimax_x50:0.1,0.4"]:
        name, lr, ld = parse_finetune(spec)
        cfg = PriorTrainConfig(**{**vars(base_cfg), "out": str(root / f"prior_{name}"), "finetune": "minimax",
                                  "from_prior": base_cfg.out, "finetune_steps": a.finetune_steps,
                                  "minimax_lambda_repr": lr, "minimax_lambda_div": ld,
                                  "memory_size": a.memory_size})
        priors[name] = (cfg.out, {**train_prior(cfg, rt), "lambdas": (lr, ld)})
    teacher = train_teacher(a.data, root, a.teacher_width, a.teacher_epochs, a.size, rt)
    common = {"image_size": a.size}
    rows = [("random", "random", dict(common)),
            ("d4m", "d4m", {**common, "options": {"prior": priors["base"][0], "strength": a.d4m_strength,
                                                  "steps": a.ddim_steps}}),
            ("sample_base", "minimax", {**common, "options": {"prior": priors["base"][0]}})]
    rows += [(name, "minimax", {**common, "options": {"prior": folder}})
             for name, (folder, _) in priors.items() if name != "base"]
    keep = set(a.rows.split(",")) if a.rows else None
    # the random row is the baseline (the same images evaluate would draw): its students are trained once
    table = [run_row(name, method, ov, a.data, root, teacher, a.ipc, a.epochs, a.students, rt, baseline=False)
             for name, method, ov in rows if keep is None or name in keep]
    wall = time.time() - t_all
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/generative_methods.py "
               + " ".join(sys.argv[1:]))
    lines = render(table, a, wall, command)
    lines += ["", (f"Priors ({a.size} px; base: AutoencoderKL f4 width {a.width}, {a.ae_steps} steps + "
                   f"class-conditional UNet2DModel width {a.unet_width}, {a.unet_steps} steps; fine-tuning "
                   f"{a.finetune_steps} steps from it, memory {a.memory_size}; {a.ddim_steps} DDIM steps when "
                   "sampling). Sample similarities: 8 DDIM samples per class, cosine of clean latents; min to real = "
                   "mean over samples of the least similarity to the class's real latents (representativeness raises "
                   "it), max to generated = mean over samples of the largest similarity to another sample of the "
                   "class (diversity lowers it)."), "",
              ("| prior | lambda repr, div | test AE MSE | test LD3M render MSE | train s | min cos to real (base) | "
               "max cos to generated (base) |"), "|---|---|---|---|---|---|---|"]
    for name, (_folder, m) in priors.items():
        lam = "-" if name == "base" else ", ".join(f"{v:g}" for v in m["lambdas"])
        sims = ("-", "-") if name == "base" else (
            f"{m['sample_min_real_cos']:.3f} ({m['base_sample_min_real_cos']:.3f})",
            f"{m['sample_max_gen_cos']:.3f} ({m['base_sample_max_gen_cos']:.3f})")
        lines.append(f"| {name} | {lam} | {m['test_ae_mse']:.4f} | "
                     f"{m['test_ld3m_render_mse']:.4f} | {m.get('seconds', 0):.0f} | {sims[0]} | "
                     f"{sims[1]} |")
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"generative_methods_{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
