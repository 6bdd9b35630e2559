"""Import every built-in plugin module so its ``@register_*`` decorators run.

Modules in :mod:`recover.objectives` and :mod:`recover.augmentations` are discovered automatically, so adding a
method is adding a file; parametrizations come from :mod:`recover.params` and, when present, :mod:`generative`.
"""

from __future__ import annotations

import importlib
import pkgutil

from distillset.recover import augmentations, objectives, params  # noqa: F401

for _pkg in (objectives, augmentations):
    for _mod in pkgutil.iter_modules(_pkg.__path__):
        importlib.import_module(f"{_pkg.__name__}.{_mod.name}")

try:  # latent parametrizations (GLaD / LD3M) register themselves when the generative package provides them
    importlib.import_module("distillset.generative.latent_set")
except ModuleNotFoundError as _e:
    if _e.name != "distillset.generative.latent_set":
        raise
