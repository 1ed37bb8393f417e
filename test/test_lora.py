"""LoRA as a first-class path: trains under the DeepSpeed launcher, saves merged and adapter-only, both reload."""

import json

import pytest
import torch
from helpers import PROJECT_ROOT, assert_finished, invoke_trainer, quick_training_args
from safetensors.torch import load_file
from transformers import pipeline

from training.consts import END_KEY, RESPONSE_KEY_NL
from training.generate import load_model_tokenizer_for_generate
from training.rank.lora import DEFAULT_TARGET_MODULES, LoraSettings, apply_lora, is_adapter_dir, new_token_rows
from training.rank.modeling import get_model_tokenizer


@pytest.fixture(scope="module")
def lora_output(lora_run):
    """The shared 2-rank LoRA run (conftest): rank 0 r=8, alpha 16, 4 steps under ``deepspeed --num_gpus 2``."""
    return lora_run.out


def test_merged_output_is_a_plain_pipeline_model_and_keeps_its_adapter(lora_output, tiny_model_dir):
    assert (lora_output / "config.json").exists() and not (lora_output / "adapter_config.json").exists()
    assert is_adapter_dir(lora_output / "adapter")
    adapter_config = json.loads((lora_output / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert set(adapter_config["target_modules"]) == set(DEFAULT_TARGET_MODULES["gpt_neox"])
    generator = pipeline(model=str(lora_output), trust_remote_code=True)
    assert type(generator).__name__ == "InstructionTextGenerationPipeline"
    assert isinstance(generator("Hi?", max_new_tokens=3, do_sample=False)[0]["generated_text"], str)


def test_merged_and_adapter_give_the_same_logits(lora_output):
    merged, tokenizer = load_model_tokenizer_for_generate(str(lora_output), dtype=torch.float32, device_map="cpu")
    adapted, adapter_tokenizer = load_model_tokenizer_for_generate(
        str(lora_output / "adapter"), dtype=torch.float32, device_map="cpu"
    )
    assert type(adapted).__name__ == "PeftModelForCausalLM"
    assert len(tokenizer) == len(adapter_tokenizer)
    ids = tokenizer("### Instruction:\nName a fruit.\n\n### Response:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


def test_new_tokens_rows_were_learned_and_the_rest_stayed_frozen(lora_output, tiny_model_dir):
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = load_file(str(lora_output / "model.safetensors"))
    initial_model, tokenizer = get_model_tokenizer(str(tiny_model_dir))  # the rows as training started
    initial = {
        "gpt_neox.embed_in.weight": initial_model.get_input_embeddings().weight.detach(),
        "embed_out.weight": initial_model.get_output_embeddings().weight.detach(),
    }
    end, instruction, response = tokenizer.convert_tokens_to_ids([END_KEY, "### Instruction:", RESPONSE_KEY_NL])
    # What must learn: the prompt keys as inputs, and "### End" as a prediction. ("### End" is always a record's
    # last token, so its input row gets no gradient at all.)
    learned = {"gpt_neox.embed_in.weight": [instruction, response], "embed_out.weight": [end]}
    old_ids = [5, 100, 300]
    for name, rows in learned.items():
        assert base[name].shape == merged[name].shape  # the tokens fit in Pythia's padded rows
        for token in rows:
            assert not torch.allclose(initial[name][token], merged[name][token]), (name, token)
        torch.testing.assert_close(base[name][old_ids], merged[name][old_ids])  # the rest stayed frozen


def test_adapter_only_output_when_not_merging(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "adapter-only"
    assert_finished(
        invoke_trainer(
            quick_training_args(
                tiny_model_dir,
                sample_path,
                out,
                "--lora-r",
                "4",
                "--no-merge-lora",
                "--max-steps",
                "2",
                "--test-size",
                "0",
            )
        )
    )
    assert is_adapter_dir(out) and (out / "tokenizer.json").exists()
    model, _ = load_model_tokenizer_for_generate(str(out), device_map="cpu")
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_llama_lora_targets_and_tied_embeddings(tiny_model_dir):
    """A tied-embedding Llama trains only its input rows (the output is the same tensor)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    assert list(new_token_rows(model, tokenizer)) == ["embed_tokens"]
    wrapped = apply_lora(model, tokenizer, LoraSettings(r=4))
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in name for name in trainable) and any("down_proj.lora_B" in name for name in trainable)
    assert any("trainable_tokens" in name for name in trainable)
    assert not any(name.endswith("embed_tokens.weight") for name in trainable)


def test_quantized_training_needs_lora_and_no_zero3(tiny_model_dir, sample_path, tmp_path):
    from training.trainer import train

    with pytest.raises(ValueError, match="give --lora-r > 0"):
        train(input_model=str(tiny_model_dir), local_output_dir=str(tmp_path / "a"), load_in_8bit=True)
    with pytest.raises(ValueError, match="ZeRO-3 cannot partition bitsandbytes weights"):
        train(
            input_model=str(tiny_model_dir),
            local_output_dir=str(tmp_path / "b"),
            load_in_4bit=True,
            lora_r=8,
            deepspeed=str(PROJECT_ROOT / "config/cpu_config.json"),
        )


def test_qlora_trains_on_a_4bit_base_and_merges(tiny_model_dir, sample_path, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert_finished(
        invoke_trainer(
            quick_training_args(
                tiny_model_dir,
                sample_path,
                out,
                "--lora-r",
                "4",
                "--load-in-4bit",
                "--max-steps",
                "2",
            )  # with an evaluation at step 2: on CPU it once repacked the 4-bit weights for inference for good
        )
    )
    merged, tokenizer = load_model_tokenizer_for_generate(str(out), dtype=torch.float32, device_map="cpu")
    assert not any("4bit" in type(m).__name__ for m in merged.modules())  # merged into a full-precision base
    quantized, _ = load_model_tokenizer_for_generate(str(out), load_in_4bit=True, device_map="cpu")
    assert any("Linear4bit" in type(m).__name__ for m in quantized.modules())
    assert is_adapter_dir(out / "adapter")
