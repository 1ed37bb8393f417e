"""Dolly's constants and prompt templates, kept exactly as in the original repository.

Copied beside every saved model with the pipeline: it imports nothing.
"""

__all__ = [
    "DEFAULT_INPUT_MODEL",
    "SUGGESTED_INPUT_MODELS",
    "DEFAULT_TRAINING_DATASET",
    "DEFAULT_SEED",
    "DEFAULT_MAX_LENGTH",
    "INTRO_BLURB",
    "INSTRUCTION_KEY",
    "INPUT_KEY",
    "RESPONSE_KEY",
    "END_KEY",
    "RESPONSE_KEY_NL",
    "PROMPT_NO_INPUT_FORMAT",
    "PROMPT_WITH_INPUT_FORMAT",
    "PROMPT_FOR_GENERATION_FORMAT",
    "PROMPT_WITH_INPUT_FOR_GENERATION_FORMAT",
    "DOLLY_SPECIAL_TOKENS",
]

DEFAULT_INPUT_MODEL = "EleutherAI/pythia-6.9b"
SUGGESTED_INPUT_MODELS = [
    "EleutherAI/pythia-2.8b",
    "EleutherAI/pythia-6.9b",
    "EleutherAI/pythia-12b",
    "EleutherAI/gpt-j-6B",
    "databricks/dolly-v2-3b",
    "databricks/dolly-v2-7b",
    "databricks/dolly-v2-12b",
]
DEFAULT_TRAINING_DATASET = "databricks/databricks-dolly-15k"
DEFAULT_SEED = 42
# Used when neither the model config nor the tokenizer declares a usable maximum length.
DEFAULT_MAX_LENGTH = 1024

INTRO_BLURB = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"
RESPONSE_KEY = "### Response:"
END_KEY = "### End"
RESPONSE_KEY_NL = f"{RESPONSE_KEY}\n"

# This is a training prompt that does not contain an input string.  The instruction by itself has enough information
# to respond.  For example, the instruction might ask for the year a historic figure was born.
PROMPT_NO_INPUT_FORMAT = """{intro}

{instruction_key}
{instruction}

{response_key}
{response}

{end_key}""".format(
    intro=INTRO_BLURB,
    instruction_key=INSTRUCTION_KEY,
    instruction="{instruction}",
    response_key=RESPONSE_KEY,
    response="{response}",
    end_key=END_KEY,
)

# This is a training prompt that contains an input string that serves as context for the instruction.  For example,
# the input might be a passage from Wikipedia and the intruction is to extract some information from it.
PROMPT_WITH_INPUT_FORMAT = """{intro}

{instruction_key}
{instruction}

{input_key}
{input}

{response_key}
{response}

{end_key}""".format(
    intro=INTRO_BLURB,
    instruction_key=INSTRUCTION_KEY,
    instruction="{instruction}",
    input_key=INPUT_KEY,
    input="{input}",
    response_key=RESPONSE_KEY,
    response="{response}",
    end_key=END_KEY,
)

# This is the prompt that is used for generating responses using an already trained model.  It ends with the response
# key, where the job of the model is to provide the completion that follows it (i.e. the response itself).
PROMPT_FOR_GENERATION_FORMAT = """{intro}

{instruction_key}
{instruction}

{response_key}
""".format(
    intro=INTRO_BLURB,
    instruction_key=INSTRUCTION_KEY,
    instruction="{instruction}",
    response_key=RESPONSE_KEY,
)

# Generation prompt for an instruction with a context, matching the training prompt above.
PROMPT_WITH_INPUT_FOR_GENERATION_FORMAT = """{intro}

{instruction_key}
{instruction}

{input_key}
{input}

{response_key}
""".format(
    intro=INTRO_BLURB,
    instruction_key=INSTRUCTION_KEY,
    instruction="{instruction}",
    input_key=INPUT_KEY,
    input="{input}",
    response_key=RESPONSE_KEY,
)

# The special tokens added to the tokenizer for training.
DOLLY_SPECIAL_TOKENS = [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]
