"""RDED: the realism score picks the crops the observer finds most like their class, crops are stitched into the
grid cells by rank, the selection is a pure function of (seed, class), and the engine writes it as any set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distillset.core.data import ImageSet
from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError
from distillset.recover.base import Context, get
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run
from distillset.recover.objectives.rded import cell_bounds, stitch
from distillset.recover.real import RealData
from tests.procs import accelerate_launch


class Brightness(nn.Module):
    """An observer that finds bright images most like class 0 (logit of class 0 = 20 x mean pixel)."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([20 * m, torch.zeros_like(m)], 1)


def ctx_for(real: RealData, c: int, ipc: int, teachers, seed: int = 0) -> Context:
    return Context(device=torch.device("cpu"), classes=torch.full((ipc,), c), num_classes=2, image_shape=(1, 8, 8),
                   generator=torch.Generator().manual_seed(seed), real=real, teachers=teachers, ipc=ipc, seed=seed)


@pytest.fixture()
def shades() -> RealData:
    """Class 0: 40 flat images of increasing brightness (image k has value 5 k); class 1: 4 black images."""
    x = torch.cat([torch.arange(40).mul(5).view(40, 1, 1, 1).expand(40, 1, 8, 8), torch.zeros(4, 1, 8, 8)])
    y = torch.cat([torch.zeros(40), torch.ones(4)]).long()
    return RealData(ImageSet(x.to(torch.uint8).contiguous(), y, ["bright", "dark"]))


