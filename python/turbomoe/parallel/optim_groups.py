"""Optimizer parameter groups for a parallelized model.

With ``parallelize(..., fsdp=True)`` the dense parameters are FSDP2 DTensors and the expert shards
plain tensors. torch's fused and foreach AdamW run one multi-tensor kernel per parameter group and
reject a group that mixes the two ("got mixed torch.Tensor and DTensor"), so each kind gets its
own group; the update of every parameter is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor


def split_param_groups(params: Iterable[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """[{"params": DTensor parameters}, {"params": the others}], empty groups left out."""
    dtensors: list[torch.nn.Parameter] = []
    local: list[torch.nn.Parameter] = []
    for p in params:
        (dtensors if isinstance(p, DTensor) else local).append(p)
    return [{"params": group} for group in (dtensors, local) if group]
