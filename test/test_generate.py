"""Generation: the pipeline's stopping and decoding, batching, loading options, and a real pretrained model."""

import logging
import math

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
from training.rank.modeling import get_model_tokenizer
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
    from training.rank.modeling import choose_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert choose_precision(requested) == expected


def test_bf16_requested_on_a_gpu_without_it_is_refused(monkeypatch):
    from training.rank.modeling import choose_precision

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


def test_fine_tuned_smollm2_answers_through_the_pipeline(embedded_model_dir, sample_path, tmp_path):
    """The real pretrained model: a few steps on the sample data, then the saved model answers."""
    out = train(
        input_model=str(embedded_model_dir),
        local_output_dir=str(tmp_path / "smol"),
        training_dataset=str(sample_path),
        max_steps=2,
        per_device_train_batch_size=4,
        test_size=0,
        lr=1e-4,
        save_steps=100,
        logging_steps=1,
        gradient_checkpointing=True,
        max_length=256,
        mlflow=False,
    )
    model, tokenizer = load_model_tokenizer_for_generate(str(out), dtype=torch.float32, device_map="cpu")
    results = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)(
        ["What is the boiling point of water at sea level?", "Give me three ideas for a rainy day indoors."],
        do_sample=False,
        max_new_tokens=24,
        return_finish_reason=True,
    )
    for result in results:
        text = result[0]["generated_text"]
        assert text.strip() and "### Instruction" not in text
        assert result[0]["finish_reason"] in {"end_key", "eos", "length"}


# ---- sample answers at each evaluation (training.rank.eval_answers) ----


class ScriptedModel:
    """Stands in for a model in EvalAnswers: ``generate`` returns the prompt followed by the scripted new tokens."""

    training = False

    def __init__(self, new_tokens):
        self.new_tokens = new_tokens

    def parameters(self):
        yield torch.zeros(1)

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([self.new_tokens])], dim=1)


def test_the_stop_rate_counts_the_end_key_in_the_answer_only(tiny_model_dir):
    from training.rank.eval_answers import EvalAnswers, SamplePrompt, stop_reason

    _, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    end, eos = tokenizer.convert_tokens_to_ids(END_KEY), tokenizer.eos_token_id
    words = tokenizer.encode(" fine", add_special_tokens=False)
    assert stop_reason(words + [end] + words, end, eos) == (len(words), "end_key")
    assert stop_reason(words + [eos, end], end, eos) == (len(words), "eos")  # EOS first: it did not stop at ### End
    assert stop_reason(words, end, eos) == (len(words), "length")
    # An instruction that itself says "### End" puts the end key in the prompt: it must not count as stopping.
    prompt = tokenizer("Repeat after me: ### End\n\n### Response:\n")["input_ids"]
    assert end in prompt
    samples = [SamplePrompt(prompt, "Repeat after me: ### End", "### End")]
    answers = EvalAnswers(samples, tokenizer, max_new_tokens=4)
    rate, never, _ = answers.evaluate(ScriptedModel(words + words), step=2)
    assert rate == 0 and not never[0].stopped and never[0].answer == "fine fine"
    rate, stopped, _ = answers.evaluate(ScriptedModel(words + [end]), step=4)
    assert rate == 1 and stopped[0].stopped and stopped[0].answer == "fine" and stopped[0].step == 4
    assert never[0].outcome == "ran on" and stopped[0].outcome == "stopped"


