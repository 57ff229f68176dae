"""The Tucker rebuild shared by LoHa and LoKr conv layouts."""
from __future__ import annotations

import torch
from torch import Tensor


def rebuild_tucker(core: Tensor, w_out: Tensor, w_in: Tensor) -> Tensor:
    """W[p, q, ...] = Σ_ij core[i, j, ...] · w_out[i, p] · w_in[j, q]  (w_out: (r, out), w_in: (r, in))."""
    return torch.einsum("ij...,ip,jq->pq...", core, w_out, w_in)
