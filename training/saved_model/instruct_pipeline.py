"""The instruction-following text-generation pipeline.

This module is copied next to every trained model (with ``consts.py`` and ``prompts.py``), so that
``transformers.pipeline(model=OUT, trust_remote_code=True)`` returns this pipeline, as with the published dolly-v2
models. It must therefore import nothing from this project but those two modules, and only by relative import.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, Pipeline, PreTrainedTokenizerBase

from .consts import END_KEY, RESPONSE_KEY_NL
from .prompts import format_generation_prompt

logger = logging.getLogger(__name__)

# Dolly's sampling settings, used when the pipeline samples (its default).
SAMPLING_DEFAULTS = {"top_p": 0.92, "top_k": 0}
# Used when the tokenizer lacks Dolly's special tokens: the response ends at the first "### End" in the text.
END_KEY_PATTERN = re.compile(r"#+\s*End")
# How much less likely a token becomes once the answer holds it (AnswerRepetitionPenalty); 1.0 turns it off.
# Chosen on bench/quality.py's held-out answers: see the README, "Answers that end".
ANSWER_REPETITION_PENALTY = 1.1


def get_special_token_id(tokenizer: PreTrainedTokenizerBase, key: str) -> int:
    """Token id of a special token that must encode to exactly one id, as Dolly's keys do after training."""
    token_ids = tokenizer.encode(key, add_special_tokens=False)
    if len(token_ids) > 1:
        raise ValueError(f"Expected only a single token for '{key}' but found {token_ids}")
    return token_ids[0]


def has_dolly_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer was prepared for Dolly training (its keys are added single tokens)."""
    added = tokenizer.get_added_vocab()
    return END_KEY in added and RESPONSE_KEY_NL in added


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens generation stops at: the end key (once the tokenizer has it as a token) and EOS."""
    stop_ids = []
    if has_dolly_special_tokens(tokenizer):
        stop_ids.append(get_special_token_id(tokenizer, END_KEY))
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    return stop_ids


class AnswerRepetitionPenalty(LogitsProcessor):
    """Transformers' repetition penalty, counted over the answer's own tokens, never on the tokens that end it.

    A small tuned model decoding greedily can fall into a loop (a sentence, a list item, over and over) and never
    reach ``### End``. Transformers' ``repetition_penalty`` breaks such loops but counts the prompt too, and Dolly's
    prompt holds the line breaks that precede ``### End``: it pushes the model away from ending. This penalty divides
    (or, when negative, multiplies) by ``penalty`` the scores of the tokens already in the answer, that is after the
    first ``prompt_width`` positions, except ``exempt_ids`` (the end key, EOS, padding, line breaks).
    """

    def __init__(self, penalty: float, prompt_width: int, exempt_ids: list[int]):
        if penalty <= 0:
            raise ValueError(f"answer_repetition_penalty must be positive, got {penalty}")
        self.penalty = penalty
        self.prompt_width = prompt_width
        self.exempt_ids = torch.tensor(sorted(set(exempt_ids)), dtype=torch.long)

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, prompt_width: int, penalty: float = ANSWER_REPETITION_PENALTY
    ) -> AnswerRepetitionPenalty:
        """The penalty for answers after ``prompt_width`` prompt tokens, exempting the tokens that end an answer in
        ``tokenizer`` (the end key, as one token or as text, EOS, padding) and the line breaks before the end key."""
        exempt = set(stop_token_ids(tokenizer))
        if tokenizer.pad_token_id is not None:
            exempt.add(tokenizer.pad_token_id)
        for text in ("\n\n", "\n", END_KEY):
            exempt.update(tokenizer.encode(text, add_special_tokens=False))
        return cls(penalty, prompt_width, sorted(exempt))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[:, self.prompt_width :]
        if answer.shape[1] == 0:
            return scores
        seen = scores.gather(1, answer)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        penalized = scores.scatter(1, answer, seen)
        exempt = self.exempt_ids.to(scores.device)
        penalized[:, exempt] = scores[:, exempt]
        return penalized


