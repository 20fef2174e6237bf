"""One optimiser step's gradient: direct for one micro-batch, GradCache for several.

Kept apart from the loop so the exactness properties (accumulation, multi-process parity) are
tested on exactly the code the loop runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from clipkit.train.gradcache import gradcache_step

Embed = Callable[[dict[str, Any]], dict[str, Any]]
Loss = Callable[[dict[str, Any]], torch.Tensor]


def all_finite(accelerator: Any, loss: torch.Tensor) -> bool:
    """One decision for all ranks, so no rank steps while another skips."""
    # Stays on the device until the one .item() (a single host sync per step).
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    return bool(accelerator.reduce(flag, "min").item() > 0)


def step_gradients(
    micro: list[dict[str, Any]],
    embed: Embed,
    compute_loss: Loss,
    accelerator: Any,
    model: torch.nn.Module,
) -> tuple[torch.Tensor, bool]:
    """Accumulate into ``.grad`` the gradient of the loss over all of ``micro`` (all ranks).

    Returns:
        ``(loss, finite)``; when the loss is not finite on any rank, no gradient is applied
        (direct path) or the caller must discard it (GradCache path: it zeroes grads).
    """
    if len(micro) == 1:
        loss = compute_loss(embed(micro[0]))
        finite = all_finite(accelerator, loss)
        if finite:
            accelerator.backward(loss)
        return loss.detach(), finite
    loss = gradcache_step(
        micro, embed, compute_loss, accelerator.backward, lambda: accelerator.no_sync(model)
    )
    return loss, all_finite(accelerator, loss)
