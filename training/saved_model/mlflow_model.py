"""The trained model as an MLflow model: a table of ``instruction`` (and optional ``context``) in, responses out.

What a served model needs of the model's folder is logged as an artifact (:func:`served_files`: the weights, the
config and generation config, the tokenizer, the pipeline code and the model card; never the checkpoints, ``runs/``,
the lock or the run's other files) and answered by this project's pipeline (which stops at ``### End``), so
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` give the answers ``generate_response`` gives.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_ARTIFACT = "model_dir"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "instruction"), ColSpec("string", "context", required=False)]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", 256),
            ParamSpec("do_sample", "boolean", False),
        ]
    ),
)


class InstructionModel(mlflow.pyfunc.PythonModel):
    """Answers each row's instruction (with its context, when given) through ``InstructionTextGenerationPipeline``."""

    def load_context(self, context: Any) -> None:
        from training.generate import load_model_tokenizer_for_generate
        from training.saved_model.instruct_pipeline import InstructionTextGenerationPipeline

        model, tokenizer = load_model_tokenizer_for_generate(context.artifacts[MODEL_ARTIFACT])
        self.pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Every row's answer, the rows generated together (left-padded, one ``generate`` per batch)."""
        params = {"max_new_tokens": 256, "do_sample": False, **(params or {})}
        requests = []
        for row in model_input.to_dict(orient="records"):
            request = {"instruction": row["instruction"]}
            if isinstance(row.get("context"), str) and row["context"]:
                request["context"] = row["context"]
            requests.append(request)
        results = self.pipeline(requests, batch_size=max(1, len(requests)), **params)
        return [result[0]["generated_text"] for result in results]


# A served model's files, by name (top level of the model's folder only): weights, config, tokenizer, generation
# config, the pipeline code beside the model, the model card and its plot, and a LoRA adapter's own files.
SERVED_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "*.py",
    "README.md",
    "training_loss.png",
    "adapter_config.json",
)


def served_files(model_dir: str | Path) -> list[Path]:
    """The files of ``model_dir`` a served model needs (:data:`SERVED_FILE_PATTERNS`), in name order."""
    return sorted(
        path
        for path in Path(model_dir).iterdir()
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in SERVED_FILE_PATTERNS)
    )


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # the same bytes, no second copy on disk
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)


def log_pipeline_model(model_dir: str | Path, *, registered_model_name: str | None = None) -> Any:
    """Log ``model_dir``'s served files (:func:`served_files`) to the active run as an MLflow model named ``model``
    (and register it, when named).

    The model is logged from code (this file), not pickled. No input example is given: MLflow would load the whole
    model to check it, which for a 12B model means minutes and tens of GB on the driver; the signature says the
    same.
    """
    import warnings

    import transformers

    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix=".staging-mlflow-", dir=model_dir) as chosen:
        for path in served_files(model_dir):
            _link_or_copy(path, Path(chosen) / path.name)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = _log(chosen, registered_model_name, transformers.__version__)
    logger.info("Logged the model to MLflow: %s", info.model_uri)
    return info


def _log(model_dir: str | Path, registered_model_name: str | None, transformers_version: str) -> Any:
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=__file__,
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(PROJECT_ROOT / "training")],
        signature=SIGNATURE,
        pip_requirements=[f"transformers=={transformers_version}", f"torch=={_torch_version()}", "accelerate"],
        registered_model_name=registered_model_name,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


# Logged from code: MLflow runs this file to build the model it serves.
mlflow.models.set_model(InstructionModel())
