from training import consts
from training.prompts import format_generation_prompt, format_training_text


def test_templates_are_dollys():
    assert consts.INTRO_BLURB == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    assert consts.RESPONSE_KEY_NL == "### Response:\n"
    assert (
        f"{consts.INTRO_BLURB}\n\n### Instruction:\n{{instruction}}\n\n### Response:\n{{response}}\n\n### End"
    ) == consts.PROMPT_NO_INPUT_FORMAT
    assert (
        f"{consts.INTRO_BLURB}\n\n### Instruction:\n{{instruction}}\n\nInput:\n{{input}}\n\n"
        "### Response:\n{response}\n\n### End"
    ) == consts.PROMPT_WITH_INPUT_FORMAT
    assert (
        f"{consts.INTRO_BLURB}\n\n### Instruction:\n{{instruction}}\n\n### Response:\n"
    ) == consts.PROMPT_FOR_GENERATION_FORMAT


def test_defaults_are_dollys():
    assert consts.DEFAULT_INPUT_MODEL == "EleutherAI/pythia-6.9b"
    assert consts.DEFAULT_TRAINING_DATASET == "databricks/databricks-dolly-15k"
    assert consts.DEFAULT_SEED == 42
    assert {
        "EleutherAI/pythia-2.8b",
        "EleutherAI/pythia-12b",
        "EleutherAI/gpt-j-6B",
        "databricks/dolly-v2-3b",
        "databricks/dolly-v2-7b",
        "databricks/dolly-v2-12b",
    } <= set(consts.SUGGESTED_INPUT_MODELS)


def test_training_text_is_generation_prompt_plus_response():
    for context in ("", "Some context."):
        text = format_training_text("Do it.", "Done.", context)
        assert text == format_generation_prompt("Do it.", context) + "Done.\n\n### End"
        assert ("Input:\nSome context." in text) == bool(context)
