"""The Hugging Face Trainer as a run uses it: its arguments, built once from the settings, and the Trainer itself."""

from __future__ import annotations

import heapq
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

from ..preprocess import length_column
from .checkpoints import CheckpointCompletion
from .distributed import is_main_process
from .eval_answers import EvalAnswers, log_answers, sample_prompts
from .host_waits import HostWaitCounter
from .packing import Batching, DataCollatorForPackedCompletionOnlyLM, packed_batches, plain_attention, unwrap
from .packing_check import check_records
from .run_record import RunRecorder
from .saving import save_failed
from .stopping import StopAtStepEnd, StopRequests

if TYPE_CHECKING:
    from .prepare import PreparedRun

logger = logging.getLogger(__name__)


class DollyTrainer(Trainer):
    """The Hugging Face Trainer, batching as the run chose (``batching``), with a checkpoint that cannot be written
    reported as what it is, and the tokens per second since the last log in every training log (so MLflow and
    TensorBoard show throughput per step)."""

    _last_log: tuple[float, int] | None = None  # (time, input tokens seen) at the previous training log
    _tokens_not_gathered = 0  # this rank's packed tokens since the last gather (see _track_num_input_tokens)

    def __init__(
        self,
        *args,
        batching: Batching,
        balance_ranks: bool = False,
        eval_answers: EvalAnswers | None = None,
        **kwargs,
    ):
        super().__init__(*args, data_collator=batching.collator, **kwargs)
        self.batching = batching
        self.balance_ranks = balance_ranks
        self.eval_answers = eval_answers
        self.balanced_sampler: BatchRebalanceSampler | None = None

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        """The held-out loss, and at each evaluation (not for ``predict``) the sample answers' stop rate beside it."""
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.eval_answers is not None and metric_key_prefix == "eval":
            with plain_attention(self.model):  # generation with a cache: the model's own attention
                rate, answers, seconds = self.eval_answers.evaluate(self.model, self.state.global_step)
            output.metrics[f"{metric_key_prefix}_stop_rate"] = rate
            output.metrics[f"{metric_key_prefix}_answers_seconds"] = round(seconds, 2)
            if is_main_process():
                log_answers(answers, self.state.global_step, self._tensorboard_writer())
        return output

    def _tensorboard_writer(self):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                return callback.tb_writer
        return None

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.balance_ranks:
            packed = isinstance(self.batching.collator, DataCollatorForPackedCompletionOnlyLM)
            hidden_size = unwrap(self.model).config.get_text_config().hidden_size if packed else None
            self.balanced_sampler = balanced_sampler(dataset, self.args, hidden_size=hidden_size)
            return self.balanced_sampler
        if self.batching.group_by_length:
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=length_column(dataset)
            )
        return super()._get_train_sampler(train_dataset)

    def train(self, *args, **kwargs):
        self._last_log = None
        return super().train(*args, **kwargs)

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # A run that has made all of its steps makes no more: a resume from the last step's checkpoint (a run stopped
        # while it published) would otherwise train one step more when --max-steps ends the run inside an epoch (the
        # Trainer runs the epoch's next step before it looks at max_steps).
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        # The balanced sampler shuffles by epoch. The Trainer sets the epoch through accelerate's wrappers, which do
        # not reach it after a resume has wrapped it once more to skip batches: set it here, for every epoch. On the
        # resumed epoch it passes over the steps already trained without assigning their records.
        if self.balanced_sampler is not None:
            self.balanced_sampler.set_epoch(epoch)
            skipped = kwargs.get("steps_trained_in_current_epoch", 0)
            resumed = kwargs.get("resume_from_checkpoint") is not None and epoch == kwargs.get("epochs_trained")
            if resumed and skipped > 0 and not self.args.ignore_data_skip:
                self.balanced_sampler.skip_next(skipped)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def _track_num_input_tokens(self, inputs) -> None:
        """Tokens seen, without the host waiting on the device every micro-step. The Trainer counts a batch's
        non-padding tokens on the device, then gathers the count over the ranks and reads it back (``.item()``) at
        every micro-step. A packed row has no padding: its token count is its shape, known on the host, so it is
        added up here and gathered only when the count is read (:meth:`_gather_tokens_seen`: at logging and
        checkpoint steps). Padded batches are counted as the Trainer counts them."""
        packed = isinstance(self.batching.collator, DataCollatorForPackedCompletionOnlyLM)
        if self.args.include_num_input_tokens_seen == "no" or not packed or "attention_mask" in inputs:
            return super()._track_num_input_tokens(inputs)
        self._tokens_not_gathered += inputs["input_ids"].numel()

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm, left where it is. Under DeepSpeed the Trainer reads the engine's norm (a device tensor)
        back as a float at every optimizer step, though only a logging step uses it; the Trainer's log reads a tensor
        itself, so the host waits for it there, once per log."""
        if grad_norm is None:
            return super()._get_grad_norm(model, grad_norm)
        return grad_norm

    def _gather_tokens_seen(self) -> None:
        """Add every rank's packed tokens since the last gather to ``num_input_tokens_seen`` (collective: the Trainer
        logs and saves on every rank). This read waits for the device, once per log or checkpoint."""
        if not isinstance(self.batching.collator, DataCollatorForPackedCompletionOnlyLM):
            return
        local = torch.tensor(self._tokens_not_gathered, device=self.args.device, dtype=torch.int64)
        self._tokens_not_gathered = 0
        self.state.num_input_tokens_seen += int(self.accelerator.gather(local).sum().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.args.include_num_input_tokens_seen != "no":
            self._gather_tokens_seen()
        if "loss" in logs and self.args.include_num_input_tokens_seen != "no":
            now, seen = time.time(), self.state.num_input_tokens_seen  # the clock of start_time
            since = self._last_log or (start_time or now, getattr(self, "_initial_num_input_tokens_seen", 0))
            if now > since[0]:
                logs["tokens_per_second"] = round((seen - since[1]) / (now - since[0]), 1)
            self._last_log = (now, seen)
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The checkpoint's weights, all of them. The Trainer reads a checkpoint's ``model.safetensors`` with a plain
        ``load_state_dict``, but ``save_pretrained`` writes some weights under their checkpoint names (GPT-NeoX's
        ``lm_head`` as ``embed_out``, transformers 5.24), which that load skips with a warning: a resumed Pythia
        would go on with its untrained output layer. When the names differ, the weights are read again through
        ``from_pretrained``, which maps them, and loaded strictly."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        weights = Path(resume_from_checkpoint) / "model.safetensors"
        if self.is_deepspeed_enabled or not weights.is_file() or hasattr(model, "peft_config"):
            return
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as stored:
            stored_names = set(stored.keys())
        if stored_names <= set(model.state_dict()):
            return
        logger.info("Reloading %s through from_pretrained: its weight names differ from the model's", weights.parent)
        reloaded = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)

    def _save_checkpoint(self, model, trial) -> None:
        if self.args.include_num_input_tokens_seen != "no":
            self._gather_tokens_seen()  # the saved trainer state holds the count
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            checkpoint = f"checkpoint-{self.state.global_step}"
            raise save_failed(err, checkpoint, Path(self.args.output_dir)) from err


class ColumnBatchRebalanceSampler(BatchRebalanceSampler):
    """transformers' ``BatchRebalanceSampler`` at scale: the lengths (the dataset's ``length`` column, read once) and
    each epoch's order are NumPy arrays, never a Python list of every record (``BatchRebalanceSampler.__init__``
    copies the lengths into one, and its ``__iter__`` turns the permutation into another, on every rank); a step's
    lengths are read in one gather. The order is transformers' (the same seeded ``randperm``), so a step holds the
    same records. A resume's skipped steps (:meth:`skip_next`) are passed over without assigning their records."""

    def __init__(
        self,
        *,
        lengths: np.ndarray,
        effective_batch_size: int,
        dp_size: int,
        grad_accum: int,
        shuffle: bool = True,
        seed: int = 42,
        rank: int = 0,
        drop_last: bool = True,
    ):
        # Not BatchRebalanceSampler.__init__: the same fields, without its list of every length.
        assert dp_size >= 1 and grad_accum >= 1 and effective_batch_size >= dp_size * grad_accum
        self.lengths = np.asarray(lengths)
        self.effective_batch_size = effective_batch_size
        self.dp_size = dp_size
        self.grad_accum = grad_accum
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.num_full_batches = len(self.lengths) // effective_batch_size
        self.remainder = len(self.lengths) % effective_batch_size
        self.has_tail = (not drop_last) and self.remainder > 0
        self.num_global_batches = self.num_full_batches + (1 if self.has_tail else 0)
        self._skip = 0

    def skip_next(self, micro_batches: int) -> None:
        """The next pass starts after ``micro_batches`` (whole optimizer steps) already trained: it yields an empty
        placeholder for each, which accelerate's skipping sampler drops unseen, without assigning their records."""
        self._skip = micro_batches

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        count = len(self.lengths)
        order = torch.randperm(count, generator=generator).numpy() if self.shuffle else np.arange(count)
        skip, self._skip = self._skip, 0
        parts = self.dp_size * self.grad_accum
        for step in range(self.num_global_batches):
            if skip >= self.grad_accum:
                skip -= self.grad_accum
                for _ in range(self.grad_accum):
                    yield []
                continue
            indices = order[step * self.effective_batch_size : (step + 1) * self.effective_batch_size]
            if len(indices) < parts:  # the epoch's tail, too small to give every micro-batch a record
                indices = np.concatenate([indices, np.resize(order, parts - len(indices))])
            yield from self._yield_global_batch(indices)

    def _yield_global_batch(self, batch_indices):
        batch_indices = np.asarray(batch_indices)
        rank_mbs = self._assign(batch_indices.tolist(), self.lengths[batch_indices].tolist())
        yield from rank_mbs[self.rank]


