"""The cross-architecture students of the matching protocol (VGG-11, AlexNet-style; ResNet-18 and ConvNets exist
already) build for every image size the toolkit meets and learn real CIFAR-10 images under the matching protocol."""

from __future__ import annotations

import pytest
import torch

from distillset.core.data import Source
from distillset.relabel.student import StudentSpec, train_student
from distillset.squeeze.models import create_model, has_batchnorm, model_entry


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "alexnet"])
def test_builds_for_small_sizes_and_reports_batchnorm(name):
    for c, size in [(3, 32), (1, 28), (3, 64), (1, 8)]:
        model = create_model(name, 10, c, size, width=16)
        assert model(torch.rand(2, c, size, size)).shape == (2, 10)
        assert has_batchnorm(model) == model_entry(name).has_bn == name.endswith("_bn")


@pytest.mark.parametrize("name", ["vgg11", "alexnet"])
def test_students_learn_real_images(name):
    """MNIST at 28 px: the papers' setting for these nets (the first conv pads 28 px up to the 32 px layout)."""
    src = Source("npz:tests/assets/mnist_small.npz")
    train, test = src.load("train"), src.load("test")
    spec = StudentSpec(arch=name, model_kwargs={"width": 16}, epochs=8, protocol="matching", batch_size=64, lr=0.01,
                       autocast="none")
    acc = train_student(train, test, spec, [0.5], [0.5], seed=0, device="cpu")
    assert acc > 0.6, acc  # 10 classes: chance is 0.1 (600 training images, 300 test images)
