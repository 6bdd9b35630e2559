"""Backbones: registry metadata, training + exact resume, loading local checkpoints with clear errors."""

from __future__ import annotations

import pytest
import torch

from distillset.core.errors import DistillError
from distillset.squeeze.checkpoint import load_teacher
from distillset.squeeze.models import create_model, has_batchnorm, model_entry
from distillset.squeeze.train import SqueezeConfig, run


@pytest.mark.parametrize("name,bn", [("convnet", False), ("convnet_bn", True), ("convnet3", False),
                                     ("convnet4_bn", True), ("resnet18_cifar", True), ("timm:test_resnet", True),
                                     ("tv:mobilenet_v2", True)])
def test_registry_entries_know_batchnorm_and_build(name, bn):
    entry = model_entry(name)
    assert entry.has_bn is bn
    model = create_model(name, 7, 3, 32)
    assert has_batchnorm(model) is bn
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_names_say_what_exists():
    with pytest.raises(DistillError, match="unknown model 'convnet_nb'.*Did you mean"):
        model_entry("convnet_nb")
    with pytest.raises(DistillError, match="unknown torchvision model"):
        model_entry("tv:resnet19")


def test_teacher_is_accurate_and_recorded(digits_teacher):
    t = load_teacher(digits_teacher, 10)
    assert t.config.metrics["test_top1"] > 0.85 and t.has_bn and len(t.sha256) == 64
    assert t.config.mean[0] == pytest.approx(Source_mean(), abs=1e-4)
    with pytest.raises(DistillError, match="predicts 10 classes but the data has 5"):
        load_teacher(digits_teacher, 5)


def Source_mean():
    from distillset.core.data import Source

    return float(Source("digits").load("train").images.float().div(255).mean())


def test_squeeze_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch):
    import distillset.squeeze.train as st

    kw = dict(data="digits", arch="convnet_bn", model_kwargs={"width": 8}, epochs=3, flip=False, autocast="none",
              batch_size=256)
    run(SqueezeConfig(out=str(tmp_path / "ref"), **kw))
    orig = st.save_atomic_state

    def save_then_die(path, obj):
        orig(path, obj)
        if obj["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_atomic_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(SqueezeConfig(out=str(tmp_path / "b"), **kw))
    assert not (tmp_path / "b" / "config.json").exists()  # unfinished: no config.json, not loadable as a teacher
    monkeypatch.setattr(st, "save_atomic_state", orig)
    run(SqueezeConfig(out=str(tmp_path / "b"), **kw))
    a, b = load_teacher(tmp_path / "ref").model.state_dict(), load_teacher(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DistillError, match="trained with another config"):
        run(SqueezeConfig(out=str(tmp_path / "b"), **{**kw, "epochs": 4}))


def test_torchvision_and_timm_local_files(tmp_path):
    import timm
    from timm.models import save_for_hf
    from torchvision.models import resnet18

    sd_model = resnet18(num_classes=10)
    torch.save(sd_model.state_dict(), tmp_path / "r18.pth")
    t = load_teacher(f"tv:resnet18={tmp_path / 'r18.pth'}", 10)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = sd_model.eval()((x - t.mean) / t.std)
        assert torch.allclose(t(x), ref, atol=1e-5)
    with pytest.raises(DistillError, match="head size .* does not match"):
        load_teacher(f"tv:resnet18={tmp_path / 'r18.pth'}", 7)
    with pytest.raises(DistillError, match="does not match the architecture"):
        load_teacher(f"tv:resnet34={tmp_path / 'r18.pth'}", 10)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DistillError, match="corrupt"):
        load_teacher(f"tv:resnet18={tmp_path / 'bad.pth'}", 10)

    m = timm.create_model("test_resnet", num_classes=10)
    save_for_hf(m, tmp_path / "timm_dir")
    t = load_teacher(f"local-dir:{tmp_path / 'timm_dir'}", 10)
    assert t.has_bn and t.config.num_classes == 10
    with torch.no_grad():
        assert torch.allclose(t.model(x), m.eval()(x), atol=1e-5)
    with pytest.raises(DistillError, match="head has 10 classes but 5"):
        load_teacher(f"local-dir:{tmp_path / 'timm_dir'}", 5)


def test_squeeze_streams_webdataset_shards(tmp_path):
    from distillset.launch.shards import ShardsConfig
    from distillset.launch.shards import run as shards
    from distillset.squeeze.stream import ShardStream

    shards(ShardsConfig(data="digits", out=str(tmp_path / "wds"), maxcount=300))
    m = run(SqueezeConfig(out=str(tmp_path / "t"), data=f"wds:{tmp_path / 'wds'}", arch="convnet_bn",
                          model_kwargs={"width": 32}, epochs=6, flip=False, autocast="none", batch_size=64))
    assert m["train_images"] == 1297 and m["test_top1"] > 0.8
    t = load_teacher(tmp_path / "t", 10)
    assert t.config.class_names == [str(i) for i in range(10)]
    # the stream order is a pure function of (seed, epoch, reader): resume replays the same batches
    from distillset.core.data import Source

    urls = Source(f"wds:{tmp_path / 'wds'}").shards.urls("train")
    a = [item for _, item in zip(range(50), ShardStream(urls, 10, 0, 2, 0, 3, buffer=20))]
    b = [item for _, item in zip(range(50), ShardStream(urls, 10, 0, 2, 0, 3, buffer=20))]
    assert [y for _, y in a] == [y for _, y in b] and all(torch.equal(x, z) for (x, _), (z, _) in zip(a, b))


def test_squeeze_on_shards_does_not_depend_on_the_number_of_workers(tmp_path):
    from distillset.launch.cli import main
    from distillset.squeeze.stream import ShardStream

    assert main(["shards", "--data", "digits", "--out", str(tmp_path / "wds"), "--maxcount", "200"]) == 0
    weights = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        run(SqueezeConfig(out=str(out), data=f"wds:{tmp_path / 'wds'}", arch="convnet_bn", model_kwargs={"width": 8},
                          epochs=2, batch_size=32, steps_per_epoch=6, max_train=192, flip=False, autocast="none",
                          workers=workers))
        weights.append(load_teacher(out).model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # the batches themselves: workers only share the decoding, never change what a batch holds
    from distillset.core.data import Source

    urls = Source(f"wds:{tmp_path / 'wds'}").shards.urls("train")
    for workers in (1, 3):
        ds = ShardStream(urls, 10, 0, 1, 5, 1, batch_size=16, buffer=50)
        ref = [b for _, b in zip(range(7), ds)]
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        got = [b for _, b in zip(range(7), loader)]
        assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(ref, got))
