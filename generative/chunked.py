"""Memory-light back-propagation through a generator (GLaD's trick), as one autograd node.

Forward renders all images without a graph, chunk by chunk, so only the images are kept. Backward receives dL/dx
from the unmodified objective, re-renders each chunk *with* a graph and pushes that chunk's dL/dx into the latent
leaves with :func:`torch.autograd.backward` (accumulating into their ``.grad``). Peak memory is one chunk's graph,
whatever the number of images; the price is rendering twice.

Requirements: rendering is deterministic (same latents -> same images), and the caller optimises the latents through
``.grad`` (``loss.backward()``), which is what the recover loop does. ``torch.autograd.grad(loss, latents)`` would
not see these gradients, because they bypass the outer graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _ChunkedRender(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dummy: torch.Tensor, render_chunk: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor,
                chunk: int) -> torch.Tensor:
        ctx.render_chunk, ctx.index, ctx.chunk = render_chunk, index, chunk
        with torch.no_grad():
            return torch.cat([render_chunk(index[i:i + chunk]) for i in range(0, len(index), chunk)])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        index, chunk = ctx.index, ctx.chunk
        for i in range(0, len(index), chunk):
            g = grad_out[i:i + chunk]
            if not torch.any(g):  # images this loss did not touch (e.g. another class's) cost nothing
                continue
            with torch.enable_grad():
                x = ctx.render_chunk(index[i:i + chunk])
            torch.autograd.backward(x, g)
        return None, None, None, None


def chunked_render(render_chunk: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor, chunk: int,
                   dummy: torch.Tensor) -> torch.Tensor:
    """Images for ``index`` rendered in chunks of ``chunk``; gradients reach the latents as described above.

    Args:
        render_chunk: maps a 1-D long tensor of image indices to their images, differentiably in the latents.
        index: the images to render, in output order.
        chunk: images per chunk (bounds the memory of backward).
        dummy: a scalar that requires grad, so autograd calls backward even though no input here does.
    """
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return torch.cat([render_chunk(index[i:i + chunk]) for i in range(0, len(index), chunk)])
    return _ChunkedRender.apply(dummy, render_chunk, index, chunk)
