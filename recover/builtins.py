"""Import every built-in plugin module so its ``@register_*`` decorators run.

Modules in :mod:`distillset.recover.objectives` and :mod:`distillset.recover.augmentations` are discovered
automatically, so adding a method is adding a file; parametrizations come from :mod:`distillset.recover.params`
(pixels) and :mod:`distillset.recover.latent` (latents of a generative prior: GLaD, LD3M).
"""

from __future__ import annotations

import importlib
import pkgutil

from distillset.recover import augmentations, latent, objectives, params  # noqa: F401

for _pkg in (objectives, augmentations):
    for _mod in pkgutil.iter_modules(_pkg.__path__):
        importlib.import_module(f"{_pkg.__name__}.{_mod.name}")
