"""Attention over packed rows, one record at a time ("varlen" attention without FlashAttention).

With plain SDPA, a packed row of several records is attended as one long sequence under a block-diagonal mask: the
kernel still computes every cross-record score and throws it away, so attention costs (sum of lengths)^2 instead of
the sum of squared lengths. This attention function finds the records from the restarting position ids and runs
causal SDPA on each one, as FlashAttention's varlen kernels do on GPUs. Anything that is not a single packed row
(padded batches, generation with a cache) goes to the ordinary SDPA function with its mask, unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_SDPA = "dolly_packed_sdpa"


def record_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each record in a packed row, from where its position ids restart."""
    positions = position_ids.flatten()
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    edges = [0] + starts.tolist() + [positions.numel()]
    return list(zip(edges[:-1], edges[1:]))


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA per record for one packed row (query/key/value: batch, heads, tokens, head_dim)."""
    packed_row = (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
        and bool((position_ids.flatten()[1:] != position_ids.flatten()[:-1] + 1).any())
    )
    if not packed_row:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_ids=position_ids, **kwargs
        )
    grouped = key.shape[1] != query.shape[1]
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=grouped,
        )
        for start, end in record_bounds(position_ids)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> str:
    """Make the function available as an attention implementation (masks built as for SDPA); returns its name."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA
