"""Data sources, shard streaming and their bad-input errors."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from distillset.core.data import Source, assign_readers, write_shard
from distillset.core.errors import DistillError
from tests.conftest import ASSETS, CIFAR


def test_digits_split_is_fixed_and_stratified():
    train, test = Source("digits").load("train"), Source("digits").load("test")
    assert train.image_shape == (1, 8, 8) and len(train) + len(test) == 1797
    assert test.class_counts().tolist() == [50] * 10
    assert int(train.images.max()) == 255  # 0..16 scaled to 0..255


def test_npz_source_matches_file():
    s = Source(CIFAR).load("train")
    z = np.load(ASSETS / "cifar10_small.npz")
    assert s.image_shape == (3, 32, 32) and len(s) == len(z["y_train"])
    assert torch.equal(s.images[0], torch.from_numpy(z["x_train"][0]).permute(2, 0, 1))
    assert s.class_names[0] == "airplane"


@pytest.mark.parametrize("readers", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("num_shards", [1, 2, 4, 7])
def test_assign_readers_is_an_exact_partition(num_shards, readers):
    sizes = [5 + s for s in range(num_shards)]
    seen = []
    for r in range(readers):
        shards, stride, offset = assign_readers(num_shards, r, readers)
        for s in shards:
            seen += [(s, i) for i in range(sizes[s]) if i % stride == offset]
    assert sorted(seen) == [(s, i) for s in range(num_shards) for i in range(sizes[s])]


def _shards(tmp_path, n_shards=3, per_shard=4):
    from distillset.launch.shards import ShardsConfig, run

    run(ShardsConfig(data="digits", out=str(tmp_path / "wds"), maxcount=450))
    return tmp_path / "wds"


def test_shards_roundtrip_and_rank_split(tmp_path):
    folder = _shards(tmp_path)
    info = json.loads((folder / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 1297 and len(info["splits"]["train"]["filenames"]) == 3
    src = Source(f"wds:{folder}")
    train = src.load("train")
    ref = Source("digits").load("train")
    assert len(train) == len(ref)
    # lossless: the multiset of images is identical
    assert sorted(map(bytes, train.images.numpy())) == sorted(map(bytes, ref.images.numpy()))
    # two ranks x readers with fewer shards than readers: still every sample exactly once
    parts = [list(src.stream("test", rank, 4)) for rank in range(4)]
    assert sum(len(p) for p in parts) == 500
    keys = sorted(bytes(x.numpy()) + bytes([y]) for p in parts for x, y in p)
    test = Source("digits").load("test")
    assert keys == sorted(bytes(test.images[i].numpy()) + bytes([int(test.labels[i])]) for i in range(500))


def test_shards_from_folder_copy_bytes_and_resume(tmp_path):
    from distillset.launch.export import ExportConfig
    from distillset.launch.export import run as export
    from distillset.launch.shards import ShardsConfig, run

    distilled = _tiny_distilled(tmp_path)
    export(ExportConfig(distilled=str(distilled), out=str(tmp_path / "if"), format="imagefolder"))
    out = tmp_path / "s"
    run(ShardsConfig(data=f"folder:{tmp_path / 'if'}", out=str(out), splits=["train"], maxcount=7))
    first = (out / "train-000000.tar").stat().st_mtime_ns
    run(ShardsConfig(data=f"folder:{tmp_path / 'if'}", out=str(out), splits=["train"], maxcount=7))
    assert (out / "train-000000.tar").stat().st_mtime_ns == first  # finished shards are not rewritten
    a = Source(f"wds:{out}").load("train")
    b = Source(f"folder:{tmp_path / 'if'}").load("train")
    assert sorted(map(bytes, a.images.numpy())) == sorted(map(bytes, b.images.numpy()))


def _tiny_distilled(tmp_path):
    """A distilled-set folder made of real digits, through the engine's writer (random coreset-like)."""
    from distillset.core.distilled import sample_key
    from distillset.core.io import write_json

    s = Source("digits").load("train")
    folder = tmp_path / "distilled"
    samples = []
    for c in range(10):
        idx = torch.nonzero(s.labels == c).flatten()[:2]
        samples += [(sample_key(c, i), s.images[j], c, None) for i, j in enumerate(idx.tolist())]
    write_shard(folder / "images" / "shard-000000.tar", samples)
    write_json(folder / "manifest.json", {"status": "complete", "class_names": s.class_names, "ipc": 2,
                                          "data": "digits", "method": "test"})
    return folder


def test_corrupt_and_bad_shards_name_shard_and_key(tmp_path):
    folder = _shards(tmp_path)
    shard = folder / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DistillError, match="train-000001.tar.*corrupt or truncated"):
        Source(f"wds:{folder}").load("train")
    # a sample without a label, and a label out of range
    for name, files, pattern in [("nolabel", {"a.png": b"x"}, "sample 'a' has no a label"),
                                 ("range", {"a.png": _png(), "a.cls": b"42"}, "label 42 is out of range")]:
        bad = tmp_path / name
        bad.mkdir()
        with tarfile.open(bad / "train-000000.tar", "w") as tar:
            for fname, payload in files.items():
                ti = tarfile.TarInfo(fname)
                ti.size = len(payload)
                tar.addfile(ti, io.BytesIO(payload))
        (bad / "_info.json").write_text(json.dumps({"class_names": [str(i) for i in range(10)], "splits": {
            "train": {"filenames": ["train-000000.tar"], "num_samples": 1}}}))
        with pytest.raises(DistillError, match=pattern):
            Source(f"wds:{bad}").load("train")


def _png():
    from distillset.core.data import encode_png

    return encode_png(torch.zeros(1, 4, 4, dtype=torch.uint8))


def test_bad_sources_give_one_line_errors(tmp_path):
    cases = [
        ("nosuch", "unknown data source"),
        (f"npz:{tmp_path / 'missing.npz'}", "does not exist"),
        (f"folder:{tmp_path / 'nofolder'}", "does not exist"),
        (f"wds:{tmp_path}", "no _info.json"),
    ]
    np.savez(tmp_path / "wrongkeys.npz", x=np.zeros((2, 4, 4, 3), np.uint8))
    cases.append((f"npz:{tmp_path / 'wrongkeys.npz'}", "has no key"))
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    cases.append((f"npz:{tmp_path / 'corrupt.npz'}", "not a readable"))
    for spec, pattern in cases:
        with pytest.raises(DistillError, match=pattern) as e:
            Source(spec).load("train")
        assert "\n" not in str(e.value)


def test_folder_errors_empty_class_and_mismatched_shapes(tmp_path):
    from PIL import Image

    root = tmp_path / "tree"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "a.png")
    with pytest.raises(DistillError, match="dog is empty"):
        Source(f"folder:{root}").load("train")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "dog" / "b.png")
    with pytest.raises(DistillError, match="different shapes.*image_size"):
        Source(f"folder:{root}").load("train")
    s = Source(f"folder:{root}", image_size=8).load("train")  # resizing fixes it
    assert s.image_shape == (3, 8, 8) and s.class_names == ["cat", "dog"]


def test_require_classes_reports_short_class():
    s = Source("digits").load("train")
    sub = s.subset(torch.nonzero(s.labels != 3).flatten())
    with pytest.raises(DistillError, match="class '3' has 0 images"):
        sub.require_classes(1, "recover")
