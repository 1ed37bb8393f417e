"""The packed-row attention (training/rank/packed_attention.py): the varlen path run end to end on CPU with a
reference kernel of varlen_attn's signature in the CUDA kernel's place, the kernel choice for each case, and no mask
built for a packed row."""

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from bench.varlen_reference import reference_varlen_attn, reference_varlen_attn_2_10
from training.rank.packed_attention import (
    FLASH_ATTN_VARLEN,
    MODEL_ATTENTION,
    PACKED_ATTENTION,
    PER_RECORD_SDPA,
    TORCH_VARLEN,
    AttentionNeeds,
    KernelChoice,
    choose_kernel,
    register_packed_attention,
)
from training.rank.packing import DataCollatorForPackedCompletionOnlyLM, packing_collator, restore_attention

VOCAB = 96
WINDOW = 12


def tiny(family: str) -> torch.nn.Module:
    """A tiny random model of ``family``: GPT-NeoX (one key head per query head), Llama (grouped-query heads),
    Mistral (grouped heads and a sliding window shorter than the longer records), Gemma 2 (a logit soft cap)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, max_position_embeddings=256))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=256))
    elif family == "mistral":
        config = MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=256, sliding_window=WINDOW)
        model = MistralForCausalLM(config)
    else:
        config = Gemma2Config(**common, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
        model = Gemma2ForCausalLM(config)
    model.config.use_cache = False
    for module in model.modules():  # a scale other than 1/sqrt(head_dim): the kernel must be handed the model's
        if hasattr(module, "scaling") and family != "gemma2":
            module.scaling = 0.3
    return model.train()


def records(lengths: list[int]) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return out


class NoTokenizer:
    """The packed collator reads labels from the records; it needs no tokenizer for records that carry them."""


def packed_row(lengths: list[int]) -> dict:
    batch = DataCollatorForPackedCompletionOnlyLM(tokenizer=NoTokenizer(), response_logits_only=False)(records(lengths))
    return {key: value for key, value in batch.items() if key != "labels"} | {"labels": batch["labels"]}


def forward_backward(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


LENGTHS = [5, 17, 9, 30, 3]  # two records longer than the sliding window of 12


@pytest.mark.parametrize("kernel", [reference_varlen_attn, reference_varlen_attn_2_10], ids=["torch2.13", "torch2.10"])
@pytest.mark.parametrize("family", ["gpt_neox", "llama", "mistral"])
def test_the_varlen_path_matches_the_per_record_loop_forward_and_backward(family, kernel):
    if family == "mistral" and kernel is reference_varlen_attn_2_10:
        pytest.skip("torch 2.10's varlen_attn has no window: choose_kernel gives a windowed model its own attention")
    model = tiny(family)
    batch = packed_row(LENGTHS)
    model.set_attn_implementation(register_packed_attention(KernelChoice(PER_RECORD_SDPA, "test")))
    loop_logits, loop_grads = forward_backward(model, batch)
    model.set_attn_implementation(register_packed_attention(KernelChoice(TORCH_VARLEN, "test"), varlen_kernel=kernel))
    varlen_logits, varlen_grads = forward_backward(model, batch)
    assert relative_error(varlen_logits, loop_logits) < 1e-5
    for name, grad in loop_grads.items():
        assert relative_error(varlen_grads[name], grad) < 1e-4, name
    # And both are what each record gets alone through the model's own attention (SDPA, transformers' mask):
    model.set_attn_implementation("sdpa")
    model.eval()
    with torch.no_grad():
        for (start, end), record in zip(batch["record_bounds"], records(LENGTHS)):
            alone = model(input_ids=torch.tensor([record["input_ids"]])).logits[0]
            torch.testing.assert_close(varlen_logits[0, start:end], alone, atol=1e-4, rtol=1e-4)


def test_the_sliding_window_is_honoured_by_both_paths():
    """With a window of 12, a 30-token record's last token must not see its first: widening the window changes it."""
    model = tiny("mistral").eval()
    batch = packed_row(LENGTHS)
    batch.pop("labels")
    model.set_attn_implementation(register_packed_attention(KernelChoice(TORCH_VARLEN, "t"), reference_varlen_attn))
    with torch.no_grad():
        windowed = model(**batch).logits
        model.config.sliding_window = 64
        for layer in model.model.layers:
            layer.self_attn.sliding_window = 64 if hasattr(layer.self_attn, "sliding_window") else None
        wide = model(**batch).logits
    start, end = batch["record_bounds"][3]
    assert relative_error(windowed[0, start:end], wide[0, start:end]) > 1e-3
    short = batch["record_bounds"][0]
    torch.testing.assert_close(windowed[0, short[0] : short[1]], wide[0, short[0] : short[1]])


TORCH_2_13 = frozenset({"scale", "window_size", "enable_gqa", "return_aux"})
TORCH_2_10 = frozenset({"scale", "is_causal"})


