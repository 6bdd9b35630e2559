"""Minimax: the representativeness and diversity terms do what they say (on free latents and when they fine-tune a
tiny prior), the fine-tuned folder loads and samples like any LD3M prior through `recover --method minimax` (from the
CLI and the shipped recipe), and bad input is a one-line error that loses nothing."""

from __future__ import annotations

import pytest
import torch

from distillset.core.config import load_yaml
from distillset.core.data import Source
from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError
from distillset.generative.ld3m import build_ld3m
from distillset.generative.minimax import MinimaxTerms, cosine_matrix, diversity, representativeness
from distillset.generative.prior import from_pretrained
from distillset.generative.train import PriorTrainConfig
from distillset.generative.train import run as train_prior
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover

from .conftest import TINY

TINY_PRIOR = {"kind": "ld3m", "flip": False, "batch_size": 32, "width": 8, "unet_width": 8, "down": 2,
              "train_timesteps": 100, "sample_steps": 3, "max_train": 400}


def test_the_terms_move_free_latents_the_way_they_say():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(6, 16, generator=g) + 2.0  # a class's real latents, off the origin
    past = torch.randn(5, 16, generator=g)
    gen0 = torch.randn(4, 16, generator=g)
    # the definitions, against the similarity matrix written out
    sims = cosine_matrix(gen0, real)
    assert torch.allclose(sims[1, 2], torch.nn.functional.cosine_similarity(gen0[1], real[2], dim=0), atol=1e-6)
    assert torch.isclose(representativeness(gen0, real), (1 - sims.min(1).values).mean())
    assert torch.isclose(diversity(gen0, past), cosine_matrix(gen0, past).max(1).values.mean())
    assert float(representativeness(real[:1].repeat(3, 1), real[:1])) == pytest.approx(0.0, abs=1e-6)

    def descend(loss_fn):
        x = gen0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(60):
            opt.zero_grad()
            loss_fn(x).backward()
            opt.step()
        return x.detach()

    pulled = descend(lambda x: representativeness(x, real))
    assert cosine_matrix(pulled, real).min(1).values.mean() > cosine_matrix(gen0, real).min(1).values.mean() + 0.2
    pushed = descend(lambda x: diversity(x, past))
    assert cosine_matrix(pushed, past).max(1).values.mean() < cosine_matrix(gen0, past).max(1).values.mean() - 0.2


def test_memories_are_per_class_fifo_and_read_before_the_batch_is_pushed():
    terms = MinimaxTerms(memory_size=3)
    x0 = torch.randn(4, 2, 3, 3)
    z0 = torch.randn(4, 2, 3, 3)
    y = torch.tensor([0, 0, 1, 1])
    rep, div = terms(x0, z0, y)
    assert float(rep) == 0.0 and float(div) == 0.0  # nothing remembered yet: no term
    rep, div = terms(x0, z0, y)
    # the same predictions again: each one's most similar past prediction is itself, one batch ago
    assert float(div) == pytest.approx(1.0, abs=1e-5)
    expected = sum(representativeness(x0[y == c], z0[y == c]) for c in (0, 1)) / 2
    assert torch.isclose(rep, expected)
    for _ in range(3):
        terms(torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), y)
    assert terms.real.get(0).shape[0] == 3 and terms.generated.get(1).shape[0] == 3  # FIFO of memory_size
    assert terms.real.get(7) is None


@pytest.fixture(scope="module")
def base_prior(tmp_path_factory):
    """A tiny LD3M prior for the digits: an untrained autoencoder, a UNet trained 30 steps on its latents (the
    terms need a UNet whose predictions follow its input a little, not a good one)."""
    folder = tmp_path_factory.mktemp("minimax") / "base"
    train_prior(PriorTrainConfig(out=str(folder), data="digits", ae_steps=0, unet_steps=30, **TINY_PRIOR))
    return folder


def _predictions(folder):
    """Over one fixed noised batch of the digits at t = 90: the mean least similarity of a prediction to its class's
    real latents, and the mean largest similarity to another prediction of its class."""
    from distillset.generative.train import _latents

    prior = from_pretrained(folder, cache=False)
    train = Source("digits").load("train")
    lat, lab = _latents(prior, train, False, "cpu")
    lat = lat * prior.scaling_factor
    g = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(lat), generator=g)[:200]
    z0, y = lat[idx], lab[idx]
    a = prior.alphas_cumprod[90]
    zt = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=g)
    with torch.no_grad():
        eps = prior.unet(zt, torch.full((200,), 90), class_labels=y).sample
    x0 = (zt - (1 - a).sqrt() * eps) / a.sqrt()
    rep = sum(cosine_matrix(x0[y == c], lat[lab == c]).min(1).values.mean() for c in range(10)) / 10
    div = sum((cosine_matrix(x0[y == c], x0[y == c]) - 2 * torch.eye(int((y == c).sum()))).max(1).values.mean()
              for c in range(10)) / 10
    return float(rep), float(div)


