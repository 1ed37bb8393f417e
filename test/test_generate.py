"""Generation: the pipeline's stopping and decoding, batching, loading options, and a real pretrained model."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.consts import END_KEY
from training.generate import (
    InstructionTextGenerationPipeline,
    generate_response,
    get_special_token_id,
    load_model_tokenizer_for_generate,
)
from training.modeling import get_model_tokenizer
from training.trainer import train


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_dir):
    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    return InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)


def test_defaults_are_dollys(tiny_pipeline):
    assert tiny_pipeline._generate_kwargs == {"do_sample": True, "max_new_tokens": 256, "top_p": 0.92, "top_k": 0}


def test_response_stops_at_end_key(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer
    end_id = get_special_token_id(tokenizer, END_KEY)
    words = tokenizer.encode(" hello there", add_special_tokens=False)
    assert tiny_pipeline._decode_response(words + [end_id] + words) == ("hello there", "end_key")
    assert tiny_pipeline._decode_response(words + [tokenizer.eos_token_id]) == ("hello there", "eos")
    assert tiny_pipeline._decode_response(words) == ("hello there", "length")


def test_without_special_tokens_the_end_key_is_found_in_text(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))  # no Dolly tokens added
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    generator = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)
    tokens = tokenizer.encode("An answer.\n\n### End\nmore", add_special_tokens=False)
    assert generator._decode_response(tokens) == ("An answer.", "end_key")


def test_batched_list_and_context_inputs(tiny_pipeline):
    prompts = ["Name a fruit.", {"instruction": "Summarize.", "context": "Cats sleep a lot."}, "Why?"]
    results = tiny_pipeline(prompts, batch_size=3, max_new_tokens=4, do_sample=False, return_finish_reason=True)
    assert len(results) == 3
    assert all(set(r[0]) == {"generated_text", "finish_reason"} for r in results)
    # Batching pads on the left, so every answer (the padded ones too) equals the one generated alone.
    for prompt, batched in zip(prompts, results):
        alone = tiny_pipeline(prompt, max_new_tokens=4, do_sample=False, return_finish_reason=True)
        assert batched == alone
    full = tiny_pipeline("Why?", max_new_tokens=2, do_sample=False, return_full_text=True)
    assert full[0]["generated_text"].startswith("Why?\n")


def test_generation_stops_at_end_key_through_the_public_pipeline(tiny_model_dir):
    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    end_id = get_special_token_id(tokenizer, END_KEY)
    # Make ### End the model's top token at every position: a zero output layer plus a bias on its row.
    head = torch.nn.Linear(model.config.hidden_size, model.get_output_embeddings().out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[end_id] = 10.0
    model.set_output_embeddings(head)
    forward_calls = []
    model.register_forward_hook(lambda *args: forward_calls.append(1))
    generator = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)
    result = generator("Name a colour.", max_new_tokens=8, do_sample=False, return_finish_reason=True)
    assert result == [{"generated_text": "", "finish_reason": "end_key"}]
    assert len(forward_calls) == 1  # one new token, then generation stopped


@pytest.mark.parametrize(
    "cuda, bf16_supported, requested, expected",
    [
        (False, False, None, "fp32"),  # CPU
        (True, False, None, "fp16"),  # V100: no bfloat16
        (True, True, None, "bf16"),  # A10, A100, H100
        (True, True, False, "fp16"),  # --bf16 false
        (False, False, True, "bf16"),  # --bf16 true on CPU (bfloat16 runs there)
    ],
)
def test_precision_per_hardware(monkeypatch, cuda, bf16_supported, requested, expected):
    from training.modeling import choose_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert choose_precision(requested) == expected


def test_bf16_requested_on_a_gpu_without_it_is_refused(monkeypatch):
    from training.modeling import choose_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match="does not support bfloat16"):
        choose_precision(True)


def test_generate_response_single_and_list(tiny_model_dir):
    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    one = generate_response("Hi?", model=model, tokenizer=tokenizer, max_new_tokens=3, do_sample=False)
    many = generate_response(["Hi?", "Bye?"], model=model, tokenizer=tokenizer, max_new_tokens=3, do_sample=False)
    assert isinstance(one, str) and len(many) == 2 and many[0] == one


@pytest.mark.parametrize("bits, min_cosine", [(8, 0.999), (4, 0.95)])
def test_quantized_generation_stays_close_to_fp32(tiny_model_dir, caplog, bits, min_cosine):
    pytest.importorskip("bitsandbytes")
    full, tokenizer = load_model_tokenizer_for_generate(str(tiny_model_dir), dtype=torch.float32, device_map="cpu")
    model, tokenizer = load_model_tokenizer_for_generate(
        str(tiny_model_dir), device_map="cpu", **{f"load_in_{bits}bit": True}
    )
    assert tokenizer.padding_side == "left"
    assert any(f"Linear{bits}bit" in type(m).__name__ for m in model.modules())
    inputs = tokenizer("### Instruction:\nName a colour.\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        reference, quantized = full(**inputs).logits[0, -1], model(**inputs).logits[0, -1].float()
    assert torch.nn.functional.cosine_similarity(reference, quantized, dim=0) > min_cosine
    assert reference.argmax() == quantized.argmax()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        answer = generate_response("Hi?", model=model, tokenizer=tokenizer, max_new_tokens=8, do_sample=False)
    assert isinstance(answer, str)
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]  # no cast warning per product


@pytest.mark.slow
def test_fine_tuned_smollm2_answers_through_the_pipeline(embedded_model_dir, sample_path, tmp_path):
    """The real pretrained model: a few steps on the sample data, then the saved model answers."""
    out = train(
        input_model=str(embedded_model_dir), local_output_dir=str(tmp_path / "smol"), training_dataset=str(sample_path),
        max_steps=6, per_device_train_batch_size=4, test_size=0, lr=1e-4, save_steps=100, logging_steps=1,
        gradient_checkpointing=True,
    )
    model, tokenizer = load_model_tokenizer_for_generate(str(out), dtype=torch.float32, device_map="cpu")
    results = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)(
        ["What is the boiling point of water at sea level?", "Give me three ideas for a rainy day indoors."],
        do_sample=False, max_new_tokens=48, return_finish_reason=True,
    )
    for result in results:
        text = result[0]["generated_text"]
        assert text.strip() and "### Instruction" not in text
        assert result[0]["finish_reason"] in {"end_key", "eos", "length"}