@pytest.mark.parametrize(
    ("device", "precision", "needs", "flash", "varlen", "expected"),
    [
        ("cpu", "fp32", AttentionNeeds(), False, None, PER_RECORD_SDPA),
        ("cpu", "bf16", AttentionNeeds(), True, TORCH_2_13, PER_RECORD_SDPA),  # nothing varlen runs on a CPU
        ("cuda", "bf16", AttentionNeeds(), True, TORCH_2_13, FLASH_ATTN_VARLEN),
        ("cuda", "bf16", AttentionNeeds(sliding_window=4096), True, TORCH_2_10, FLASH_ATTN_VARLEN),
        ("cuda", "bf16", AttentionNeeds(), False, TORCH_2_13, TORCH_VARLEN),
        ("cuda", "fp16", AttentionNeeds(), False, TORCH_2_10, TORCH_VARLEN),
        ("cuda", "bf16", AttentionNeeds(sliding_window=4096), False, TORCH_2_13, TORCH_VARLEN),
        ("cuda", "bf16", AttentionNeeds(sliding_window=4096), False, TORCH_2_10, MODEL_ATTENTION),
        ("cuda", "bf16", AttentionNeeds(dropout=0.1), False, TORCH_2_13, MODEL_ATTENTION),
        ("cuda", "bf16", AttentionNeeds(dropout=0.1), True, TORCH_2_13, FLASH_ATTN_VARLEN),
        ("cuda", "bf16", AttentionNeeds(), False, None, MODEL_ATTENTION),  # torch before 2.10, no flash_attn
        ("cuda", "fp32", AttentionNeeds(), True, TORCH_2_13, MODEL_ATTENTION),  # the kernels take half precision
        ("cuda", "bf16", AttentionNeeds(softcap=50.0), True, TORCH_2_13, MODEL_ATTENTION),
        ("cpu", "fp32", AttentionNeeds(softcap=50.0), False, None, MODEL_ATTENTION),
        ("cuda", "bf16", AttentionNeeds(sinks=True), True, TORCH_2_13, MODEL_ATTENTION),
    ],
)
def test_the_kernel_is_chosen_from_the_device_the_packages_and_the_model(
    device, precision, needs, flash, varlen, expected
):
    choice = choose_kernel(device, precision, needs, flash_attn=flash, varlen=varlen)
    assert choice.kernel == expected, choice.describe()
    assert choice.reason


def test_what_a_models_attention_needs_is_read_from_it():
    assert AttentionNeeds.of(tiny("gpt_neox")) == AttentionNeeds()
    assert AttentionNeeds.of(tiny("mistral")).sliding_window == WINDOW
    assert AttentionNeeds.of(tiny("gemma2")).softcap == 50.0
    assert AttentionNeeds.of(tiny("llama")).sliding_window is None


def test_a_model_the_kernels_cannot_serve_keeps_its_own_exact_attention():
    """Gemma 2 caps its attention logits: the packed row runs through its own attention and transformers' block mask,
    and each record still gets what it gets alone."""
    model = tiny("gemma2").eval()
    own = model.config._attn_implementation
    collator = packing_collator(model, NoTokenizer(), device="cpu", precision="fp32")
    assert collator is not None and model.config._attn_implementation == own
    assert model._dolly_packed_kernel.kernel == MODEL_ATTENTION and "caps" in model._dolly_packed_kernel.reason
    batch = packed_row([6, 11, 4])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits[0]
        for (start, end), record in zip(batch["record_bounds"], records([6, 11, 4])):
            alone = model(input_ids=torch.tensor([record["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "mistral"])
def test_a_packed_forward_builds_no_mask_and_reads_no_position_ids(family, monkeypatch):
    """transformers' mask preparation returns at once for the packed attention: no mask function runs, the position
    ids are never scanned for records, and every layer's attention gets no mask."""
    import transformers.masking_utils as masking

    calls = {"masks": 0, "position_scans": 0}
    for name in list(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping):
        original = masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[name]

        def counted(*args, _original=original, **kwargs):
            calls["masks"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setitem(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, counted)
    scan = masking.find_packed_sequence_indices
    monkeypatch.setattr(
        masking, "find_packed_sequence_indices", lambda *a: calls.__setitem__("position_scans", 1) or scan(*a)
    )
    model = tiny(family)
    packing_collator(model, NoTokenizer(), device="cpu", precision="fp32")
    assert model.config._attn_implementation == PACKED_ATTENTION
    masks_seen = []
    inner = model.model.layers[0].self_attn if family != "gpt_neox" else model.gpt_neox.layers[0].attention
    inner.register_forward_pre_hook(lambda m, a, k: masks_seen.append(k.get("attention_mask")), with_kwargs=True)
    forward_backward(model, packed_row(LENGTHS))
    assert calls == {"masks": 0, "position_scans": 0}
    assert masks_seen == [None]
    restore_attention(model)
    # The count can fail: the model's own SDPA, on the same row, builds a mask from the scanned positions.
    model(**packed_row(LENGTHS))
    assert calls["masks"] > 0 and calls["position_scans"] == 1


def test_the_packed_attention_refuses_what_it_cannot_attend_exactly():
    model = tiny("llama").eval()
    model.set_attn_implementation(register_packed_attention(KernelChoice(PER_RECORD_SDPA, "test")))
    with pytest.raises(RuntimeError, match="one packed row without a mask or cache"):
        model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
