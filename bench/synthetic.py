"""Pythia-shaped (GPT-NeoX) models with random weights, and a byte-level BPE tokenizer trained offline.

Tests use the tiny shape; throughput benchmarks use the published Pythia dimensions. Nothing here downloads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Published Pythia dimensions (Biderman et al., 2023); "tiny" is ours, for tests.
PYTHIA_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    "70m": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048},
    "160m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "410m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "1.4b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 8192},
    "2.8b": {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 10240},
}
PYTHIA_EOS = "<|endoftext|>"
PYTHIA_VOCAB_MULTIPLE = 128


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A GPT-NeoX-style byte-level BPE tokenizer (EOS and BOS ``<|endoftext|>``, no pad token) trained on ``texts``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PYTHIA_EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=PYTHIA_EOS, bos_token=PYTHIA_EOS, unk_token=PYTHIA_EOS
    )


def pythia_config(shape: str, vocab_size: int, max_position_embeddings: int = 2048) -> GPTNeoXConfig:
    """A GPT-NeoX config with Pythia's settings (parallel residual, rotary on a quarter of each head)."""
    if shape not in PYTHIA_SHAPES:
        raise ValueError(f"unknown Pythia shape '{shape}'; choose one of {', '.join(PYTHIA_SHAPES)}")
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        **PYTHIA_SHAPES[shape],
    )


def record_texts(sample_path: str | Path) -> list[str]:
    """The text of dolly records, to train a tokenizer on."""
    from training.data import read_records

    return [" ".join([r["instruction"], r["context"], r["response"]]) for r in read_records(str(sample_path))]


def build_tiny_sample_model(
    out_dir: str | Path, sample_path: str | Path, vocab_multiple: int = PYTHIA_VOCAB_MULTIPLE
) -> Path:
    """The tests' and benchmarks' tiny GPT-NeoX, its tokenizer trained on ``sample_path``'s records and the template.

    500 tokens in 512 embedding rows: the added Dolly tokens fit without resizing, as with real Pythia. With
    ``vocab_multiple=1`` the rows are exactly the tokenizer's, so adding Dolly's tokens resizes the embeddings (as
    with most models that are not Pythia).
    """
    from training.consts import INTRO_BLURB, PROMPT_WITH_INPUT_FORMAT

    texts = record_texts(sample_path)
    return build_pythia_model(
        out_dir,
        texts + [INTRO_BLURB, PROMPT_WITH_INPUT_FORMAT] * 10,
        shape="tiny",
        vocab_size=500,
        vocab_multiple=vocab_multiple,
    )


def build_pythia_model(
    out_dir: str | Path,
    texts: Iterable[str] = (),
    shape: str = "tiny",
    vocab_size: int = 1024,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    vocab_multiple: int = PYTHIA_VOCAB_MULTIPLE,
) -> Path:
    """Write a random-initialised Pythia-shaped model and its tokenizer to ``out_dir``, ready for ``from_pretrained``.

    The tokenizer is trained on ``texts`` unless one is given (a real one, for models of real size).
    """
    import torch

    out_dir = Path(out_dir)
    tokenizer = tokenizer or train_bpe_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    # Like Pythia (50,277 tokens in 50,304 rows), the embeddings are padded to a multiple of 128.
    padded_vocab = -(-len(tokenizer) // vocab_multiple) * vocab_multiple
    model = GPTNeoXForCausalLM(pythia_config(shape, vocab_size=padded_vocab))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("Built a %s Pythia-shaped model (%d parameters) in %s", shape, model.num_parameters(), out_dir)
    return out_dir


# Model families trained by the full test tier (test/test_families.py), each as a tiny random model.
FAMILIES = (
    "gpt_neox",
    "gptj",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "olmo2",
    "granite",
    "falcon",
    "stablelm",
    "gpt2",
)
TINY_FAMILY_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    "rotary_dim": 8,  # GPT-J
    "n_inner": 128,  # GPT-2, GPT-J
}

FAMILY_DERIVED = {"falcon": ("head_dim",)}  # settings a family's config computes itself


def build_tiny_family_model(family: str, out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """A random-initialised two-layer model of ``family`` (a transformers model type) with the tokenizer in
    ``tokenizer_dir``, written to ``out_dir`` for ``from_pretrained``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tokenizer.eos_token_id
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": eos}
    shape = {key: value for key, value in TINY_FAMILY_SHAPE.items() if key not in FAMILY_DERIVED.get(family, ())}
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **shape, **special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("Built a tiny %s model (%d parameters) in %s", family, model.num_parameters(), out_dir)
    return out_dir
