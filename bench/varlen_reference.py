"""A reference kernel with ``torch.nn.attention.varlen.varlen_attn``'s signature, computed per record in float64.

It stands in for the CUDA kernel on a CPU, so that everything around the kernel (the reshaping to tokens x heads x
head_dim, ``cu_seq_lens``, grouped-query heads, the scale, a sliding window) runs end to end, forward and backward,
and on a GPU only the kernel differs. Two signatures: torch 2.13's (``window_size``, ``enable_gqa``) and torch 2.10's
(``is_causal``, no grouped heads), since the code reads the signature where it runs.
"""

from __future__ import annotations

import math

import torch


def _attend(query, key, value, cu_seq_q, scale, left: int, grouped: bool) -> torch.Tensor:
    if key.shape[1] != query.shape[1]:
        if not grouped:
            raise ValueError(f"{query.shape[1]} query heads, {key.shape[1]} key heads: enable_gqa was not set")
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    scale = scale if scale is not None else 1 / math.sqrt(query.shape[-1])
    edges = cu_seq_q.tolist()  # a reference: reading the bounds on the host is fine here
    outputs = []
    for start, end in zip(edges[:-1], edges[1:]):
        q, k, v = (t[start:end].double().transpose(0, 1) for t in (query, key, value))  # heads x tokens x dim
        scores = q @ k.transpose(-1, -2) * scale
        positions = torch.arange(end - start)
        distance = positions[:, None] - positions[None, :]
        allowed = distance >= 0
        if left >= 0:
            allowed &= distance <= left
        scores = scores.masked_fill(~allowed, float("-inf"))
        outputs.append((scores.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outputs).to(query.dtype)


def reference_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
) -> torch.Tensor:
    """torch 2.13's ``varlen_attn``, causal only (``window_size`` (-1, 0) or (W, 0)), per record in float64."""
    if window_size[1] != 0:
        raise ValueError(f"only causal attention is referenced here, got window_size {window_size}")
    if cu_seq_k is not None and not torch.equal(cu_seq_k, cu_seq_q):
        raise ValueError("packed rows attend within their records: cu_seq_k must equal cu_seq_q")
    assert max(torch.diff(cu_seq_q).tolist()) == max_q == max_k
    return _attend(query, key, value, cu_seq_q, scale, window_size[0], enable_gqa)


def reference_varlen_attn_2_10(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """torch 2.10's ``varlen_attn``: ``is_causal``, no sliding window, no grouped heads."""
    if not is_causal:
        raise ValueError("packed rows are causal: is_causal must be set")
    return _attend(query, key, value, cu_seq_q, scale, -1, False)
