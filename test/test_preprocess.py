"""Loss masking: only the response and "### End" are learned, whatever the context contains."""

import logging

import pytest
from datasets import Dataset

from training.consts import END_KEY, RESPONSE_KEY_NL
from training.data import DatasetRecordError
from training.preprocess import IGNORE_INDEX, preprocess_batch, preprocess_dataset
from training.prompts import format_training_text
from training.rank.collators import DataCollatorForCompletionOnlyLM
from training.rank.modeling import load_tokenizer

TRICKY_CONTEXT = "A quoted template:\n### Response:\nnot the answer, part of the context."


@pytest.fixture(scope="module", params=["tiny-pythia", "smollm2"])
def tokenizer(request):
    if request.param == "tiny-pythia":
        return load_tokenizer(str(request.getfixturevalue("tiny_model_dir")))
    return load_tokenizer(str(request.getfixturevalue("embedded_model_dir")))


def batch_of(*records):
    keys = ("instruction", "context", "response")
    batch = {k: [r[k] for r in records] for k in keys}
    batch["text"] = [format_training_text(r["instruction"], r["response"], r["context"]) for r in records]
    return batch


def learned_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_special_tokens_added_and_pad_set(tokenizer):
    added = tokenizer.get_added_vocab()
    assert {END_KEY, RESPONSE_KEY_NL, "### Instruction:"} <= set(added)
    assert tokenizer.pad_token is not None
    assert len(tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False)) == 1


@pytest.mark.parametrize("context", ["", "Paris is in France.", TRICKY_CONTEXT])
def test_only_response_and_end_are_learned(tokenizer, context):
    record = {"instruction": "Where is Paris?", "context": context, "response": "In France."}
    out = preprocess_batch(batch_of(record), tokenizer, 2048)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert len(ids) == len(labels)
    assert learned_text(tokenizer, labels) == f"In France.\n\n{END_KEY}"
    # Everything before the first learned token is the prompt, ending with the response key.
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert tokenizer.decode(ids[:first]).endswith(RESPONSE_KEY_NL)
    assert all(t == IGNORE_INDEX for t in labels[:first])


def test_context_with_response_key_is_not_mistaken_for_the_prompt_end(tokenizer):
    record = {"instruction": "Quote it.", "context": TRICKY_CONTEXT, "response": "Done."}
    out = preprocess_batch(batch_of(record), tokenizer, 2048)
    key_id = tokenizer.convert_tokens_to_ids(RESPONSE_KEY_NL)
    assert out["input_ids"][0].count(key_id) == 2  # one in the context, one ending the prompt
    assert "not the answer" not in learned_text(tokenizer, out["labels"][0])


def test_pad_equal_to_eos_keeps_a_real_eos_in_the_labels(tokenizer):
    """With pad == EOS, Dolly's collator masked every EOS; ours masks only the padding."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    eos = tokenizer.eos_token
    short = {"instruction": "Say a word.", "context": "", "response": f"Word{eos}"}
    long = {
        "instruction": "Say a sentence, please, a long one.",
        "context": "",
        "response": "A much longer answer here.",
    }
    features = preprocess_batch(batch_of(short, long), tokenizer, 2048)
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(features["input_ids"], features["labels"])]
    batch = DataCollatorForCompletionOnlyLM(tokenizer=tokenizer)(examples)
    row_ids, row_labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    length = len(examples[0]["input_ids"])
    eos_positions = [i for i in range(length) if row_ids[i] == tokenizer.eos_token_id]
    assert eos_positions and all(row_labels[i] == tokenizer.eos_token_id for i in eos_positions)
    assert all(label == IGNORE_INDEX for label in row_labels[length:])  # the padding
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"][0].sum().item() == length


def test_collator_masks_text_only_examples_after_the_last_response_key(tokenizer):
    text = format_training_text("Quote it.", "Done.", TRICKY_CONTEXT)
    batch = DataCollatorForCompletionOnlyLM(tokenizer=tokenizer)([{"input_ids": tokenizer(text)["input_ids"]}])
    assert learned_text(tokenizer, batch["labels"][0].tolist()) == f"Done.\n\n{END_KEY}"


def test_missing_response_key_is_a_clear_error(tokenizer):
    ids = tokenizer("No template here at all.")["input_ids"]
    with pytest.raises(RuntimeError, match="Could not find response key"):
        DataCollatorForCompletionOnlyLM(tokenizer=tokenizer)([{"input_ids": ids}])
    with pytest.raises(DatasetRecordError, match="record 1: field 'text': no response key"):
        preprocess_batch({"text": ["No template here at all."]}, tokenizer, 2048)


def test_long_records_are_removed_with_a_log(tokenizer, sample_path, caplog):
    lengths = sorted(
        len(ids) for ids in preprocess_dataset(tokenizer, 100_000, training_dataset=str(sample_path))["input_ids"]
    )
    limit = lengths[len(lengths) // 2]
    expected_removed = sum(length > limit for length in lengths)
    with caplog.at_level(logging.WARNING):
        dataset = preprocess_dataset(tokenizer, max_length=limit, training_dataset=str(sample_path))
    assert dataset.num_rows == 41 - expected_removed and expected_removed > 0
    assert all(len(ids) <= limit for ids in dataset["input_ids"])
    assert any(f"Removed {expected_removed} of 41 records" in r.message for r in caplog.records)


def test_all_records_too_long_is_an_error(tokenizer, sample_path):
    with pytest.raises(ValueError, match="every record is longer than the max length of 5 tokens"):
        preprocess_dataset(tokenizer, max_length=5, training_dataset=str(sample_path))


def test_preprocess_accepts_an_in_memory_dataset(tokenizer):
    record = {"instruction": "Hi?", "context": "", "response": "Hello.", "category": ""}
    dataset = Dataset.from_list([{**record, "text": format_training_text("Hi?", "Hello.")}] * 3)
    assert preprocess_dataset(tokenizer, 2048, training_dataset=dataset).num_rows == 3


def test_new_tokens_start_from_what_the_model_knows(tiny_model_dir, tmp_path):
    """### End starts as EOS (input and output rows); the other keys as the mean of their sub-tokens."""
    import torch

    from training.rank.modeling import get_model_tokenizer

    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    end = tokenizer.convert_tokens_to_ids(END_KEY)
    for matrix in (inputs, outputs):
        torch.testing.assert_close(matrix[end], matrix[tokenizer.eos_token_id])
        key = tokenizer.convert_tokens_to_ids(RESPONSE_KEY_NL)
        pieces = tokenizer(RESPONSE_KEY_NL, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert len(pieces) > 1
        torch.testing.assert_close(matrix[key], matrix[pieces].mean(dim=0))

    # A model whose tokenizer already has the keys (a Dolly model) keeps its trained rows.
    with torch.no_grad():
        inputs[end] += 1.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = get_model_tokenizer(str(tmp_path))
    torch.testing.assert_close(reloaded.get_input_embeddings().weight[end], inputs[end])
