"""torch.compile with an eager fallback, for the networks a stage runs many times (teachers, students).

Compiling fuses what eager PyTorch runs as separate memory-bound passes (normalisation, activation, pooling, the
BN-statistics reductions of SRe2L's hooks and their backwards) into a few loops; on a CPU that is most of a step
outside the convolutions. It costs seconds to minutes once per process and input shape, so stages compile only when
asked or when a run is long enough to pay it back. Should compiling fail (no C++ compiler, an unsupported op), the
module warns once and runs eager: the eager path computes the same thing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class FallbackCompiled(nn.Module):
    """``torch.compile(module)`` that falls back to ``module`` itself if compiling fails.

    The wrapped module is the submodule ``_orig_mod``, as in torch's own ``OptimizedModule``, so its parameters,
    buffers, hooks and state-dict keys are the same as those of a plain ``torch.compile``'d module, and code that
    checks for ``_orig_mod`` treats both alike.
    """

    def __init__(self, module: nn.Module, **compile_kwargs):
        super().__init__()
        self._orig_mod = module
        self.__dict__["_compiled"] = torch.compile(module, **compile_kwargs)

    @property
    def compiled(self) -> bool:
        """False once compiling has failed and the module runs eager."""
        return self.__dict__["_compiled"] is not None

    def forward(self, *args, **kwargs):
        fn = self.__dict__["_compiled"]
        if fn is None:
            return self._orig_mod(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager computes the same thing
            if not _compiler_error(e):
                raise
            log.warning("torch.compile failed (%s: %s); running %s eager.", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "", type(self._orig_mod).__name__)
            self.__dict__["_compiled"] = None
            return self._orig_mod(*args, **kwargs)


def _compiler_error(e: Exception) -> bool:
    """Whether ``e`` comes from dynamo / inductor (not from the model's own code, which eager would raise too)."""
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "compile" in type(e).__name__.lower()
