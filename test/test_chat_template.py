"""Every saved model carries Dolly's format as its chat template: a chat prompt is byte for byte the pipeline's
prompt, in chat_template.jinja and in tokenizer_config.json (where TGI reads it)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_finished, invoke_trainer, quick_training_args
from transformers import AutoTokenizer

from training.generate import load_model_tokenizer_for_generate
from training.saved_model.chat_template import DOLLY_CHAT_TEMPLATE
from training.saved_model.consts import END_KEY, INTRO_BLURB
from training.saved_model.instruct_pipeline import InstructionTextGenerationPipeline
from training.saved_model.prompts import format_generation_prompt, format_training_text

OUTPUTS = {"full": [], "lora-merged": ["--lora-r", "4"], "adapter": ["--lora-r", "4", "--no-merge-lora"]}


@pytest.fixture(scope="module", params=sorted(OUTPUTS))
def saved(request, tiny_model_dir, sample_path, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    args = quick_training_args(tiny_model_dir, sample_path, out, "--max-steps", "2", "--test-size", "0")
    assert_finished(invoke_trainer([*args, "--no-mlflow", *OUTPUTS[request.param]]))
    return out


def test_the_chat_prompt_is_the_pipelines_prompt_in_both_files(saved):
    tokenizer = AutoTokenizer.from_pretrained(str(saved))
    assert (saved / "chat_template.jinja").read_text() == DOLLY_CHAT_TEMPLATE
    assert json.loads((saved / "tokenizer_config.json").read_text())["chat_template"] == DOLLY_CHAT_TEMPLATE
    for instruction, context in [("Name a colour.", None), ("Who wrote it?", "Hamlet is a play by Shakespeare.")]:
        message = {"role": "user", "content": instruction, **({"context": context} if context else {})}
        prompt = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
        assert prompt == format_generation_prompt(instruction, context)


def test_greedy_generation_from_the_chat_prompt_is_the_pipelines_answer(saved):
    model, tokenizer = load_model_tokenizer_for_generate(str(saved), device_map="cpu")
    pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer, max_new_tokens=8, do_sample=False)
    expected = pipeline("Name a colour.")[0]["generated_text"]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    # The saved generation config stops at ### End, as the pipeline does.
    assert tokenizer.convert_tokens_to_ids(END_KEY) in list(model.generation_config.eos_token_id)
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    new = new.tolist()
    end = tokenizer.convert_tokens_to_ids(END_KEY)
    answer = tokenizer.decode(new[: new.index(end)] if end in new else new, skip_special_tokens=True).strip()
    assert answer == expected


def test_system_messages_context_and_earlier_turns_follow_dollys_training_text(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.chat_template = DOLLY_CHAT_TEMPLATE
    turns = [
        {"role": "user", "content": "Who wrote Hamlet?", "context": "Hamlet is a tragedy."},
        {"role": "assistant", "content": "Shakespeare."},
        {"role": "user", "content": "When?"},
    ]
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    first = format_training_text("Who wrote Hamlet?", "Shakespeare.", "Hamlet is a tragedy.")
    # Earlier turns as Dolly's training records (each closed by ### End), the last as the generation prompt.
    assert prompt == first + format_generation_prompt("When?").removeprefix(INTRO_BLURB)
    system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert system == format_generation_prompt("Hi.").replace(INTRO_BLURB, "You answer briefly.")
    with pytest.raises(Exception, match="system \\(first only\\), user and assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
