"""Code written against databrickslabs/dolly runs here unchanged: each call below is written as Dolly writes it.

Where Dolly's behaviour was a bug, the test says so and checks our fix instead.
"""

import pytest
import torch

from training.consts import RESPONSE_KEY_NL
from training.generate import InstructionTextGenerationPipeline, generate_response, load_model_tokenizer_for_generate
from training.preprocess import IGNORE_INDEX
from training.prompts import format_training_text
from training.trainer import DataCollatorForCompletionOnlyLM, load_tokenizer, preprocess_batch


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_model_tokenizer_for_generate(str(tiny_model_dir))


def dolly_texts():
    return [format_training_text("Name a colour.", "Blue.", ""),
            format_training_text("Summarise this.", "A short summary.", "A long passage about something.")]


def test_collator_as_dolly_trainer_builds_and_feeds_it(tokenizer):
    # training/trainer.py (Dolly): the collator, then the Trainer feeds it examples that carry only input_ids.
    data_collator = DataCollatorForCompletionOnlyLM(
        tokenizer=tokenizer, mlm=False, return_tensors="pt", pad_to_multiple_of=8
    )
    features = preprocess_batch({"text": dolly_texts()}, tokenizer, 512)
    batch = data_collator([{"input_ids": ids} for ids in features["input_ids"]])
    assert batch["input_ids"].shape[1] % 8 == 0
    response_key = tokenizer.encode(RESPONSE_KEY_NL)
    for row, ids in enumerate(features["input_ids"]):
        start = next(i for i in range(len(ids)) if ids[i : i + len(response_key)] == response_key) + len(response_key)
        assert (batch["labels"][row, :start] == IGNORE_INDEX).all()  # the prompt is not learned
        assert batch["labels"][row, start : len(ids)].tolist() == ids[start:]  # the response is


def test_collator_refuses_masked_language_modelling(tokenizer):
    with pytest.raises(ValueError, match="mlm=True"):
        DataCollatorForCompletionOnlyLM(tokenizer=tokenizer, mlm=True)


def test_preprocess_batch_with_only_text(tokenizer):
    # training/trainer.py (Dolly): preprocess_batch(batch, tokenizer, max_length) on a batch of "text" alone.
    result = preprocess_batch({"text": dolly_texts()}, tokenizer, 512)
    assert [tokenizer.decode(ids) for ids in result["input_ids"]] == dolly_texts()


def test_generate_response_with_the_notebooks_pipeline_kwargs(model_and_tokenizer):
    # train_dolly.py (Dolly), last cell: generate_response(instruction, model=model, tokenizer=tokenizer, **pipeline_kwargs)
    model, tokenizer = model_and_tokenizer
    pipeline_kwargs = {"torch_dtype": "bfloat16"}
    response = generate_response("Name a colour.", model=model, tokenizer=tokenizer, max_new_tokens=4, **pipeline_kwargs)
    assert isinstance(response, str)


def test_pipeline_as_the_langchain_example_builds_it(model_and_tokenizer):
    # examples/langchain.py (Dolly): the full text, because LangChain's HuggingFacePipeline expects it.
    model, tokenizer = model_and_tokenizer
    pipeline = InstructionTextGenerationPipeline(
        model=model, tokenizer=tokenizer, return_full_text=True, task="text-generation"
    )
    generated = pipeline("Name a colour.", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert generated.startswith("Name a colour.\n")


def test_pipeline_example_two_samples_per_instruction(model_and_tokenizer):
    # examples/pipeline.py (Dolly): two samples per instruction.
    model, tokenizer = model_and_tokenizer
    generation_pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)
    torch.manual_seed(0)
    results = generation_pipeline("Name a colour.", num_return_sequences=2, max_new_tokens=4)
    assert len(results) == 2 and all(isinstance(res["generated_text"], str) for res in results)


def test_generation_example_and_notebook_load_and_answer(tiny_model_dir):
    # examples/generation.py and train_dolly.py (Dolly): load a trained folder by path, then answer.
    input_model = str(tiny_model_dir)
    model, tokenizer = load_model_tokenizer_for_generate(input_model)
    response = generate_response("Name a colour.", model=model, tokenizer=tokenizer)
    assert isinstance(response, str)


def test_dolly_unit_tests_with_a_local_model_and_data(tiny_model_dir, sample_path):
    # test/test_trainer.py (Dolly) calls load_tokenizer() and load_training_dataset() with their hub defaults;
    # offline, the same calls take a local model folder and data file.
    from training.trainer import load_training_dataset

    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.decode(tokenizer.encode("Hello Dolly!")) == "Hello Dolly!"
    dataset = load_training_dataset(str(sample_path))
    assert dataset.num_rows == 41


@pytest.mark.slow
def test_train_with_dollys_keyword_arguments(tiny_model_dir, sample_path, tmp_path):
    # training/trainer.py (Dolly): main(**kwargs) calls train() with exactly these keywords (its CLI's options).
    from training.trainer import train

    train(
        input_model=str(tiny_model_dir),
        local_output_dir=str(tmp_path / "out"),
        dbfs_output_dir=None,
        epochs=1,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        lr=1e-5,
        seed=42,
        deepspeed=None,
        gradient_checkpointing=True,
        local_rank=True,
        bf16=False,
        logging_steps=10,
        save_steps=200,
        eval_steps=50,
        test_size=8,
        save_total_limit=10,
        warmup_steps=0,
        training_dataset=str(sample_path),
    )
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "model.safetensors").exists()