class InstructionTextGenerationPipeline(Pipeline):
    """Answers instructions with the Dolly prompt template and stops at ``### End``.

    Inputs are instruction strings, dicts with ``instruction`` and optional ``context``, or chats (``{"messages":
    [{"role": "user", "content": ...}, ...]}``, prompted by the tokenizer's chat template, which a trained model's
    tokenizer holds in Dolly's format), alone or in a list (pass ``batch_size`` to generate several at once). Each
    input returns ``[{"generated_text": ...}]``; ``return_finish_reason`` adds why it ended (``end_key``, ``eos``,
    ``stop_string`` or ``length``), ``return_usage`` its ``prompt_tokens`` and ``completion_tokens``, and ``stop``
    (strings) ends an answer where one of them begins. ``answer_repetition_penalty`` (here or per call) sets
    :class:`AnswerRepetitionPenalty`, on by default (a fix over Dolly, whose small models could loop until the cap).
    """

    _pipeline_calls_generate = True

    def __init__(
        self,
        *args,
        do_sample: bool = True,
        max_new_tokens: int = 256,
        top_p: float = SAMPLING_DEFAULTS["top_p"],
        top_k: int = SAMPLING_DEFAULTS["top_k"],
        answer_repetition_penalty: float = ANSWER_REPETITION_PENALTY,
        **kwargs,
    ):
        self.answer_repetition_penalty = answer_repetition_penalty
        sampling = {"top_p": top_p, "top_k": top_k} if do_sample else {}  # greedy: Dolly's sampling flags do not apply
        super().__init__(*args, do_sample=do_sample, max_new_tokens=max_new_tokens, **sampling, **kwargs)
        # Prompts of different lengths are batched by padding on the left, so every prompt ends where generation starts.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _sanitize_parameters(
        self,
        return_full_text: bool | None = None,
        return_finish_reason: bool | None = None,
        return_usage: bool | None = None,
        stop: list[str] | None = None,
        **kw,
    ):
        # answer_repetition_penalty passes through to _forward with the generate settings.
        postprocess_params: dict[str, Any] = {}
        if return_full_text is not None:
            postprocess_params["return_full_text"] = return_full_text
        if return_finish_reason is not None:
            postprocess_params["return_finish_reason"] = return_finish_reason
        if return_usage is not None:
            postprocess_params["return_usage"] = return_usage
        if stop:
            postprocess_params["stop"] = list(stop)
            kw = {**kw, "stop_strings": list(stop), "tokenizer": self.tokenizer}  # generate ends there too
        return {}, kw, postprocess_params

    def preprocess(self, instruction: str | dict[str, Any], **unused) -> dict[str, Any]:
        if isinstance(instruction, dict) and "messages" in instruction:
            prompt_text = self._chat_prompt(instruction["messages"])
            instruction_text = next(
                (m.get("content") or "" for m in reversed(instruction["messages"]) if m.get("role") == "user"), ""
            )
        else:
            if isinstance(instruction, dict):
                instruction_text, context = instruction["instruction"], instruction.get("context")
            else:
                instruction_text, context = instruction, None
            prompt_text = format_generation_prompt(instruction_text, context)
        inputs = self.tokenizer(prompt_text, return_tensors="pt")
        inputs["prompt_text"] = prompt_text
        inputs["instruction_text"] = instruction_text
        return inputs

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt the tokenizer's chat template makes of ``messages``, ready for the answer."""
        if not self.tokenizer.chat_template:
            raise ValueError(
                "this tokenizer has no chat template (a model trained here has Dolly's): pass instructions instead "
                "of messages"
            )
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs) -> dict[str, Any]:
        input_ids = model_inputs["input_ids"]
        attention_mask = model_inputs.get("attention_mask")
        prompt_tokens = (
            attention_mask.sum(dim=1)
            if attention_mask is not None
            else torch.full((input_ids.shape[0],), input_ids.shape[1])
        )
        overrides = {"eos_token_id": stop_token_ids(self.tokenizer), "pad_token_id": self.tokenizer.pad_token_id}
        penalty = generate_kwargs.pop("answer_repetition_penalty", self.answer_repetition_penalty)
        if penalty is not None and penalty != 1.0:
            ours = AnswerRepetitionPenalty.for_tokenizer(self.tokenizer, input_ids.shape[1], penalty)
            theirs = generate_kwargs.get("logits_processor") or []
            generate_kwargs = {**generate_kwargs, "logits_processor": LogitsProcessorList([ours, *theirs])}
        if generate_kwargs.get("do_sample") is False:  # greedy: Dolly's sampling defaults do not apply
            generate_kwargs = {**generate_kwargs, **dict.fromkeys(SAMPLING_DEFAULTS)}
        if hasattr(self, "_prepare_generate_kwargs"):
            generate_kwargs = self._prepare_generate_kwargs(generate_kwargs, **overrides)
        else:  # transformers releases before the generation-kwargs rework
            generate_kwargs = {**generate_kwargs, **overrides}
        sequences = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        in_batch = input_ids.shape[0]
        new_tokens = sequences[:, input_ids.shape[1] :]
        new_tokens = new_tokens.reshape(in_batch, new_tokens.shape[0] // in_batch, *new_tokens.shape[1:])
        return {
            "new_tokens": new_tokens,
            "prompt_tokens": prompt_tokens,
            "instruction_text": model_inputs["instruction_text"],
        }

    def _decode_response(self, tokens: list[int]) -> tuple[str, str]:
        """The response text and why it ended: ``end_key``, ``eos`` or ``length``."""
        if has_dolly_special_tokens(self.tokenizer):
            end_id = get_special_token_id(self.tokenizer, END_KEY)
            stops = {end_id: "end_key", self.tokenizer.eos_token_id: "eos", self.tokenizer.pad_token_id: "eos"}
            for position, token in enumerate(tokens):
                if token in stops:
                    return self.tokenizer.decode(tokens[:position], skip_special_tokens=True).strip(), stops[token]
            return self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), "length"
        # Without the special tokens (e.g. an untuned model), find the end key in the decoded text.
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        match = END_KEY_PATTERN.search(text)
        if match:
            return text[: match.start()].strip(), "end_key"
        finish = "eos" if self.tokenizer.eos_token_id in tokens else "length"
        return text.strip(), finish

    def _completion_token_count(self, tokens: list[int]) -> int:
        """How many tokens the model generated for this answer: up to and including the token that ended it (the
        rest of a batched row is padding)."""
        ends = {self.tokenizer.eos_token_id}
        if has_dolly_special_tokens(self.tokenizer):
            ends.add(get_special_token_id(self.tokenizer, END_KEY))
        for position, token in enumerate(tokens):
            if token in ends:
                return position + 1
            if token == self.tokenizer.pad_token_id:
                return position
        return len(tokens)

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        return_full_text: bool = False,
        return_finish_reason: bool = False,
        return_usage: bool = False,
        stop: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        instruction_text = model_outputs["instruction_text"]
        records = []
        for sequence in model_outputs["new_tokens"][0].tolist():
            decoded, finish_reason = self._decode_response(sequence)
            cut = min((i for i in (decoded.find(s) for s in stop or []) if i >= 0), default=None)
            if cut is not None:
                decoded, finish_reason = decoded[:cut].rstrip(), "stop_string"
            if return_full_text:
                decoded = f"{instruction_text}\n{decoded}"
            record: dict[str, Any] = {"generated_text": decoded}
            if return_finish_reason:
                record["finish_reason"] = finish_reason
            if return_usage:
                record["prompt_tokens"] = int(model_outputs["prompt_tokens"].reshape(-1)[0])
                record["completion_tokens"] = self._completion_token_count(sequence)
            records.append(record)
        return records
