"""The frozen backbone's state: a checksum taken at load (training) and again before a report (evaluation).

It lives with the adapters, not in ``eval``, because training computes it and must not import the evaluation.
"""

from __future__ import annotations

import torch

from tuneguard.adapters.registry import is_adapter_param


def frozen_checksum(model: torch.nn.Module) -> float:
    """A cheap checksum of every weight that is not an adapter weight (quantized storage included), and of the
    batch-norm running statistics, which an image backbone in train mode would otherwise update silently.

    Summed in float64 a million elements at a time, so the embedding never gets a full float64 copy.
    """
    total = 0.0
    stats = [(n, b) for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *stats]:
            if is_adapter_param(name):
                continue
            data = p.data if p.dtype.is_floating_point else p.data.view(torch.uint8)
            for chunk in data.reshape(-1).split(1 << 20):
                wide = chunk.double()
                total += float(wide.sum()) + 1e-3 * float(wide.abs().sum())
    return total