def test_an_answer_that_reaches_the_token_cap_is_told_from_one_that_ran_on(tiny_model_dir, caplog):
    """A model that stops (rate 1), one that never does (rate 0, and the warning), and a right answer longer than
    the cap (no verdict, no warning)."""
    from training.rank.eval_answers import EvalAnswers, SamplePrompt

    _, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    end = tokenizer.convert_tokens_to_ids(END_KEY)
    words = tokenizer.encode(" fine fine fine fine", add_special_tokens=False)
    prompt = tokenizer("Say fine.\n\n### Response:\n")["input_ids"]
    short = [SamplePrompt(prompt, "Say fine.", "fine", reference_tokens=3)]  # fits in the 4-token cap
    long = [SamplePrompt(prompt, "Say fine.", "fine " * 20, reference_tokens=21)]  # does not

    stops = EvalAnswers(short, tokenizer, max_new_tokens=4)
    assert stops.evaluate(ScriptedModel(words[:1] + [end]), step=1)[0] == 1.0
    never = EvalAnswers(short, tokenizer, max_new_tokens=4)
    rate, answers, _ = never.evaluate(ScriptedModel(words[:4]), step=1)
    assert rate == 0.0 and answers[0].outcome == "ran on"
    never.warn_if_never_stopped()
    assert "No sample answer stopped at ### End" in caplog.text
    caplog.clear()
    capped = EvalAnswers(long, tokenizer, max_new_tokens=4)
    rate, answers, _ = capped.evaluate(ScriptedModel(words[:4]), step=1)
    assert math.isnan(rate) and answers[0].outcome == "token cap" and not answers[0].stopped
    capped.warn_if_never_stopped()
    assert "No sample answer stopped" not in caplog.text


def test_sample_prompts_come_from_the_masked_prompt_of_held_out_records(tiny_model_dir, sample_path):
    from training.preprocess import preprocess_dataset
    from training.rank.eval_answers import instruction_of, sample_prompts
    from training.saved_model.prompts import format_generation_prompt

    _, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    records = list(preprocess_dataset(tokenizer, 4096, training_dataset=str(sample_path)))[:3]
    for sample in sample_prompts(records, tokenizer):
        text = tokenizer.decode(sample.prompt_ids)
        assert text.endswith("### Response:\n") and sample.reference and END_KEY not in sample.reference
        assert text == format_generation_prompt(sample.instruction, instruction_context(text))
    assert instruction_of(format_generation_prompt("Do it.", "Some context.")) == "Do it."


def instruction_context(prompt: str) -> str | None:
    return prompt.split("Input:\n", 1)[1].split("\n\n### Response:", 1)[0] if "Input:\n" in prompt else None


def test_a_run_whose_answers_never_stopped_ends_with_a_warning(tiny_model_dir, caplog):
    from training.rank.eval_answers import EvalAnswers

    _, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    answers = EvalAnswers([], tokenizer, max_new_tokens=4)
    answers.rates = [0.0, 0.25]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        answers.warn_if_never_stopped()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    answers.rates = [0.0, 0.0]
    answers.ran_on = 3  # answers that could have stopped within the cap and did not
    with caplog.at_level(logging.WARNING):
        answers.warn_if_never_stopped()
    assert "No sample answer stopped at ### End in 2 evaluations" in caplog.text and "--lr" in caplog.text


# ---- answers that loop (issue 30): the answer repetition penalty ----


def scripted_next_tokens(model, table: dict[int, dict[int, float]]) -> None:
    """Make ``model`` a bigram model: its next-token scores depend only on the last token (``table[last]``, every
    other token far below). Generation still runs through the model's own ``generate`` and the pipeline."""
    vocab = model.get_output_embeddings().out_features

    def replace_logits(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1].tolist()
        scores = torch.full((len(last), vocab), -20.0)
        for row, token in enumerate(last):
            for follower, score in table.get(token, {}).items():
                scores[row, follower] = score
        output.logits = output.logits.clone()
        output.logits[:, -1, :] = scores
        return output

    model.register_forward_hook(replace_logits, with_kwargs=True)