@pytest.fixture(scope="module")
def finetuned(base_prior):
    root = base_prior.parent
    out = {}
    for name, lr, ld in (("plain", 0.0, 0.0), ("repr", 5.0, 0.0), ("div", 0.0, 5.0)):
        cfg = PriorTrainConfig(out=str(root / name), data="digits", finetune="minimax", from_prior=str(base_prior),
                               finetune_steps=10, finetune_lr=2e-3, minimax_lambda_repr=lr, minimax_lambda_div=ld,
                               memory_size=16, **TINY_PRIOR)
        out[name] = (root / name, train_prior(cfg), cfg)
    return out


def test_finetuning_raises_representativeness_and_lowers_similarity_as_weighted(finetuned):
    (plain, m_plain, _), (rep_dir, m_rep, _), (div_dir, m_div, _) = (finetuned[k] for k in ("plain", "repr", "div"))
    rep_plain, div_plain = _predictions(plain)
    rep_rep, _ = _predictions(rep_dir)
    _, div_div = _predictions(div_dir)
    # the same steps, batches and noise: only the weighted term differs
    assert rep_rep > rep_plain + 0.02, (rep_plain, rep_rep)
    assert div_div < div_plain - 0.02, (div_plain, div_div)
    assert m_rep["finetune_repr"] > 0 and m_div["finetune_div"] > 0 and m_plain["finetune_diffusion_loss"] > 0
    for m in (m_plain, m_rep, m_div):  # sample similarities before / after are recorded with the prior
        assert {"sample_min_real_cos", "base_sample_min_real_cos", "sample_max_gen_cos"} <= set(m)
    assert m_plain["base_sample_min_real_cos"] == m_rep["base_sample_min_real_cos"]  # same base, same noise


def test_the_finetuned_folder_loads_as_a_prior_and_a_rerun_trains_nothing(finetuned, base_prior):
    folder, metrics, cfg = finetuned["repr"]
    prior = from_pretrained(folder, kind="ld3m", num_classes=10, image_shape=(1, 8, 8), cache=False)
    base = from_pretrained(base_prior, cache=False)
    assert prior.meta["from_prior"] == str(base_prior) and prior.meta["train"]["finetune"] == "minimax"
    assert torch.equal(prior.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)  # the autoencoder is kept
    assert not torch.equal(prior.unet.conv_in.weight, base.unet.conv_in.weight)
    assert train_prior(cfg) == metrics  # finished, same config: read back, not retrained
    with pytest.raises(DistillError, match="another config"):
        train_prior(PriorTrainConfig(**{**vars(cfg), "minimax_lambda_repr": 1.0}))


def _recover(out, prior, **kw):
    return RecoverConfig(out=str(out), data="digits", method="minimax", ipc=kw.pop("ipc", 3), iterations=0,
                         autocast="none", options={"prior": str(prior), **kw.pop("options", {})}, **kw)


def test_minimax_samples_a_set_that_is_a_function_of_seed_class_and_index(finetuned, tmp_path):
    folder = finetuned["repr"][0]
    man = recover(_recover(tmp_path / "a", folder))
    assert man["num_images"] == 30 and man["method"] == "minimax"
    recover(_recover(tmp_path / "b", folder, classes_per_unit=3, ipc_per_unit=2))
    recover(_recover(tmp_path / "c", folder, seed=1))
    (a, la), (b, lb), (c, _) = ((s.images, s.labels) for s, _ in (load_distilled(tmp_path / k) for k in "abc"))
    order_a, order_b = la.argsort(stable=True), lb.argsort(stable=True)
    assert torch.equal(a[order_a], b[order_b])  # another unit layout, the same images
    assert not torch.equal(a, c)
    assert not torch.equal(a[la == 0], a[la == 1])  # the class conditions the sample
    assert (a[la == 0][0].int() - a[la == 0][1].int()).abs().sum() > 0  # different noise per index


def test_d4m_and_minimax_run_from_the_cli(finetuned, tmp_path):
    from distillset.launch.cli import main

    folder = finetuned["div"][0]
    for method, opts in (("minimax", f"{{prior: {folder}, steps: 2}}"), ("d4m", f"{{prior: {folder}, steps: 2}}")):
        out = tmp_path / method
        assert main(["recover", "--method", method, "--data", "digits", "--ipc", "2", "--options", opts,
                     "--autocast", "none", "--out", str(out)]) == 0
        images, manifest = load_distilled(out)
        assert len(images) == 20 and manifest["method"] == method


def test_prior_train_finetunes_from_the_cli(base_prior, tmp_path):
    from distillset.launch.cli import main

    out = tmp_path / "cli_ft"
    assert main(["prior", "train", "--data", "digits", "--finetune", "minimax", "--from-prior", str(base_prior),
                 "--finetune-steps", "2", "--minimax-lambda-repr", "1", "--minimax-lambda-div", "1", "--memory-size",
                 "8", "--max-train", "100", "--width", "8", "--unet-width", "8", "--down", "2",
                 "--train-timesteps", "100", "--flip", "false", "--out", str(out)]) == 0
    assert from_pretrained(out, cache=False).kind == "ld3m"


