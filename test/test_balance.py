"""Token-balanced ranks: each optimizer step trains on the same records as before, split so that every rank gets
about the same work, and the update is the same (the loss is normalised by the step's response tokens over all
ranks)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SeedableRandomSampler
from helpers import assert_ok, max_weight_difference, run_trainer, zero3_run_args
from torch.utils.data import BatchSampler

from training.rank.dolly_trainer import balanced_sampler
from training.rank.modeling import get_model_tokenizer

TOLERANCE = 1e-5  # measured: the largest weight difference was 5e-7 (packed) and 3e-7 (padded), losses equal to 1e-6


@pytest.fixture(scope="module")
def lengths(tiny_model_dir, sample_path) -> list[int]:
    from training.preprocess import preprocess_dataset

    _, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    return [len(r["input_ids"]) for r in preprocess_dataset(tokenizer, 4096, training_dataset=str(sample_path))]


def todays_split(
    n: int, seed: int, epoch: int, per_device: int, accumulation: int, world: int
) -> list[list[list[int]]]:
    """Each rank's micro-batches as the Trainer and accelerate make them without balancing: one shuffled order
    (seed + epoch; every rank shuffles alike), cut into per-device batches, dealt round-robin to the ranks."""
    ranks = []
    for rank in range(world):
        torch.manual_seed(seed)  # what the Trainer's set_seed leaves for accelerate's sampler to start from
        sampler = SeedableRandomSampler(data_source=range(n))
        sampler.set_epoch(epoch)
        batches = BatchSampler(sampler, batch_size=per_device, drop_last=False)
        ranks.append(list(BatchSamplerShard(batches, num_processes=world, process_index=rank)))
    return ranks


def balanced_split(lengths, seed, epoch, per_device, accumulation, world, packed=True):
    ranks = []
    for rank in range(world):
        args = SimpleNamespace(
            world_size=world,
            gradient_accumulation_steps=accumulation,
            train_batch_size=per_device,
            data_seed=None,
            seed=seed,
            process_index=rank,
            dataloader_drop_last=False,
        )
        sampler = balanced_sampler(
            {"input_ids": [[0] * n for n in lengths]}, args, hidden_size=576 if packed else None
        )  # SmolLM2-135M's
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    return ranks


def steps(split: list[list[list[int]]], accumulation: int) -> list[set[int]]:
    """The set of records in each optimizer step, over every rank and micro-batch."""
    count = len(split[0]) // accumulation
    return [
        {index for rank in split for batch in rank[step * accumulation : (step + 1) * accumulation] for index in batch}
        for step in range(count)
    ]


@pytest.mark.parametrize("world, per_device, accumulation", [(2, 4, 1), (2, 2, 2), (4, 2, 1), (1, 4, 2)])
@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("packed", [True, False])
def test_every_step_trains_on_the_records_it_trained_on_before(lengths, world, per_device, accumulation, epoch, packed):
    full_steps = len(lengths) // (world * per_device * accumulation)  # the epoch's last, partial step may differ
    before = steps(todays_split(len(lengths), 11, epoch, per_device, accumulation, world), accumulation)
    after = steps(balanced_split(lengths, 11, epoch, per_device, accumulation, world, packed), accumulation)
    assert after[:full_steps] == before[:full_steps]


def test_each_rank_gets_about_the_same_tokens(lengths):
    """On the sample's records, 8 per step over 2 ranks: how unequal the ranks' tokens are per step."""

    def imbalance(split):  # the largest rank's tokens over the mean, per step, averaged
        ratios = []
        for step in range(len(split[0])):
            tokens = [sum(lengths[i] for i in rank[step]) for rank in split]
            ratios.append(max(tokens) / (sum(tokens) / len(tokens)))
        return sum(ratios) / len(ratios)

    before, after = (
        imbalance(todays_split(len(lengths), 11, 0, 4, 1, 2)),
        imbalance(balanced_split(lengths, 11, 0, 4, 1, 2)),
    )
    print(f"largest rank over the mean, per step: {before:.3f} unbalanced, {after:.3f} balanced")
    assert after < before and after < 1.1


def losses(out) -> list[float]:
    return [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]


@pytest.mark.launch
def test_balanced_ranks_give_the_same_update_packed(tiny_model_dir, sample_path, tmp_path, zero3_run):
    out = tmp_path / "unbalanced"
    assert_ok(run_trainer(zero3_run_args(tiny_model_dir, sample_path, out, "--no-balance-ranks"), ranks=2))
    assert max_weight_difference(zero3_run.out / "model.safetensors", out / "model.safetensors") <= TOLERANCE
    assert losses(zero3_run.out) == pytest.approx(losses(out), abs=TOLERANCE)


@pytest.mark.launch
def test_balanced_ranks_give_the_same_update_padded(tiny_model_dir, sample_path, tmp_path):
    balanced, unbalanced = tmp_path / "balanced", tmp_path / "unbalanced"
    assert_ok(run_trainer(zero3_run_args(tiny_model_dir, sample_path, balanced, "--no-packing"), ranks=2))
    assert_ok(
        run_trainer(
            zero3_run_args(tiny_model_dir, sample_path, unbalanced, "--no-packing", "--no-balance-ranks"),
            ranks=2,
        )
    )
    assert max_weight_difference(balanced / "model.safetensors", unbalanced / "model.safetensors") <= TOLERANCE
    assert losses(balanced) == pytest.approx(losses(unbalanced), abs=TOLERANCE)


@pytest.mark.parametrize("packed", [True, False])
def test_a_resume_skips_trained_steps_without_assigning_them(lengths, packed, monkeypatch):
    """After skip_next(N micro-batches), a pass yields N placeholders, which accelerate's skipping sampler drops, then
    exactly what a full pass yields from there; the skipped steps' records are never assigned."""
    import numpy as np
    from accelerate.data_loader import SkipBatchSampler

    args = SimpleNamespace(
        world_size=2,
        gradient_accumulation_steps=2,
        train_batch_size=2,
        data_seed=None,
        seed=3,
        process_index=1,
        dataloader_drop_last=False,
    )
    sampler = balanced_sampler({"input_ids": [[0] * n for n in lengths]}, args, hidden_size=576 if packed else None)
    assert isinstance(sampler.lengths, np.ndarray)  # never a Python list of every record's length
    sampler.set_epoch(1)
    full = list(sampler)
    assigned = []
    real_assign = type(sampler)._assign
    monkeypatch.setattr(type(sampler), "_assign", lambda self, *a: assigned.append(1) or real_assign(self, *a))
    skipped = 4  # two optimizer steps of 2 micro-batches
    sampler.skip_next(skipped)
    resumed = list(SkipBatchSampler(sampler, skip_batches=skipped))
    assert resumed == full[skipped:] and len(assigned) == len(full) // 2 - 2
    assert list(sampler) == full  # the skip was for one pass only
