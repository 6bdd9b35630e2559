"""Vision-language distillation (bi-trajectory matching) on the tiny Flickr fixture: sources, tokenizer, model,
experts, the objective's gradients and descent, 2 processes = 1, retrieval recall, export, bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distillset.core.errors import DistillError
from distillset.core.pairs import load_pairs
from tests.procs import free_port

FLICKR = f"npz:{Path(__file__).parent / 'assets' / 'flickr_small.npz'}"
SMALL = {"vocab_size": 300, "context_length": 24, "model_kwargs": {"width": 16}, "text_width": 32, "text_heads": 2,
         "embed_dim": 32, "clip_epochs": 2, "clip_batch": 32, "num_experts": 2, "expert_epochs": 6, "expert_batch": 32}
OPTS = {"syn_steps": 4, "max_start_epoch": 3, "expert_epochs": 2, "experts_per_step": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from distillset.launch.vl import VLTrainConfig, run_train

    out = tmp_path_factory.mktemp("vl") / "model"
    run_train(VLTrainConfig(out=str(out), data=FLICKR, **SMALL))
    return out


def _objective(trained: Path, **opts):
    from distillset.core.config import from_dict
    from distillset.launch.vl import load_trained
    from distillset.recover.objectives.bimtt import BiTrajectoryMatching
    from distillset.squeeze.trajectories import load_buffers

    model, _, feats, experts = load_trained(trained)
    obj = BiTrajectoryMatching(from_dict(BiTrajectoryMatching.Config, {**OPTS, **opts}))
    obj.setup_pairs(model, load_buffers(experts), "cpu")
    return obj, model, feats


# ------------------------------------------------------------------------------------------------------- sources


def test_caption_sources_npz_folder_and_wds_agree(tmp_path):
    from distillset.core.data import encode_png, write_tar

    s = load_pairs(FLICKR, "train")
    assert len(s) == 64 and s.image_shape == (3, 32, 32) and all(len(c) == 5 for c in s.captions)
    assert len(load_pairs(FLICKR, "test", image_size=16)) == 32
    assert load_pairs(FLICKR, "test", image_size=16).image_shape == (3, 16, 16)
    sub = s.subset(range(6))
    (tmp_path / "f" / "train").mkdir(parents=True)
    rows = []
    for i in range(6):
        png = encode_png(sub.images[i])
        (tmp_path / "f" / "train" / f"im{i}.png").write_bytes(png)
        (tmp_path / "f" / "train" / f"im{i}.txt").write_text("\n".join(sub.captions[i]) + "\n")
        rows.append((f"im{i}", {"png": png, "txt": "\n".join(sub.captions[i]).encode()}))
    write_tar(tmp_path / "w" / "train-000000.tar", rows)
    for spec in (f"folder:{tmp_path / 'f'}", f"wds:{tmp_path / 'w'}"):
        p = load_pairs(spec, "train")
        assert torch.equal(p.images, sub.images) and p.captions == sub.captions, spec


def test_missing_or_empty_captions_are_one_line_errors(tmp_path):
    from distillset.core.data import encode_png, write_tar

    s = load_pairs(FLICKR, "train").subset(range(3))
    root = tmp_path / "f" / "train"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"im{i}.png").write_bytes(encode_png(s.images[i]))
    (root / "im0.txt").write_text("a dog runs\n")
    (root / "im1.txt").write_text("a cat\n")
    with pytest.raises(DistillError, match="im2.png has no caption file im2.txt"):
        load_pairs(f"folder:{tmp_path / 'f'}")
    (root / "im2.txt").write_text("a bird\n\nsecond caption after a blank line\n")
    with pytest.raises(DistillError, match="im2.txt has an empty caption line"):
        load_pairs(f"folder:{tmp_path / 'f'}")
    write_tar(tmp_path / "w" / "train-000000.tar", [("a", {"png": encode_png(s.images[0])})])
    with pytest.raises(DistillError, match="sample 'a' has no caption"):
        load_pairs(f"wds:{tmp_path / 'w'}")
    z = dict(np.load(FLICKR.removeprefix("npz:")))
    caps = z["captions_train"].copy()
    caps[5, 2] = "  "
    np.savez(tmp_path / "empty.npz", **{**z, "captions_train": caps})
    with pytest.raises(DistillError, match="caption 2 of image 5 .* is empty"):
        load_pairs(f"npz:{tmp_path / 'empty.npz'}")
    np.savez(tmp_path / "nocap.npz", x_train=z["x_train"], x_test=z["x_test"])
    with pytest.raises(DistillError, match="has no captions_train"):
        load_pairs(f"npz:{tmp_path / 'nocap.npz'}")
    np.savez(tmp_path / "short.npz", **{**z, "captions_train": caps[:10]})
    with pytest.raises(DistillError, match="one row of captions per image"):
        load_pairs(f"npz:{tmp_path / 'short.npz'}")
    with pytest.raises(DistillError, match="not an image-caption source"):
        load_pairs("digits")


# -------------------------------------------------------------------------------------------- tokenizer and model


def test_tokenizer_model_round_trip_and_foreign_tokenizer(trained, tmp_path):
    from distillset.launch.vl import VLTrainConfig, run_train
    from distillset.squeeze.clip import CaptionTokenizer, encode_texts, load_clip

    model, tok, meta = load_clip(trained / "clip")
    assert model.text.vocab_size == tok.vocab_size <= 300 and len(meta["losses"]) == 2
    texts = load_pairs(FLICKR, "test").captions[0]
    ids = tok.encode(texts)
    assert ids.shape == (5, 24) and (ids[:, 0] == 2).all() and ((ids == 3).sum(1) == 1).all()  # [SOS] .. [EOS]
    emb = encode_texts(model, tok, texts)
    assert emb.shape == (5, 32) and torch.isfinite(emb).all()
    other = CaptionTokenizer.train(["0 1 2 3 4 5 6 7 8 9"] * 50, 40, 24)
    other.tok.save(str(tmp_path / "digits_tokenizer.json"))
    with pytest.raises(DistillError, match="unknown to the tokenizer; it was trained on other data"):
        run_train(VLTrainConfig(out=str(tmp_path / "m"), data=FLICKR, tokenizer=str(tmp_path / "digits_tokenizer.json"),
                                **SMALL))
    assert not (tmp_path / "m" / "clip").exists()
    # a model folder whose tokenizer was swapped for another is refused, not silently mis-tokenised
    import shutil

    shutil.copytree(trained / "clip", tmp_path / "swapped")
    (tmp_path / "swapped" / "tokenizer.json").write_text(other.to_json())
    with pytest.raises(DistillError, match="not the tokenizer this model was trained with"):
        load_clip(tmp_path / "swapped")


def test_experts_are_mtt_buffers_of_the_heads(trained):
    from distillset.squeeze.trajectories import load_buffers

    ex = load_buffers(trained / "experts")
    assert len(ex.trajectories) == 2 and ex.epochs == 6 and ex.meta["arch"] == "clip_heads"
    kw = ex.meta["model_kwargs"]
    assert ex.num_params == (kw["image_dim"] + 1 + kw["text_dim"] + 1) * kw["embed_dim"]
    steps = (ex.trajectories[0][1:] - ex.trajectories[0][:-1]).norm(dim=1)
    assert (steps > 0).all()  # the heads moved every epoch


# ------------------------------------------------------------------------------------------------- the objective


def test_gradients_reach_pixels_text_and_step_size(trained):
    from distillset.recover.objectives.bimtt import PairParams

    obj, model, feats = _objective(trained)
    imgs = load_pairs(FLICKR, "train").images[:8].float() / 255
    syn = PairParams(imgs, feats["train_text"][:8, 0])
    loss = obj.step_loss(syn, 0, 0)
    loss.backward()
    assert loss.item() > 0
    for name, g in (("pixels", syn.pixels.grad), ("text", syn.text.grad), ("lr", obj.syn_lr.grad)):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())  # the towers stay frozen


def test_trajectory_loss_falls_and_distilled_pairs_are_written(trained, tmp_path):
    from distillset.launch.vl import VLDistillConfig, run_distill
    from distillset.recover.objectives.bimtt import PairParams
    from distillset.squeeze.clip import check_text_width

    cfg = VLDistillConfig(out=str(tmp_path / "d"), model=str(trained), pairs=8, iterations=25, lr_image=0.02,
                          lr_text=0.05, options=OPTS)
    run_distill(cfg)
    from distillset.launch.vl import load_distilled_pairs

    t, manifest = load_distilled_pairs(tmp_path / "d")
    assert t["images"].shape == (8, 3, 32, 32) and t["images"].dtype == torch.uint8 and manifest["pairs"] == 8
    check_text_width(t["text"], 32, "test")
    obj, _, feats = _objective(trained)
    imgs = load_pairs(FLICKR, "train").images
    start = PairParams(imgs[t["init_index"]].float() / 255, feats["train_text"][t["init_index"], t["init_caption"]])
    end = PairParams(t["pixels"], t["text"])
    obj.syn_lr.data = t["lr"][0]  # both sets scored with the learned step size, on the same 6 fixed draws
    before = [obj.step_loss(start, s, 99).item() for s in range(6)]  # the inner steps need autograd
    after = [obj.step_loss(end, s, 99).item() for s in range(6)]
    assert np.mean(after) < 0.8 * np.mean(before), (before, after)
    assert run_distill(cfg) == manifest["metrics"]  # a finished run is skipped
    with pytest.raises(DistillError, match="another config"):
        run_distill(VLDistillConfig(**{**cfg.__dict__, "iterations": 3}))


def _distill_in_process(out: str, model: str) -> None:
    from accelerate.state import AcceleratorState, PartialState

    from distillset.core import runtime
    from distillset.launch.vl import VLDistillConfig, run_distill

    # a process of the launcher starts its own runtime and accelerate state
    runtime._RUNTIME = None
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    torch.set_num_threads(1)
    run_distill(VLDistillConfig(out=out, model=model, pairs=6, iterations=2, optimizer="sgd", lr_image=10.0,
                                lr_text=10.0, lr_lr=1e-4, options=OPTS))


def test_two_processes_distil_the_single_process_pairs(trained, tmp_path):
    import tempfile

    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    from distillset.launch.vl import load_distilled_pairs

    def launch(n: int, out: str) -> None:
        port = free_port()  # other test runs on this host may hold accelerate's default
        # accelerate.debug_launcher with our own port (its own is fixed at 29500); this venv may lack an accelerate
        # executable. Spawned, not forked: a fork of a process that ran torch's thread pools can deadlock, and the
        # 1-process reference runs in a fresh process too, so both sides start from the same library state.
        with tempfile.NamedTemporaryFile() as rdv, patch_environment(
                world_size=n, master_addr="127.0.0.1", master_port=str(port), accelerate_mixed_precision="no",
                accelerate_debug_rdv_file=rdv.name, accelerate_use_cpu="yes", gloo_socket_ifname="lo"):
            start_processes(PrepareForLaunch(_distill_in_process, debug=True), args=(out, str(trained)), nprocs=n,
                            start_method="spawn")

    launch(2, str(tmp_path / "two"))
    launch(1, str(tmp_path / "one"))
    a, ma = load_distilled_pairs(tmp_path / "one")
    b, mb = load_distilled_pairs(tmp_path / "two")
    assert ma["world"] == 1 and mb["world"] == 2
    # pixels: the two halves' summed gradient rounds differently from the whole batch's and lr_image 10 scales it
    # (7.5e-4 measured, while the pixels move by up to ~1); a wrong split (each rank the whole sum) would be ~0.5 off
    assert torch.allclose(a["pixels"], b["pixels"], atol=2e-3) and torch.allclose(a["text"], b["text"], atol=1e-5)
    assert torch.allclose(a["lr"], b["lr"], atol=1e-6)
    assert (a["pixels"] - load_pairs(FLICKR, "train").images[a["init_index"]].float() / 255).abs().max() > 0.1


def test_text_embeddings_of_another_width_are_refused(trained):
    from distillset.recover.objectives.bimtt import PairParams
    from distillset.relabel.retrieval import HeadTraining, evaluate_pairs

    obj, model, feats = _objective(trained)
    syn = PairParams(torch.rand(4, 3, 32, 32), torch.randn(4, 48))
    with pytest.raises(DistillError, match=r"shape \(4, 48\) but the text encoder's width is 32"):
        obj.step_loss(syn, 0, 0)
    dims = {"image_dim": model.visual.dim, "text_dim": 32, "embed_dim": 32}
    with pytest.raises(DistillError, match="width is 32"):
        evaluate_pairs(feats["train_image"][:4], torch.randn(4, 64), feats["test_image"], feats["test_text_flat"],
                       feats["test_owner"], dims, HeadTraining(steps=2), [0])
    with pytest.raises(DistillError, match="4 synthetic images but 3 text embeddings"):
        PairParams(torch.rand(4, 3, 32, 32), torch.randn(3, 32))


def test_lora_experts_match_low_rank_factors(trained, tmp_path):
    import shutil

    from distillset.launch.vl import VLDistillConfig, VLTrainConfig, run_distill, run_train
    from distillset.squeeze.trajectories import load_buffers

    shutil.copytree(trained, tmp_path / "m")  # reuse the trained model and features; only the experts change
    shutil.rmtree(tmp_path / "m" / "experts")
    run_train(VLTrainConfig(out=str(tmp_path / "m"), data=FLICKR, **{**SMALL, "lora_rank": 2}))
    ex = load_buffers(tmp_path / "m" / "experts")
    kw = ex.meta["model_kwargs"]
    assert kw["rank"] == 2
    assert ex.num_params == 2 * (kw["image_dim"] + kw["text_dim"]) + 2 * 2 * kw["embed_dim"] + 2 * kw["embed_dim"]
    m = run_distill(VLDistillConfig(out=str(tmp_path / "d"), model=str(tmp_path / "m"), pairs=6, iterations=3,
                                    options=OPTS))
    assert np.isfinite(m["last_match"])


# ------------------------------------------------------------------------------------------------ evaluation, export


def test_recall_at_k_equals_torchmetrics_hit_rate():
    from torchmetrics.retrieval import RetrievalHitRate

    from distillset.relabel.retrieval import recall_at_k

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    owner = torch.arange(12).repeat_interleave(3)
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(36, 8, generator=g), dim=1)
    ours = recall_at_k(img, txt, owner)
    sim = img @ txt.T
    for k in (1, 5, 10):
        i2t = RetrievalHitRate(top_k=k)(sim.reshape(-1), (owner.view(1, -1) == torch.arange(12).view(-1, 1)).reshape(-1),
                                        indexes=torch.arange(12).repeat_interleave(36))
        t2i = RetrievalHitRate(top_k=k)(sim.T.reshape(-1), (torch.arange(12).view(1, -1) == owner.view(-1, 1)).reshape(-1),
                                        indexes=torch.arange(36).repeat_interleave(12))
        assert abs(ours[f"i2t_r{k}"] - 100 * float(i2t)) < 1e-4 and abs(ours[f"t2i_r{k}"] - 100 * float(t2i)) < 1e-4
    assert 0 < ours["i2t_r1"] < ours["i2t_r10"] <= 100


def test_evaluate_reports_distilled_beside_baselines_and_export(trained, tmp_path):
    from distillset.launch.vl import (
        VLDistillConfig,
        VLEvaluateConfig,
        VLExportConfig,
        run_distill,
        run_evaluate,
        run_export,
    )

    run_distill(VLDistillConfig(out=str(tmp_path / "d"), model=str(trained), pairs=8, iterations=3, options=OPTS))
    res = run_evaluate(VLEvaluateConfig(out=str(tmp_path / "e"), model=str(trained), distilled=[str(tmp_path / "d")],
                                        seeds=[0, 1], steps=20))
    assert set(res) == {"distilled:d", "random:8", "herding:8", "kcenter:8", "full"}
    for r in res.values():
        assert len(r["per_seed"]) == 2 and 0 <= r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] <= 100
    assert (tmp_path / "e" / "results.csv").read_text().count("\n") == 6
    run_export(VLExportConfig(distilled=str(tmp_path / "d"), model=str(trained), out=str(tmp_path / "x")))
    with tarfile.open(tmp_path / "x" / "train-000000.tar") as tar:
        names = tar.getnames()
        emb = np.load(io.BytesIO(tar.extractfile("pair_000000.npy").read()))
        meta = json.loads(tar.extractfile("pair_000000.json").read())
    assert {"pair_000000.png", "pair_000000.txt", "pair_000000.npy"} <= set(names) and len(names) == 8 * 4
    assert emb.shape == (32,) and meta["nearest_caption"] and -1 <= meta["nearest_cosine"] <= 1
    run_export(VLExportConfig(distilled=str(tmp_path / "d"), model=str(trained), out=str(tmp_path / "h"), format="hf"))
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "h"))["train"]
    assert len(ds) == 8 and len(ds[0]["text_embedding"]) == 32 and ds[0]["nearest_caption"] == meta["nearest_caption"]
    with pytest.raises(DistillError, match="already exists"):
        run_export(VLExportConfig(distilled=str(tmp_path / "d"), model=str(trained), out=str(tmp_path / "h")))


def test_nearest_caption_of_a_real_embedding_is_that_caption(trained):
    from distillset.launch.vl import load_trained, nearest_captions

    _, _, feats, _ = load_trained(trained)
    names, sims = nearest_captions(feats["train_text"][[3, 7], [1, 4]], trained)
    caps = load_pairs(FLICKR, "train").captions
    assert names == [caps[3][1], caps[7][4]] and (sims > 0.999).all()


def test_cli_errors_are_one_line(trained, tmp_path, capsys):
    from distillset.launch.cli import main

    assert main(["vl", "distill", "--model", str(trained), "--out", str(tmp_path / "d"), "--pairs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pairs must be >= 2")
    assert main(["vl", "distill", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "d")]) == 2
    assert "is not a `distillset vl train` output" in capsys.readouterr().err


def test_shipped_recipe_runs_at_a_tiny_scale(tmp_path):
    """recipes/vl_flickr8k.yaml, every stage chained (model -> distilled -> evaluate, export), on the fixture."""
    from distillset.launch.recipe import run_recipe

    sets = [f"vl_train.data={FLICKR}", "vl_train.clip_epochs=1", "vl_train.num_experts=1", "vl_train.expert_epochs=4",
            "vl_train.expert_batch=32", "vl_train.clip_batch=32", "vl_train.vocab_size=200",
            "vl_train.model_kwargs={width: 8}", "vl_train.text_width=16", "vl_train.text_heads=2",
            "vl_train.embed_dim=16", "vl_distill.pairs=6", "vl_distill.iterations=2",
            "vl_distill.options={syn_steps: 2, expert_epochs: 2, max_start_epoch: 2}", "vl_evaluate.seeds=[0]",
            "vl_evaluate.steps=5", "vl_evaluate.baselines=[random]"]
    res = run_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / "vl_flickr8k.yaml"), None,
                     str(tmp_path / "r"), sets)["results"]
    assert set(res["vl_evaluate"]) == {"distilled:vl_distill", "random:6"}
    assert res["vl_export"]["pairs"] == 6 and (tmp_path / "r" / "vl_export" / "train-000000.tar").exists()


def test_timm_image_tower_and_local_pretrained_weights(tmp_path):
    """A timm backbone (no download) as the image tower; a user's local backbone weights load into a fresh model."""
    from safetensors.torch import save_file

    from distillset.squeeze.clip import ClipModel, ClipSpec, load_image_weights

    spec = ClipSpec(arch="timm:resnet10t", model_kwargs={}, image_size=32, vocab_size=64, text_width=32,
                    text_heads=2, embed_dim=16, context_length=8)
    a = ClipModel(spec).eval()
    x = torch.rand(2, 3, 32, 32)
    assert a.image_features(x).shape == (2, a.visual.dim) and a.visual.dim == 512
    save_file({k: v.contiguous() for k, v in a.visual.backbone.state_dict().items()}, str(tmp_path / "rn.safetensors"))
    b = ClipModel(spec).eval()
    assert not torch.allclose(a.image_features(x), b.image_features(x))
    load_image_weights(b, str(tmp_path / "rn.safetensors"))
    assert torch.allclose(a.image_features(x), b.image_features(x))
    with pytest.raises(DistillError, match="does not match|shape"):
        load_image_weights(ClipModel(ClipSpec(vocab_size=64, text_width=32, text_heads=2, embed_dim=16,
                                              context_length=8)), str(tmp_path / "rn.safetensors"))
