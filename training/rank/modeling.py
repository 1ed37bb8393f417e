"""Loading the tokenizer and model for training, and choosing the sequence length and precision."""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled

from ..saved_model.consts import DEFAULT_INPUT_MODEL, DEFAULT_MAX_LENGTH, DOLLY_SPECIAL_TOKENS, END_KEY

logger = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]
# Config attributes that hold a model's context length, in the order Dolly looked them up.
MAX_LENGTH_SETTINGS = ("n_positions", "max_position_embeddings", "seq_length")


def load_tokenizer_and_new_tokens(
    pretrained_model_name_or_path: str = DEFAULT_INPUT_MODEL, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """Load a tokenizer prepared for Dolly training, and which of Dolly's special tokens it did not have before."""
    logger.info("Loading tokenizer for %s", pretrained_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocabulary = tokenizer.get_vocab()
    new_tokens = [token for token in DOLLY_SPECIAL_TOKENS if token not in vocabulary]
    tokenizer.add_special_tokens({"extra_special_tokens": DOLLY_SPECIAL_TOKENS}, replace_extra_special_tokens=False)
    return tokenizer, new_tokens


def load_tokenizer(
    pretrained_model_name_or_path: str = DEFAULT_INPUT_MODEL, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer, give it a pad token (EOS when it has none) and add Dolly's special tokens."""
    return load_tokenizer_and_new_tokens(pretrained_model_name_or_path, trust_remote_code)[0]


def load_model(
    pretrained_model_name_or_path: str = DEFAULT_INPUT_MODEL,
    *,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs,
) -> PreTrainedModel:
    """Load a causal LM for training (the KV cache is off: it is useless in training and breaks packing).

    ``gradient_checkpointing`` is kept for Dolly's signature; the Trainer turns activation checkpointing on.
    """
    logger.info("Loading model for %s", pretrained_model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
    )
    model.config.use_cache = False
    return model


def resize_embeddings_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings to fit the tokenizer; never shrink them (Pythia pads its vocabulary to 50304).

    The row count is the embedding's own ``num_embeddings``: under ZeRO-3 the weight's shape is its partition's
    (0 rows), which would make every model look too small and shrink Pythia's padded rows. The new rows are set by
    :func:`initialize_new_token_rows`, so transformers' mean-and-covariance initialisation is not asked for.
    """
    current = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > current:
        logger.info("Resizing token embeddings from %d to %d", current, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def _gathered_for_update(parameters: list[torch.nn.Parameter]):
    """Under ZeRO-3, the full parameters (rank 0's edits are kept); otherwise nothing to do."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0)
    return contextlib.nullcontext()


def initialize_new_token_rows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, new_tokens: list[str]
) -> None:
    """Start each newly added token from what the model already knows, instead of an average embedding.

    ``### End`` takes the EOS token's rows, so the model predicts it where it would end a text; the other keys take
    the mean of the rows of the tokens their text splits into (``###``, `` Response``, ``:``, ...). Both the input
    embeddings and an untied output layer are set. Without this, the new ``### End`` row needs far more steps before
    a small model ever emits it (see the README's quality benchmark).
    """
    if not new_tokens:
        return
    embeddings = model.get_input_embeddings().weight
    output_layer = model.get_output_embeddings()
    matrices = [embeddings]
    if output_layer is not None and output_layer.weight is not embeddings:
        matrices.append(output_layer.weight)
    with _gathered_for_update(matrices), torch.no_grad():
        for token in new_tokens:
            if token == END_KEY and tokenizer.eos_token_id is not None:
                sources = [tokenizer.eos_token_id]
            else:
                sources = tokenizer(token, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            target = tokenizer.convert_tokens_to_ids(token)
            for matrix in matrices:
                matrix[target] = matrix[sources].mean(dim=0)
    logger.info("Initialized the rows of %s from existing tokens", ", ".join(repr(t) for t in new_tokens))


def get_model_tokenizer(
    pretrained_model_name_or_path: str = DEFAULT_INPUT_MODEL,
    *,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the tokenizer and model together, with the embeddings sized for the added special tokens."""
    tokenizer, new_tokens = load_tokenizer_and_new_tokens(pretrained_model_name_or_path, trust_remote_code)
    model = load_model(
        pretrained_model_name_or_path,
        gradient_checkpointing=gradient_checkpointing,
        trust_remote_code=trust_remote_code,
        **from_pretrained_kwargs,
    )
    resize_embeddings_for(model, tokenizer)
    initialize_new_token_rows(model, tokenizer, new_tokens)
    align_pad_token(model, tokenizer)
    return model, tokenizer


def align_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The model's configs take the tokenizer's pad token (EOS when the model had none), as the Trainer would do
    anyway, with a warning on every rank, when training starts."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def training_attention(precision: str) -> str | None:
    """FlashAttention 2 where it can run (a CUDA GPU, the ``flash_attn`` package, bf16 or fp16): its varlen kernel
    then trains packed rows from the collator's ``cu_seq_lens``. None elsewhere: the model's default (SDPA)."""
    import importlib.util

    if precision in ("bf16", "fp16") and torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return None


def model_max_length(model: PreTrainedModel) -> int:
    """The model's own context length, falling back to Dolly's 1024."""
    return config_max_length(model.config)


def config_max_length(config) -> int:
    """The context length a model config gives (its text model's), falling back to Dolly's 1024."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for setting in MAX_LENGTH_SETTINGS:
        value = getattr(text_config, setting, None)
        if value:
            logger.info("Found max length %d in config.%s", value, setting)
            return int(value)
    logger.info("Using default max length %d", DEFAULT_MAX_LENGTH)
    return DEFAULT_MAX_LENGTH


def choose_precision(bf16: bool | None = None) -> Precision:
    """bf16 where the GPU has it, fp16 on older GPUs (V100), fp32 on CPU; ``bf16`` forces the choice."""
    has_cuda = torch.cuda.is_available()
    if bf16 is True:
        if has_cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("--bf16 was requested but this GPU does not support bfloat16 (use --no-bf16 for fp16)")
        return "bf16"
    if not has_cuda:
        return "fp32"
    if bf16 is False or not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"
