"""distillset: dataset distillation as one installable, tested toolkit.

The stage packages live in the repository's top-level folders and install under this one namespace:
``distillset.core`` (the ground floor), ``distillset.squeeze``, ``distillset.generative``, ``distillset.recover``,
``distillset.relabel`` and ``distillset.launch`` (the CLI).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distillset")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