def test_cells_cover_the_image_and_stitch_places_crops_by_rank():
    assert cell_bounds(32, 2) == [(0, 16), (16, 16)] and cell_bounds(7, 2) == [(0, 4), (4, 3)]
    ipc, f = 3, 2
    patches = torch.arange(ipc * f * f, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    out = stitch(patches, ipc, f, (8, 8))
    for r in range(ipc * f * f):  # crop rank r lands in image r % ipc, cell r // ipc (row-major)
        img, cell = r % ipc, r // ipc
        y, x = 4 * (cell // f), 4 * (cell % f)
        assert torch.all(out[img, 0, y:y + 4, x:x + 4] == r)


def test_keeps_the_crops_the_observer_scores_most_realistic(shades):
    rded = get("objective", "rded").from_options(factor=1, crops=1, pool=40, min_scale=1.0, batch=7)
    ctx = ctx_for(shades, 0, 5, [Brightness()])
    rded.setup(ctx)
    images = rded.select_images(ctx, 5)  # full-image crops: the 5 brightest real images, best first
    assert images.dtype == torch.uint8 and images.shape == (5, 1, 8, 8)
    assert images[:, 0, 0, 0].tolist() == [195, 190, 185, 180, 175]


def test_factor_two_stitches_four_crops_and_scores_them_padded(shades):
    rded = get("objective", "rded").from_options(factor=2, crops=3, pool=40, batch=16)
    ctx = ctx_for(shades, 0, 2, [Brightness()])
    rded.setup(ctx)
    a = rded.select_images(ctx, 2)
    # the 8 kept crops come from the brightest images: every cell of every image is bright
    cells = [a[i, 0, y:y + 4, x:x + 4].float().mean() for i in range(2) for y in (0, 4) for x in (0, 4)]
    assert min(cells) > 100
    # a pure function of (seed, class): the second image alone (a unit holding index 1 only) is the same image
    rded2 = get("objective", "rded").from_options(factor=2, crops=3, pool=40, batch=5)
    sub = ctx_for(shades, 0, 2, [Brightness()])
    sub.first_index = 1
    rded2.setup(sub)
    assert torch.equal(rded2.select_images(sub, 1)[0], a[1])


def test_bad_factor_and_too_small_classes_are_one_line_errors(shades):
    rded = get("objective", "rded").from_options(factor=3)
    with pytest.raises(DistillError, match="does not divide the image size 8x8"):
        rded.setup(ctx_for(shades, 0, 1, [Brightness()]))
    assert get("objective", "rded").from_options(factor=2).real_per_class(10) == 40
    with pytest.raises(DistillError, match="factor must be >= 1"):
        get("objective", "rded").from_options(factor=0)


def test_engine_writes_an_rded_set_from_a_trained_teacher(digits_teacher, tmp_path):
    cfg = RecoverConfig(out=str(tmp_path / "r"), data="digits", teachers=[str(digits_teacher)], method="rded",
                        options={"factor": 1, "pool": 40}, ipc=2, classes_per_unit=4, autocast="none")
    m = run(cfg)
    images, manifest = load_distilled(tmp_path / "r")
    assert m["num_images"] == 20 and images.labels.bincount().tolist() == [2] * 10
    teacher = get_teacher(digits_teacher)
    with torch.no_grad():
        pred = teacher(images.images.float() / 255).argmax(1)
    assert (pred == images.labels).float().mean() >= 0.8  # realistic crops: the observer recognises its classes
    with pytest.raises(DistillError, match="needs 2 x 2\\^2|at least 40|has only|images"):
        run(RecoverConfig(out=str(tmp_path / "big"), data="digits", teachers=[str(digits_teacher)], method="rded",
                          options={"factor": 2}, ipc=100, autocast="none"))
    assert not (tmp_path / "big" / "manifest.json").exists()


def get_teacher(folder: Path):
    from distillset.squeeze.checkpoint import load_teacher

    return load_teacher(str(folder))


@pytest.mark.slow
def test_two_gloo_processes_select_the_single_process_images(digits_teacher, tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "DISTILLSET_PROGRESS": "0",
           "PYTHONPATH": str(root)}
    args = ["recover", "--teachers", str(digits_teacher), "--data", "digits", "--method", "rded", "--ipc", "2",
            "--options", "{factor: 2, pool: 40}", "--classes-per-unit", "3", "--autocast", "none"]
    single = subprocess.run([sys.executable, "-m", "distillset.launch.cli", *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([*accelerate_launch(2), "-m", "distillset.launch.cli", *args,
                            "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = load_distilled(tmp_path / "one")[0], load_distilled(tmp_path / "two")[0]
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_edc_style_rded_initialisation_of_bn_inversion(digits_teacher, tmp_path):
    """``init: rded`` starts the pixels at RDED's stitched selection (EDC's initialisation): with 0 iterations the
    written set is RDED's own, to the uint8 rounding of the normalised round trip."""
    common = dict(data="digits", teachers=[str(digits_teacher)], ipc=2, classes_per_unit=5, autocast="none")
    run(RecoverConfig(out=str(tmp_path / "rded"), method="rded", options={"factor": 2, "pool": 40}, **common))
    run(RecoverConfig(out=str(tmp_path / "init"), method="sre2l", iterations=0,
                      param_options={"init": "rded", "rded_options": {"factor": 2, "pool": 40}}, **common))
    a, b = load_distilled(tmp_path / "rded")[0], load_distilled(tmp_path / "init")[0]
    assert (a.images.int() - b.images.int()).abs().max() <= 1
    with pytest.raises(DistillError, match="rded_options only apply with init: rded"):
        RecoverConfig(out=str(tmp_path / "x"), param_options={"rded_options": {"factor": 2}}, **common)
    with pytest.raises(DistillError, match="pixel init 'rded' option 'factr'"):
        RecoverConfig(out=str(tmp_path / "x"), param_options={"init": "rded", "rded_options": {"factr": 2}}, **common)


def test_teacher_with_another_class_order_is_refused(tmp_path):
    import numpy as np

    from distillset.core.data import Source
    from distillset.squeeze.train import SqueezeConfig
    from distillset.squeeze.train import run as squeeze

    d = Source("digits")
    tr, te = d.load("train"), d.load("test")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def npz(path, names):
        np.savez(path, x_train=tr.images.permute(0, 2, 3, 1).numpy(), y_train=tr.labels.numpy(),
                 x_test=te.images.permute(0, 2, 3, 1).numpy(), y_test=te.labels.numpy(), class_names=np.array(names))

    npz(tmp_path / "words.npz", words)
    npz(tmp_path / "rev.npz", words[::-1])  # the same images, the classes listed in another order
    squeeze(SqueezeConfig(out=str(tmp_path / "t"), data=f"npz:{tmp_path / 'words.npz'}", arch="convnet_bn",
                          model_kwargs={"width": 8}, epochs=1, autocast="none"))
    with pytest.raises(DistillError, match="class 0 is 'zero' for the teacher, 'nine' in the data"):
        run(RecoverConfig(out=str(tmp_path / "r"), data=f"npz:{tmp_path / 'rev.npz'}", teachers=[str(tmp_path / "t")],
                          method="rded", ipc=1, autocast="none"))
    assert not (tmp_path / "r").exists()