class PackedBatchRebalanceSampler(ColumnBatchRebalanceSampler):
    """transformers' balancing for packed rows, which have no padding: a micro-batch costs its records' tokens plus
    each record's own attention (``attention_weight`` x length², about 1 / (6 x hidden size) of a token's linear
    layers), and records need not be of similar length to share one, so they are dealt out greedily (the longest
    first, each to the cheapest micro-batch so far, found with a heap: a step costs O(records x log micro-batches)
    whatever the number of ranks). The step's records and the slots' order are transformers'."""

    def __init__(self, *args, attention_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention_weight = attention_weight

    def _assign(self, indices, lengths):
        parts = self.dp_size * self.grad_accum
        groups: list[list[int]] = [[] for _ in range(parts)]
        cheapest = [(0.0, group) for group in range(parts)]  # (cost, group): a heap, already in order
        for index, length in sorted(zip(indices, lengths), key=lambda pair: -pair[1]):
            cost, group = cheapest[0]
            groups[group].append(index)
            heapq.heapreplace(cheapest, (cost + length + self.attention_weight * length * length, group))
        costs = [0.0] * parts
        for cost, group in cheapest:
            costs[group] = cost
        ranked = sorted(range(parts), key=lambda group: -costs[group])  # as transformers deals its groups out
        mine = [groups[ranked[slot * self.dp_size + self.rank]] for slot in range(self.grad_accum)]
        return {self.rank: mine}  # this rank's slots: _yield_global_batch reads only them


def balanced_sampler(dataset, args: TrainingArguments, *, hidden_size: int | None = None) -> BatchRebalanceSampler:
    """Each optimizer step's records (the same records as the Trainer's shuffled order gives a step) split over the
    ranks and accumulation steps so that every micro-batch costs about the same: transformers'
    ``BatchRebalanceSampler`` (records sorted by length, cut into groups of near-equal cost), with the cost of a
    packed row where the run packs (``hidden_size``: the model's) and of a padded batch where it pads.

    Seeded as the Trainer's own shuffle is (``data_seed``, else ``seed``, plus the epoch), so a step holds the same
    records balanced or not and on any number of ranks; the Trainer's own ``batch_rebalance`` strategy seeds it with a
    constant 42 instead.
    """
    world = max(1, args.world_size)
    accumulation = args.gradient_accumulation_steps
    common = dict(
        lengths=length_column(dataset),
        effective_batch_size=args.train_batch_size * accumulation * world,
        dp_size=world,
        grad_accum=accumulation,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        rank=args.process_index if world > 1 else 0,
        drop_last=args.dataloader_drop_last,
    )
    if hidden_size is None:
        return ColumnBatchRebalanceSampler(**common)
    return PackedBatchRebalanceSampler(**common, attention_weight=1 / (6 * hidden_size))


def run_training(prepared: PreparedRun, recorder: RunRecorder, stops: StopRequests) -> DollyTrainer:
    """The second step of a run: train (from ``prepared.resume`` when resuming) and return the Trainer. A stop
    request ends training after the optimizer step it comes in, with a checkpoint there (``stops.requested``).

    Packed rows change the step (rows, attention, output layer): everything that differs is in training/rank/packing.py.
    """
    settings = prepared.settings
    eval_answers = None
    if settings.eval_answers and prepared.eval_dataset is not None:
        chosen = [prepared.eval_dataset[i] for i in range(min(settings.eval_answers, prepared.eval_dataset.num_rows))]
        eval_answers = EvalAnswers(
            sample_prompts(chosen, prepared.tokenizer), prepared.tokenizer, settings.eval_answer_tokens
        )
    with packed_batches(
        prepared.model,
        prepared.tokenizer,
        packing=settings.packing,
        check_with=check_records(prepared.train_dataset),
        precision=prepared.precision,
        device=prepared.args.device,
    ) as batching:
        if batching.attention is not None:
            recorder.record = recorder.record.with_resolved(attention=batching.attention.kernel)
        trainer = DollyTrainer(
            model=prepared.model,
            processing_class=prepared.tokenizer,
            args=prepared.args,
            train_dataset=prepared.train_dataset,
            eval_dataset=prepared.eval_dataset,
            batching=batching,
            balance_ranks=settings.balance_ranks,
            eval_answers=eval_answers,
            callbacks=[
                recorder,
                CheckpointCompletion(settings.save_total_limit, recorder.write),
                StopAtStepEnd(stops),
                *([HostWaitCounter()] if settings.count_host_waits else []),
            ],
        )
        logger.info("Training")
        trainer.train(resume_from_checkpoint=str(prepared.resume.checkpoint) if prepared.resume else None)
    if eval_answers is not None and is_main_process():
        eval_answers.warn_if_never_stopped()
    return trainer
