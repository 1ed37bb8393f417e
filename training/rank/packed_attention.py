"""Attention for packed rows: one varlen kernel call per layer on a GPU, causal SDPA per record on a CPU.

A packed row holds several records back to back; each record must attend only to itself. The collator says where
the records lie, once per micro-batch: ``record_bounds`` as plain integers and ``cu_seq_lens_q``/``max_length_q``
as a tensor the Trainer copies to the device with the batch. The kernel is chosen once per run
(:func:`choose_kernel`), from the device, the precision, the installed packages and what the model's attention needs:

- ``flash_attn_varlen``: FlashAttention's ``flash_attn_varlen_func``, on CUDA where the ``flash_attn`` package imports;
- ``torch_varlen_attn``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's kernel inside
  PyTorch, torch 2.10 and later), on CUDA otherwise; its signature moved between releases (2.10 took ``is_causal``,
  later ones ``window_size``), so it is read where it runs;
- ``per_record_sdpa``: causal SDPA per record, on CPU (no varlen kernel runs there, and FlexAttention has no CPU
  backward);
- ``model_attention``: the model's own attention with the block-diagonal mask transformers builds from the
  restarting position ids, for a model whose attention the kernel cannot serve exactly (a logit soft cap, attention
  sinks, attention dropout or a sliding window the kernel cannot express). Exact, and slower: never a silent
  approximation.

The first three read only the collator's bounds, never the position ids, and no mask is built for them: the
function is registered without a mask function, so transformers' mask preparation returns at once (no (T, T) mask,
no device-to-host read of the position ids).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "dolly_packed"

FLASH_ATTN_VARLEN = "flash_attn_varlen"
TORCH_VARLEN = "torch_varlen_attn"
PER_RECORD_SDPA = "per_record_sdpa"
MODEL_ATTENTION = "model_attention"
VARLEN_KERNELS = (FLASH_ATTN_VARLEN, TORCH_VARLEN)

# The signature of a varlen kernel, as this module calls it: torch's varlen_attn, or FlashAttention's adapted to it.
VarlenKernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionNeeds:
    """What a model's attention does beyond causal softmax attention, read from its config and weights."""

    softcap: float | None = None
    sinks: bool = False
    dropout: float = 0.0
    sliding_window: int | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> AttentionNeeds:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        window = getattr(config, "sliding_window", None)
        if not getattr(config, "use_sliding_window", True):
            window = None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            window = None
        return cls(
            softcap=getattr(config, "attn_logit_softcapping", None),
            sinks=any(name.endswith(".sinks") or name == "sinks" for name, _ in model.named_parameters()),
            dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
            sliding_window=int(window) if window else None,
        )


@dataclass(frozen=True)
class KernelChoice:
    """The attention a run trains packed rows with, and why."""

    kernel: str
    reason: str

    @property
    def replaces_attention(self) -> bool:
        """Whether packed rows run through :func:`packed_attention` (else through the model's own attention)."""
        return self.kernel != MODEL_ATTENTION

    def describe(self) -> str:
        return f"{self.kernel} ({self.reason})"


def varlen_parameters() -> frozenset[str] | None:
    """The keyword names of this torch's ``varlen_attn``, or None where it has none (torch before 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def flash_attn_importable() -> bool:
    """Whether FlashAttention's varlen function imports here (the package is built for this CUDA and torch)."""
    try:
        importlib.import_module("flash_attn").flash_attn_varlen_func  # noqa: B018
    except Exception:  # not installed, or built against another torch/CUDA
        return False
    return True


def choose_kernel(
    device_type: str,
    precision: str,
    needs: AttentionNeeds,
    *,
    flash_attn: bool,
    varlen: frozenset[str] | None,
) -> KernelChoice:
    """The attention for packed rows, from the device (``cuda``, ``cpu``, ...), the precision, what the model's
    attention needs, and what is installed: ``flash_attn`` (the package imports) and ``varlen`` (the keyword names of
    torch's ``varlen_attn``, None where torch has none)."""
    if needs.softcap is not None:
        return KernelChoice(MODEL_ATTENTION, f"the model caps its attention logits at {needs.softcap:g}")
    if needs.sinks:
        return KernelChoice(MODEL_ATTENTION, "the model's attention has sinks")
    if device_type != "cuda":
        return KernelChoice(PER_RECORD_SDPA, f"no varlen kernel runs on {device_type}")
    if precision not in ("bf16", "fp16"):
        return KernelChoice(MODEL_ATTENTION, f"the varlen kernels take bf16 or fp16, this run is {precision}")
    if flash_attn:
        return KernelChoice(FLASH_ATTN_VARLEN, "the flash_attn package is installed")
    if varlen is None:
        return KernelChoice(MODEL_ATTENTION, f"torch {torch.__version__} has no varlen_attn and flash_attn is absent")
    if needs.dropout > 0:
        return KernelChoice(MODEL_ATTENTION, f"attention dropout {needs.dropout:g}: varlen_attn has none")
    if needs.sliding_window is not None and "window_size" not in varlen:
        return KernelChoice(MODEL_ATTENTION, "this torch's varlen_attn cannot express the model's sliding window")
    return KernelChoice(TORCH_VARLEN, "CUDA, without the flash_attn package")


