"""Answers and stop rate at every evaluation: is the model learning to answer, and to stop?

At each evaluation the run answers a few fixed held-out instructions greedily (with the pipeline's default answer
repetition penalty, as users get them) and logs, beside ``eval_loss``, ``eval_stop_rate`` and the answers themselves:
a table in MLflow (step, instruction, reference, answer, stopped, outcome) and text in TensorBoard. Each answer's
outcome is ``stopped`` (it ended with ``### End``), ``token cap`` (it reached ``--eval-answer-tokens`` where the
reference answer is longer than that: a right answer would too) or ``ran on`` (it did not stop where the reference
had ended, or ended at EOS without ``### End``). The stop rate is the share stopped among the answers that could have
stopped within the cap (NaN when every answer reached it). A model that never learns to stop is a classic silent
failure; a run whose answers ran on and never stopped ends with a warning saying what to check (not one whose answers
only reached the cap).

Every rank takes part (under ZeRO-3 each forward pass gathers the partitioned weights from all ranks): the prompts
are shared out, each rank generates its own (``synced_gpus`` keeps the ranks stepping together until the last one
is done), and the main process gathers the answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from ..preprocess import IGNORE_INDEX
from ..saved_model.consts import END_KEY, INPUT_KEY, INSTRUCTION_KEY, RESPONSE_KEY
from ..saved_model.instruct_pipeline import AnswerRepetitionPenalty, stop_token_ids
from .distributed import global_rank, is_distributed, world_size

logger = logging.getLogger(__name__)

TABLE_ARTIFACT = "eval_answers.json"
TENSORBOARD_TAG = "eval_answers"


@dataclass(frozen=True)
class Answer:
    step: int
    instruction: str
    reference: str
    answer: str
    stopped: bool
    outcome: str = "stopped"  # stopped, token cap, ran on


STOPPED, TOKEN_CAP, RAN_ON = "stopped", "token cap", "ran on"


def stop_reason(new_tokens: list[int], end_id: int, eos_id: int | None) -> tuple[int, str]:
    """Where the answer in ``new_tokens`` (the generated tokens only, never the prompt's) ends, and why:
    ``end_key`` (``### End``), ``eos``, or ``length``."""
    for position, token in enumerate(new_tokens):
        if token == end_id:
            return position, "end_key"
        if eos_id is not None and token == eos_id:
            return position, "eos"
    return len(new_tokens), "length"


def instruction_of(prompt: str) -> str:
    """The instruction in a Dolly generation prompt (what the table shows)."""
    text = prompt.split(f"{INSTRUCTION_KEY}\n", 1)[-1]
    for key in (f"\n\n{INPUT_KEY}\n", f"\n\n{RESPONSE_KEY}\n"):
        text = text.split(key, 1)[0]
    return text.strip()


@dataclass(frozen=True)
class SamplePrompt:
    prompt_ids: list[int]
    instruction: str
    reference: str
    reference_tokens: int = 0  # the reference answer's tokens, ``### End`` included


def sample_prompts(eval_records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> list[SamplePrompt]:
    """Prompts and reference answers from tokenized held-out records (the prompt is what the labels mask)."""
    samples = []
    for record in eval_records:
        ids, labels = list(record["input_ids"]), list(record["labels"])
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompt = tokenizer.decode(ids[:start])
        reference = tokenizer.decode(ids[start:], skip_special_tokens=True).strip()
        samples.append(SamplePrompt(ids[:start], instruction_of(prompt), reference, len(ids) - start))
    return samples


class EvalAnswers:
    """The fixed held-out prompts answered at each evaluation, and the answers so far (main process)."""

    def __init__(self, samples: list[SamplePrompt], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int):
        self.samples = samples
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.end_id = tokenizer.convert_tokens_to_ids(END_KEY)
        self.rates: list[float] = []
        self.ran_on = 0  # answers so far that ran on where they could have stopped

    def _generate(self, model: PreTrainedModel, prompt_ids: list[int], synced: bool) -> list[int]:
        device = next(model.parameters()).device
        ids = torch.tensor([prompt_ids], device=device)
        sequences = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=stop_token_ids(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
            # Decoded as the pipeline decodes by default, so the stop rate is the one users of the model see.
            logits_processor=LogitsProcessorList([AnswerRepetitionPenalty.for_tokenizer(self.tokenizer, ids.shape[1])]),
            synced_gpus=synced,
        )
        return sequences[0, ids.shape[1] :].tolist()

    @torch.no_grad()
    def answer(self, model: PreTrainedModel, step: int) -> list[Answer]:
        """Answer every sample prompt (collective: call on every rank); the main process gets them all."""
        ranks, rank = world_size(), global_rank()
        mine = list(range(rank, len(self.samples), ranks))
        # Under ZeRO-3 every rank must run as many forward passes as the busiest one: a rank without a prompt of its
        # own answers the first one again (and drops it); synced_gpus keeps them together within each answer.
        turns = -(-len(self.samples) // ranks)
        synced = is_distributed() and ranks > 1
        was_training = model.training
        model.eval()
        answered: list[tuple[int, list[int]]] = []
        try:
            for turn in range(turns):
                index = mine[turn] if turn < len(mine) else None
                tokens = self._generate(model, self.samples[index if index is not None else 0].prompt_ids, synced)
                if index is not None:
                    answered.append((index, tokens))
        finally:
            model.train(was_training)
        if synced:
            gathered: list[Any] = [None] * ranks
            torch.distributed.all_gather_object(gathered, answered)
            answered = [item for part in gathered for item in part]
        answers = []
        for index, tokens in sorted(answered):
            end, why = stop_reason(tokens, self.end_id, self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
            sample = self.samples[index]
            outcome = self.outcome(why, sample)
            answers.append(Answer(step, sample.instruction, sample.reference, text, outcome == STOPPED, outcome))
        return answers

    def outcome(self, why: str, sample: SamplePrompt) -> str:
        """``stopped``, ``token cap`` (no room to stop where a right answer would), or ``ran on``."""
        if why == "end_key":
            return STOPPED
        if why == "length" and sample.reference_tokens > self.max_new_tokens:
            return TOKEN_CAP
        return RAN_ON

    def evaluate(self, model: PreTrainedModel, step: int) -> tuple[float, list[Answer], float]:
        """The stop rate, the answers and the seconds they took, at ``step`` (collective)."""
        started = time.perf_counter()
        answers = self.answer(model, step)
        seconds = time.perf_counter() - started
        counts = {outcome: sum(a.outcome == outcome for a in answers) for outcome in (STOPPED, TOKEN_CAP, RAN_ON)}
        could_stop = counts[STOPPED] + counts[RAN_ON]
        rate = counts[STOPPED] / could_stop if could_stop else float("nan")  # all reached the cap: no verdict
        self.rates.append(rate)
        self.ran_on += counts[RAN_ON]
        logger.info(
            "Sample answers at step %d: %d of %d stopped at %s, %d ran on, %d reached the %d-token cap (%.1f s)",
            step,
            counts[STOPPED],
            len(answers),
            END_KEY,
            counts[RAN_ON],
            counts[TOKEN_CAP],
            self.max_new_tokens,
            seconds,
        )
        return rate, answers, seconds

    def warn_if_never_stopped(self) -> None:
        if self.ran_on and not any(rate > 0 for rate in self.rates):
            logger.warning(
                "No sample answer stopped at %s in %d evaluations (eval_stop_rate stayed 0): the model has not learned "
                "to end its answers. Check that the records' responses are whole (records longer than --max-length "
                "are removed, not cut, so this is rarely the cause), that the tokenizer has Dolly's special tokens, "
                "and that training ran long enough at a high enough --lr (a few hundred steps usually teach it).",
                END_KEY,
                len(self.rates),
            )


def log_answers(answers: list[Answer], step: int, tensorboard_writer: Any = None) -> None:
    """The answers as a table in the active MLflow run (appended to at each evaluation) and as text in
    TensorBoard. Main process only."""
    if not answers:
        return
    rows = [asdict(answer) for answer in answers]
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, artifact_file=TABLE_ARTIFACT)
    except Exception:  # tracking must not stop training
        logger.warning("Could not log the sample answers to MLflow", exc_info=True)
    if tensorboard_writer is not None:

        def cell(text: Any) -> str:  # one markdown table cell
            return str(text).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| instruction | reference | answer | outcome |", "|---|---|---|---|"]
        lines += [
            "| " + " | ".join(cell(r[key]) for key in ("instruction", "reference", "answer", "outcome")) + " |"
            for r in rows
        ]
        tensorboard_writer.add_text(TENSORBOARD_TAG, "\n".join(lines), step)