def test_an_answer_that_loops_ends_at_the_end_key_with_the_default_penalty(tiny_model_dir):
    """The cause found in issue 30: greedy answers of a small tuned model loop until the cap, though ``### End`` is
    the runner-up after each line break. Here a scripted model loops "word, line break, word, ...": the pipeline's
    default penalty (over the answer's tokens, never the line break or the end key) ends it; without a penalty it runs
    to the cap; and Transformers' repetition_penalty, which counts the prompt's line breaks too, turns it away from
    the line break into another loop."""
    from training.saved_model.instruct_pipeline import ANSWER_REPETITION_PENALTY

    model, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    end = get_special_token_id(tokenizer, END_KEY)
    response_key = tokenizer.convert_tokens_to_ids("### Response:\n")
    (newline,) = tokenizer.encode("\n", add_special_tokens=False)
    word, other = (
        tokenizer.encode(" yes", add_special_tokens=False)[0],
        tokenizer.encode(" no", add_special_tokens=False)[0],
    )
    assert ANSWER_REPETITION_PENALTY > 1.0 and 2.0 / ANSWER_REPETITION_PENALTY < 1.9
    scripted_next_tokens(
        model,
        {
            response_key: {word: 5.0},
            word: {newline: 2.0, other: 1.9},  # the line break, narrowly
            newline: {word: 2.0, end: 1.9},  # the loop, narrowly before the end
            other: {other: 5.0},
        },
    )
    generator = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)
    prompt = "Say yes."
    assert newline in tokenizer(generator.preprocess(prompt)["prompt_text"])["input_ids"]  # the prompt has line breaks
    ask = {"max_new_tokens": 12, "do_sample": False, "return_finish_reason": True}

    said, other_said = tokenizer.decode([word]).strip(), tokenizer.decode([other]).strip()

    assert generator(prompt, **ask) == [{"generated_text": said, "finish_reason": "end_key"}]
    looped = generator(prompt, answer_repetition_penalty=1.0, **ask)[0]
    assert looped["finish_reason"] == "length" and looped["generated_text"].split() == [said] * 6
    counted_with_prompt = generator(prompt, answer_repetition_penalty=1.0, repetition_penalty=1.1, **ask)[0]
    assert counted_with_prompt["finish_reason"] == "length"
    assert counted_with_prompt["generated_text"].split() == [said] + [other_said] * 11


def test_the_answer_penalty_counts_the_answer_only_and_never_the_tokens_that_end_it(tiny_model_dir):
    from training.saved_model.instruct_pipeline import AnswerRepetitionPenalty

    _, tokenizer = get_model_tokenizer(str(tiny_model_dir))
    penalty = AnswerRepetitionPenalty.for_tokenizer(tokenizer, prompt_width=3, penalty=2.0)
    end = get_special_token_id(tokenizer, END_KEY)
    (newline,) = tokenizer.encode("\n", add_special_tokens=False)
    exempt = {end, tokenizer.eos_token_id, tokenizer.pad_token_id, newline}
    assert exempt <= set(penalty.exempt_ids.tolist())
    vocab = len(tokenizer)
    scores = torch.linspace(-3.0, 3.0, vocab).repeat(2, 1)
    scores[:, [10, 11, 12, newline, end]] = torch.tensor([4.0, -4.0, 6.0, 2.0, 1.0])
    # Row 0: token 12 only in the prompt; the answer holds 10, 11, the line break and the end key.
    # Row 1: nothing generated yet beyond the prompt's width is counted.
    input_ids = torch.tensor([[12, 12, 12, 10, 11, newline, end], [10, 11, 12, 12, 12, 12, 12]])
    out = penalty(input_ids, scores.clone())
    assert out[0, 10] == 2.0 and out[0, 11] == -8.0  # positive scores divided, negative multiplied
    assert out[0, 12] == 6.0 and out[0, newline] == 2.0 and out[0, end] == 1.0
    assert out[1, 12] == 3.0 and out[1, 10] == 4.0  # row 1's answer is only 12s
    untouched = torch.ones(vocab, dtype=torch.bool)
    untouched[[10, 11, 12]] = False
    assert torch.equal(out[:, untouched], scores[:, untouched])
    assert torch.equal(penalty(input_ids[:, :3], scores.clone()), scores)  # no answer yet: unchanged
