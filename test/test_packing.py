"""Packing must not change what is learned: records in a packed row are isolated, and the loss is normalised per
response token over the whole optimizer step, however records are grouped into rows, micro-batches and steps."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from training.preprocess import IGNORE_INDEX, preprocess_dataset
from training.rank.collators import DataCollatorForCompletionOnlyLM
from training.rank.modeling import get_model_tokenizer
from training.rank.packing import (
    DataCollatorForPackedCompletionOnlyLM,
    packing_collator,
    record_bounds,
    restore_attention,
    supports_packing,
)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def records(model_and_tokenizer, sample_path):
    _, tokenizer = model_and_tokenizer
    return list(preprocess_dataset(tokenizer, 4096, training_dataset=str(sample_path)))


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config).eval()
    assert model.config.use_cache  # the collator alone must keep packed records apart
    return model


def record_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of one record."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("attention", ["sdpa", "packed"])
@pytest.mark.parametrize("architecture", ["gpt_neox", "llama"])
def test_each_record_in_a_packed_row_matches_the_record_alone(model_and_tokenizer, records, architecture, attention):
    model, tokenizer = model_and_tokenizer
    if architecture == "llama":
        model = tiny_llama(len(tokenizer))
    if attention == "packed":
        packing_collator(model, tokenizer, device="cpu")  # the per-record kernel training uses on a CPU
    assert supports_packing(model)
    chosen = records[:4]
    packed = DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer, response_logits_only=False)(chosen)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        start = 0
        for record in chosen:
            ids = torch.tensor([record["input_ids"]])
            alone = model(input_ids=ids).logits[0]
            inside = packed_logits[start : start + ids.shape[1]]
            torch.testing.assert_close(inside, alone, atol=1e-4, rtol=1e-4)
            labels = torch.tensor(record["labels"])
            torch.testing.assert_close(record_loss(inside, labels), record_loss(alone, labels), atol=1e-3, rtol=1e-5)
            start += ids.shape[1]
    restore_attention(model)


def test_response_only_logits_give_the_same_loss(model_and_tokenizer, records):
    model, tokenizer = model_and_tokenizer
    full = DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer, response_logits_only=False)(records[:5])
    trimmed = DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer)(records[:5])
    responses = int((full["labels"] != IGNORE_INDEX).sum())
    assert trimmed["shift_labels"].shape[1] == responses == trimmed["logits_to_keep"].numel()
    with torch.no_grad():
        full_out = model(**full)
        trimmed_out = model(**trimmed)
    assert trimmed_out.logits.shape[1] == responses < full_out.logits.shape[1]
    torch.testing.assert_close(trimmed_out.loss, full_out.loss, atol=1e-5, rtol=1e-5)


def test_nothing_is_learned_across_a_record_boundary(model_and_tokenizer, records):
    _, tokenizer = model_and_tokenizer
    packed = DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer)(records[:3])
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 3
    assert all(packed["labels"][0, s].item() == IGNORE_INDEX for s in starts)


def one_sgd_step(tiny_model_dir, dataset, tmp_path, collator, batch_size: int, accumulation: int):
    torch.manual_seed(0)  # the added tokens' embedding rows are drawn at random when resizing
    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        train_sampling_strategy="sequential",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        max_grad_norm=0.0,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator(tokenizer=tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, trainer.state.log_history[0]["loss"]


def test_one_step_is_the_same_however_records_are_grouped(tiny_model_dir, records, tmp_path):
    """Packed 8 per row, padded 4 x 2 accumulation steps, padded 1 x 8: the same update, the same logged loss."""
    from datasets import Dataset

    dataset = Dataset.from_list(records[:8])
    packed, packed_loss = one_sgd_step(
        tiny_model_dir, dataset, tmp_path / "a", DataCollatorForPackedCompletionOnlyLM, 8, 1
    )
    padded, padded_loss = one_sgd_step(tiny_model_dir, dataset, tmp_path / "b", DataCollatorForCompletionOnlyLM, 4, 2)
    single, single_loss = one_sgd_step(tiny_model_dir, dataset, tmp_path / "c", DataCollatorForCompletionOnlyLM, 1, 8)
    assert padded_loss == pytest.approx(packed_loss, rel=1e-4)
    assert single_loss == pytest.approx(packed_loss, rel=1e-4)
    for name, weight in packed.items():
        torch.testing.assert_close(padded[name], weight, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(single[name], weight, atol=1e-5, rtol=1e-4, msg=name)


def test_record_bounds_follow_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert record_bounds(positions) == [(0, 3), (3, 5), (5, 9)]


@pytest.mark.parametrize("architecture", ["gpt_neox", "llama"])
def test_every_layer_gets_the_collators_record_bounds(model_and_tokenizer, records, architecture, monkeypatch):
    """The bounds are computed once per batch, in the collator, and handed down to each layer's attention as plain
    integers: no layer reads the position ids back from the device (record_bounds() is never called)."""
    from transformers import AttentionInterface

    import training.rank.packing as packing
    from training.rank.packed_attention import PER_RECORD_SDPA, KernelChoice, make_packed_attention

    model, tokenizer = model_and_tokenizer
    if architecture == "llama":
        model = tiny_llama(len(tokenizer))
    chosen = records[:4]
    packed = DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer, response_logits_only=False)(chosen)
    lengths = [len(record["input_ids"]) for record in chosen]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert packed["record_bounds"] == tuple((start, start + n) for start, n in zip(starts, lengths))
    assert all(isinstance(edge, int) for bound in packed["record_bounds"] for edge in bound)
    assert packed["cu_seq_lens_q"].tolist() == starts + [sum(lengths)] and packed["max_length_q"] == max(lengths)
    # The bounds are the records of the row: position ids restart exactly there.
    assert record_bounds(packed["position_ids"]) == list(packed["record_bounds"])

    seen = []
    per_record = make_packed_attention(KernelChoice(PER_RECORD_SDPA, "test"))

    def spying_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get("record_bounds"))
        return per_record(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("spy", spying_attention)  # no mask function, as the packed attention
    monkeypatch.setattr(packing, "record_bounds", lambda *_: pytest.fail("bounds read back from position ids"))
    model.set_attn_implementation("spy")
    try:
        with torch.no_grad():
            packed_logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
            for start, record in zip(starts, chosen):
                alone = model(input_ids=torch.tensor([record["input_ids"]])).logits[0]
                torch.testing.assert_close(
                    packed_logits[start : start + len(record["input_ids"])], alone, atol=1e-4, rtol=1e-4
                )
    finally:
        model.set_attn_implementation("sdpa")
    layers = model.config.num_hidden_layers
    assert seen[:layers] == [packed["record_bounds"]] * layers  # every layer of the packed forward


def test_flash_attention_is_chosen_only_where_it_can_run(monkeypatch):
    import importlib.util

    from training.rank.modeling import training_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert training_attention("bf16") == "flash_attention_2" and training_attention("fp32") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_attention("bf16") is None


# ---- the packing self-check (training.rank.packing_check) ----


def every_logit(tokenizer) -> DataCollatorForPackedCompletionOnlyLM:
    """The training collator as the self-check packs with it: logits at every position."""
    return DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer, response_logits_only=False)


def leak_between_neighbours(model) -> None:
    """Make every layer mix each token with the one before it (as token-shift and convolution layers do): records
    packed into one row then see each other, whatever the attention does."""

    def shift(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mixed = hidden + 0.5 * torch.nn.functional.pad(hidden, (0, 0, 1, 0))[:, :-1]
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    for layer in model.gpt_neox.layers:
        layer.register_forward_hook(shift)


@pytest.mark.parametrize("architecture", ["gpt_neox", "llama"])
def test_the_packing_self_check_passes_where_records_stay_apart(tiny_model_dir, records, architecture):
    from training.rank.packing import packing_collator, restore_attention
    from training.rank.packing_check import check_packing, check_records

    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    if architecture == "llama":
        model = tiny_llama(len(tokenizer))
    assert packing_collator(model, tokenizer) is not None  # per-record attention on, as in training
    try:
        result = check_packing(model, check_records(records), "fp32", pack=every_logit(tokenizer))
    finally:
        restore_attention(model)
    assert result.passed and result.records == 3 and result.difference < 1e-4, result.describe()


def test_the_packing_self_check_catches_records_that_see_each_other(tiny_model_dir, records):
    from training.rank.packing import packing_collator, restore_attention
    from training.rank.packing_check import check_packing, check_records

    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    leak_between_neighbours(model)
    packing_collator(model, tokenizer)
    try:
        result = check_packing(model, check_records(records), "fp32", pack=every_logit(tokenizer))
    finally:
        restore_attention(model)
    assert not result.passed and result.difference > 100 * result.tolerance * result.scale, result.describe()


def test_a_leaky_model_trains_padded_or_refuses_when_packing_is_asked_for(
    tiny_model_dir, sample_path, tmp_path, monkeypatch
):
    from helpers import assert_finished, invoke_trainer, quick_training_args

    import training.rank.prepare as prepare

    load = prepare.load_for_training

    def leaky_load(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        leak_between_neighbours(model)
        return model, tokenizer

    monkeypatch.setattr(prepare, "load_for_training", leaky_load)
    args = quick_training_args(tiny_model_dir, sample_path, tmp_path / "auto", "--max-steps", "1", "--no-mlflow")
    run = invoke_trainer(args)
    assert_finished(run)
    assert (
        "Packing self-check failed (3 records packed into one row against each alone: largest logit difference"
        in run.log
        and "trains on padded batches" in run.log
    )
    assert "Batching with DataCollatorForCompletionOnlyLM" in run.log
    refused = invoke_trainer(
        quick_training_args(
            tiny_model_dir, sample_path, tmp_path / "asked", "--max-steps", "1", "--no-mlflow", "--packing"
        )
    )
    assert refused.exit_code == 1 and "--packing: the packing self-check failed on this model" in refused.log
    assert "Batching with" not in refused.log  # refused before training


@pytest.mark.launch
def test_ranks_whose_packing_checks_disagree_all_train_on_padded_batches(tiny_model_dir, sample_path, tmp_path):
    from helpers import assert_ok, run_trainer, zero3_run_args

    run = run_trainer(
        zero3_run_args(tiny_model_dir, sample_path, tmp_path / "out", "--max-steps", "2"),
        ranks=2,
        module="fault_injection",
        env={"DOLLY_FAULT": "packing-check-fails-on-rank:1"},
    )
    assert_ok(run)
    log = run.stdout + run.stderr
    # Rank 0's own check passed; rank 1's failed: rank 0 takes the verdict too, and says so once.
    assert log.count("Packing self-check failed") == 1 and "Packing self-check failed (on another rank; here:" in log
    assert "Batching with DataCollatorForCompletionOnlyLM" in log
    assert "Batching with DataCollatorForPackedCompletionOnlyLM" not in log


def test_tokens_seen_are_counted_on_the_host_and_gathered_when_logged(tiny_model_dir, records, tmp_path):
    """A packed row's token count is its shape: added up on the host each micro-step, gathered at logging and saving
    steps, it comes to every token of the epoch, in the log and in the saved trainer state."""
    import json

    from datasets import Dataset

    from training.rank.dolly_trainer import DollyTrainer
    from training.rank.packing import Batching

    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    chosen = records[:16]  # 8 micro-steps of 2 records, 4 optimizer steps
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        logging_steps=2,
        save_steps=4,
        save_strategy="steps",
        report_to=[],
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        use_cpu=True,
    )
    trainer = DollyTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(chosen),
        batching=Batching(DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer)),
        processing_class=tokenizer,
    )
    gathers = []
    gather = trainer.accelerator.gather
    trainer.accelerator.gather = lambda tensor: gathers.append(tensor) or gather(tensor)
    trainer.train()
    # One gather (and one wait for the device) per log and per save, not one per micro-step (the Trainer's 8).
    assert len(gathers) == 4  # logs at steps 2 and 4, the save at step 4, the closing log
    total = sum(len(record["input_ids"]) for record in chosen)
    assert trainer.state.num_input_tokens_seen == total and trainer._tokens_not_gathered == 0
    logged = [entry["num_input_tokens_seen"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and 0 < logged[0] < logged[1] == total
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["num_input_tokens_seen"] == total