def test_the_recipe_trains_a_base_finetunes_it_and_samples(tmp_path):
    """recipes/minimax_tiny10.yaml at a debug size: squeeze -> prior_train (base into <out>/base, then minimax) ->
    recover (minimax sampling from the prior the recipe chains); relabel and evaluate resolve (the students are
    what every recipe shares, run end to end in tests/test_cli.py)."""
    from distillset.launch.cli import main
    from distillset.launch.recipe import resolve

    recipe = load_yaml("recipes/minimax_tiny10.yaml")
    plan = dict(resolve(recipe, recipe["out"]))
    assert plan["prior_train"].finetune == "minimax" and not plan["prior_train"].from_prior
    assert plan["recover"].options["prior"] == plan["prior_train"].out and plan["recover"].method == "minimax"
    assert plan["evaluate"].labels == "both" and plan["relabel"].distilled == plan["recover"].out
    sets = [f"prior_train.data={TINY}", f"recover.data={TINY}", "prior_train.image_size=16", "recover.image_size=16",
            "prior_train.ae_steps=2", "prior_train.unet_steps=2", "prior_train.finetune_steps=2",
            "prior_train.width=8", "prior_train.unet_width=8", "prior_train.sample_steps=2", "squeeze.epochs=1",
            f"squeeze.data={TINY}", "squeeze.image_size=16", "squeeze.model_kwargs.width=8"]
    args = ["run", "recipes/minimax_tiny10.yaml", "--out", str(tmp_path / "r"), "--stages",
            "squeeze,prior_train,recover"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    root = tmp_path / "r"
    assert (root / "prior_train" / "base" / "prior.json").exists() and (root / "prior_train" / "prior.json").exists()
    images, manifest = load_distilled(root / "recover")
    assert manifest["method"] == "minimax" and len(images) == 10 * recipe["recover"]["ipc"]


def test_bad_input_is_one_line_and_loses_nothing(base_prior, tmp_path):
    from distillset.generative.glad import build_glad

    common = dict(data="digits", **TINY_PRIOR)
    with pytest.raises(DistillError, match="unknown finetune 'maxmin'"):
        PriorTrainConfig(finetune="maxmin")
    with pytest.raises(DistillError, match="set --finetune minimax too"):
        PriorTrainConfig(from_prior=str(base_prior))
    with pytest.raises(DistillError, match="use --kind ld3m"):
        PriorTrainConfig(kind="glad", finetune="minimax")
    with pytest.raises(DistillError, match="memory_size must be >= 1"):
        PriorTrainConfig(finetune="minimax", memory_size=0)
    with pytest.raises(DistillError, match="minimax_lambda_div must be a finite number"):
        PriorTrainConfig(finetune="minimax", minimax_lambda_div=-1)
    glad = tmp_path / "glad"
    build_glad(10, (1, 8, 8)).save_pretrained(glad)
    with pytest.raises(DistillError, match="holds a 'glad' prior; minimax fine-tunes a latent diffusion prior"):
        train_prior(PriorTrainConfig(out=str(tmp_path / "x"), finetune="minimax", from_prior=str(glad), **common))
    with pytest.raises(DistillError, match="does not exist"):
        train_prior(PriorTrainConfig(out=str(tmp_path / "y"), finetune="minimax", from_prior=str(tmp_path / "no"),
                                     **common))
    with pytest.raises(DistillError, match="--from-prior and --out are both"):
        train_prior(PriorTrainConfig(out=str(base_prior), finetune="minimax", from_prior=str(base_prior), **common))
    # a prior for fewer classes than the data: refused before any step; the base stays as it was
    few = tmp_path / "few"
    build_ld3m(3, (1, 8, 8), ae="kl", down=2, width=8, unet_width=8, train_timesteps=100).save_pretrained(few)
    before = (few / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(DistillError, match="trained for 3 classes but the task has 10"):
        train_prior(PriorTrainConfig(out=str(tmp_path / "z"), finetune="minimax", from_prior=str(few), **common))
    assert not (tmp_path / "z" / "prior.json").exists()
    assert (few / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    # sampling: a GLaD prior has no diffusion model; no prior at all
    with pytest.raises(DistillError, match="no autoencoder and no diffusion model; Minimax needs"):
        recover(_recover(tmp_path / "g", glad))
    with pytest.raises(DistillError, match="minimax needs options.prior"):
        RecoverConfig(out=str(tmp_path / "n"), data="digits", method="minimax")
    with pytest.raises(DistillError, match="steps >= 0"):
        _recover(tmp_path / "s", base_prior, options={"steps": -1})