def choose_kernel_for(model: torch.nn.Module, device: torch.device | str, precision: str) -> KernelChoice:
    """:func:`choose_kernel` for this model on this machine."""
    device_type = torch.device(device).type
    on_cuda = device_type == "cuda"
    return choose_kernel(
        device_type,
        precision,
        AttentionNeeds.of(model),
        flash_attn=on_cuda and flash_attn_importable(),
        varlen=varlen_parameters() if on_cuda else None,
    )


# ---- the kernels ----


def flash_attn_as_varlen(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, 0), dropout_p=0.0
):
    """FlashAttention's varlen function behind torch's ``varlen_attn`` signature (causal; native grouped heads)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
        window_size=window_size,
    )


flash_attn_as_varlen.takes_grouped_heads = True  # type: ignore[attr-defined]


def torch_varlen_kernel() -> VarlenKernel:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen_forward(
    kernel: VarlenKernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    *,
    scale: float | None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """One packed row through a varlen kernel: query/key/value (1, heads, tokens, head_dim) in, (1, tokens, heads,
    head_dim) out, as transformers' attention functions return it."""
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # tokens x heads x head_dim
    takes = _keywords(kernel)
    kwargs: dict[str, Any] = {"scale": scale}
    grouped = k.shape[1] != q.shape[1]
    if grouped:
        if "enable_gqa" in takes:
            kwargs["enable_gqa"] = True
        elif not getattr(kernel, "takes_grouped_heads", False):
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    left = sliding_window - 1 if sliding_window else -1
    if "window_size" in takes:
        kwargs["window_size"] = (left, 0)
    elif sliding_window:
        raise RuntimeError("this varlen kernel cannot express a sliding window (it was chosen for a model without one)")
    else:
        kwargs["is_causal"] = True
    if dropout:
        if "dropout_p" not in takes:
            raise RuntimeError(f"this varlen kernel has no attention dropout (the model asks for {dropout:g})")
        kwargs["dropout_p"] = dropout
    out = kernel(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens, cu_seq_lens, max_length, max_length, **kwargs
    )
    return out.unsqueeze(0)


def _keywords(kernel: VarlenKernel) -> frozenset[str]:
    return frozenset(inspect.signature(kernel).parameters)


def per_record_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: tuple[tuple[int, int], ...],
    *,
    scale: float | None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal SDPA per record (a band mask only for a record longer than the sliding window), from plain-integer
    bounds: no device read. Same shapes as :func:`varlen_forward`."""
    grouped = key.shape[1] != query.shape[1]
    outputs = []
    for start, end in bounds:
        mask = None
        if sliding_window and end - start > sliding_window:
            positions = torch.arange(end - start, device=query.device)
            distance = positions[:, None] - positions[None, :]
            mask = (distance >= 0) & (distance < sliding_window)
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                scale=scale,
                enable_gqa=grouped,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def make_packed_attention(choice: KernelChoice, varlen_kernel: VarlenKernel | None = None) -> Callable[..., Any]:
    """The attention function for packed rows under ``choice`` (``varlen_kernel`` replaces the chosen varlen kernel:
    the tests put a reference of ``varlen_attn``'s signature there)."""
    if choice.kernel == TORCH_VARLEN:
        kernel = varlen_kernel or torch_varlen_kernel()
    elif choice.kernel == FLASH_ATTN_VARLEN:
        kernel = varlen_kernel or flash_attn_as_varlen
    else:
        kernel = None

    def packed_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        s_aux: torch.Tensor | None = None,
        record_bounds: tuple[tuple[int, int], ...] | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        max_length_q: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if softcap is not None or s_aux is not None:
            raise RuntimeError("packed attention got a logit soft cap or sinks: this model needs its own attention")
        if query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
            raise RuntimeError(
                "packed attention takes one packed row without a mask or cache "
                f"(got {query.shape[0]} rows, {'a' if attention_mask is not None else 'no'} mask, "
                f"{query.shape[2]} queries for {key.shape[2]} keys): generate under plain_attention()"
            )
        tokens = query.shape[2]
        bounds = record_bounds if record_bounds is not None else ((0, tokens),)  # a row of one record
        if bounds[-1][1] != tokens:
            raise RuntimeError(f"the batch's record bounds end at {bounds[-1][1]}, the row has {tokens} tokens")
        if kernel is None:
            out = per_record_forward(
                query, key, value, bounds, scale=scaling, sliding_window=sliding_window, dropout=dropout
            )
            return out, None
        if cu_seq_lens_q is None:  # a row of one record, outside training: its bounds as a tensor, once
            cu_seq_lens_q = torch.tensor([0, tokens], dtype=torch.int32, device=query.device)
            max_length_q = tokens
        out = varlen_forward(
            kernel,
            query,
            key,
            value,
            cu_seq_lens_q,
            max_length_q,
            scale=scaling,
            sliding_window=sliding_window,
            dropout=dropout,
        )
        return out, None

    return packed_attention


def register_packed_attention(choice: KernelChoice, varlen_kernel: VarlenKernel | None = None) -> str:
    """Register the packed-row attention for ``choice`` (with no mask function: transformers builds no mask for it)
    and return its name."""
    AttentionInterface.register(PACKED_ATTENTION, make_packed_attention(choice, varlen_kernel))
    return PACKED_ATTENTION
