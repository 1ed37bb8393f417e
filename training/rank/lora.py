"""LoRA and QLoRA through peft: wrapping the model for training, and saving merged or adapter-only outputs.

Dolly's special tokens are new, so their rows must be learned even though the rest of the embeddings stay frozen:
they are trained as peft "trainable tokens" on the input embeddings and, when not tied, the output layer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..saved_model.consts import DOLLY_SPECIAL_TOKENS

logger = logging.getLogger(__name__)

# Attention and MLP projections per architecture (model_type); anything else gets every linear layer.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
ADAPTER_CONFIG = "adapter_config.json"
MERGED_ADAPTER_SUBDIR = "adapter"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 0  # 0: full fine-tuning
    alpha: int = 32
    # No dropout by default: it keeps a copy of every adapted layer's input for the backward pass, which on the
    # memory benchmark raised LoRA's peak above full fine-tuning's (README, "LoRA and QLoRA").
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: the architecture's default

    @property
    def enabled(self) -> bool:
        return self.r > 0


def default_target_modules(model: PreTrainedModel) -> list[str] | str:
    return DEFAULT_TARGET_MODULES.get(model.config.model_type, "all-linear")


def _module_name(model: PreTrainedModel, module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def new_token_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """The embedding (and untied output) modules and the row indices of Dolly's added tokens."""
    indices = sorted(tokenizer.convert_tokens_to_ids(DOLLY_SPECIAL_TOKENS))
    rows = {_module_name(model, model.get_input_embeddings()).rsplit(".", 1)[-1]: indices}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        rows[_module_name(model, output).rsplit(".", 1)[-1]] = indices
    return rows


def apply_lora(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: LoraSettings, *, quantized: bool = False
):
    """Wrap ``model`` with LoRA adapters; the new tokens' embedding and output rows train too."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) or default_target_modules(model),
        trainable_token_indices=new_token_rows(model, tokenizer),
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: training %d of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    return model


def is_adapter_dir(path: str | Path) -> bool:
    """An adapter-only output: an adapter config and no full model config."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).exists() and not (folder / "config.json").exists()


def adapter_base_model(path: str | Path) -> str:
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_adapter_model(
    adapter_dir: str | Path, tokenizer: PreTrainedTokenizerBase, **from_pretrained_kwargs
) -> PreTrainedModel:
    """The base model named by an adapter, sized for the saved tokenizer, with the adapter applied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .modeling import resize_embeddings_for

    base_name = adapter_base_model(adapter_dir)
    logger.info("Loading base model %s for adapter %s", base_name, adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_name, **from_pretrained_kwargs)
    resize_embeddings_for(base, tokenizer)
    if (Path(adapter_dir) / "generation_config.json").is_file():  # the adapter's: it stops at ### End
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(str(adapter_dir))
    return PeftModel.from_pretrained(base, str(adapter_dir))


def merge_adapter(
    adapter_dir: str | Path, tokenizer: PreTrainedTokenizerBase, *, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A saved adapter merged into its base model: a plain model, ready to save."""
    return load_adapter_model(adapter_dir, tokenizer, trust_remote_code=trust_remote_code).merge_and_unload()
