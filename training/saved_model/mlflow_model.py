"""The trained model as an MLflow model: OpenAI-style chat requests in, chat completions out; and Dolly's table of
``instruction`` (and optional ``context``) in, responses out.

Why a ``PythonModel`` with a chat signature, not MLflow's ``ChatModel`` or ``ResponsesAgent`` (MLflow 3.17):

- ``ChatModel`` answers one conversation per call (its loader reads the first row of a table and drops the rest),
  so requests sent together cannot be generated together; its fixed message schema also has no place for Dolly's
  context, and MLflow deprecated it in 3.0.
- ``ResponsesAgent`` speaks OpenAI's Responses API, made for agents (tool calls, streamed events), and also takes one
  conversation per call. Chat servers (vLLM's and TGI's ``/v1/chat/completions``), LangChain's chat models and
  Databricks' chat endpoints speak chat completions.

So the model takes a chat request per row (``messages``, each ``{"role", "content"}``, a user message optionally with
Dolly's ``context``), with the request's options (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``n``) as
MLflow params. MLflow's scoring server splits an unwrapped OpenAI request (``{"messages": [...], "max_tokens":
64}``) into exactly that, and answers it with one ``chat.completion`` object (``choices[0].message.content``,
``finish_reason``, ``usage``); ``{"dataframe_records": [request, ...], "params": {...}}`` answers several requests,
generated together in batches of at most ``max_batch_size`` (sorted by prompt length, so each batch pads little;
answered in the request order), with a list of them. A table with ``instruction`` (and ``context``) columns instead is
Dolly's request and gets a list of response strings, batched the same way.

What a served model needs of the model's folder is logged as an artifact (:func:`served_files`: the weights, the
config and generation config, the tokenizer with its chat template, the pipeline code and the model card; never the
checkpoints, ``runs/``, the lock or the run's other files). Answers come from this project's pipeline, which stops at
``### End``, so ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and ``generate_response`` give the same answer.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_ARTIFACT = "model_dir"
MODEL_FOLDER = "hf_model"  # the served files' folder in every logged model: artifacts/hf_model/
# Requests generated together at most, unless the model config or a request's params say otherwise. Sized for a 12b
# model on one 80 GB GPU: 24 GB of bf16 weights leave about 50 GB, and a Pythia-12b request of 2,048 prompt and 256
# new tokens holds about 1.7 GB of KV cache (36 layers x 2 x 5,120 x 2 bytes per token), so 16 requests (27 GB)
# leave room for activations and logits. mlflow.pyfunc.spark_udf hands up to 10,000 rows to one call.
DEFAULT_MAX_BATCH_SIZE = 16
CHAT_MESSAGE = Object(
    [
        Property("role", "string"),
        Property("content", "string", required=False),
        Property("context", "string", required=False),  # Dolly's Input: block, on a user message
    ]
)
DEFAULT_MAX_TOKENS = 256  # the pipeline's own default
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(Array(CHAT_MESSAGE), "messages", required=False),
            ColSpec("string", "instruction", required=False),
            ColSpec("string", "context", required=False),
        ]
    ),
    outputs=Schema([ColSpec(AnyType())]),  # a chat.completion per chat request; a string per Dolly row
    params=ParamSchema(
        [
            # A chat request's options, by OpenAI's names. No temperature: the saved generation config decides
            # (greedy), as vLLM does with a model's generation_config.json.
            ParamSpec("max_tokens", "long", None),
            ParamSpec("temperature", "double", None),
            ParamSpec("top_p", "double", None),
            ParamSpec("stop", "string", [], shape=(-1,)),
            ParamSpec("n", "long", 1),
            # Dolly's table, by the pipeline's names.
            ParamSpec("max_new_tokens", "long", DEFAULT_MAX_TOKENS),
            ParamSpec("do_sample", "boolean", False),
            # Both: the pipeline's answer repetition penalty (unset: its default; 1.0: Dolly's decoding), and the most
            # requests generated together (unset: the model config's max_batch_size).
            ParamSpec("answer_repetition_penalty", "double", None),
            ParamSpec("max_batch_size", "long", None),
        ]
    ),
)
FINISH_REASONS = {"end_key": "stop", "eos": "stop", "stop_string": "stop", "length": "length"}


def chat_generation(params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's generation settings for a chat request's options (OpenAI's names and meanings)."""
    settings: dict[str, Any] = {"max_new_tokens": int(params.get("max_tokens") or DEFAULT_MAX_TOKENS)}
    temperature, n = params.get("temperature"), int(params.get("n") or 1)
    if temperature:  # 0 or none: greedy
        settings.update(do_sample=True, temperature=float(temperature), top_p=float(params.get("top_p") or 1.0))
        settings["top_k"] = 0  # OpenAI's sampling has no top-k
    else:
        if n > 1:
            raise ValueError("n above 1 needs a temperature above 0: greedy answers are all the same")
        settings["do_sample"] = False
    if n > 1:
        settings["num_return_sequences"] = n
    if params.get("stop"):
        settings["stop"] = [text for text in params["stop"] if text]
    return {**settings, **penalty_setting(params)}


def penalty_setting(params: dict[str, Any]) -> dict[str, float]:
    """The pipeline's ``answer_repetition_penalty`` where a request sets it (else the pipeline's default applies)."""
    penalty = params.get("answer_repetition_penalty")
    return {} if penalty is None else {"answer_repetition_penalty": float(penalty)}


def chat_completion(answers: list[dict[str, Any]], model_name: str) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object for one request's answers (one per choice)."""
    prompt_tokens = answers[0]["prompt_tokens"]
    completion_tokens = sum(answer["completion_tokens"] for answer in answers)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": answer["generated_text"]},
                "finish_reason": FINISH_REASONS[answer["finish_reason"]],
            }
            for index, answer in enumerate(answers)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def plain_messages(messages: Any) -> list[dict[str, Any]]:
    """A request's messages as plain dicts, without the keys a row left empty."""
    return [{key: value for key, value in dict(message).items() if value is not None} for message in messages]


class DollyModel(mlflow.pyfunc.PythonModel):
    """Chat requests (a ``messages`` column) or Dolly's table (``instruction``, ``context``), each call generated as
    one batch through ``InstructionTextGenerationPipeline``."""

    def load_context(self, context: Any) -> None:
        from training.generate import load_model_tokenizer_for_generate
        from training.saved_model.instruct_pipeline import InstructionTextGenerationPipeline

        model, tokenizer = load_model_tokenizer_for_generate(context.artifacts[MODEL_ARTIFACT])
        self.pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)
        config = context.model_config or {}
        self.model_name = config.get("model_name", "dolly")
        self.max_batch_size = int(config.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE)

    def _generate(self, requests: list[dict[str, Any]], params: dict[str, Any], **settings) -> list[Any]:
        """The pipeline's answers to ``requests``, in their order, generated in batches of at most ``max_batch_size``
        requests of similar prompt length (bounded memory whatever the call's size; little padding)."""
        limit = max(1, int(params.get("max_batch_size") or self.max_batch_size))
        texts = [" ".join(str(v) for m in r.get("messages", [r]) for v in m.values() if v) for r in requests]
        lengths = [len(ids) for ids in self.pipeline.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(requests)), key=lengths.__getitem__)
        answers: list[Any] = [None] * len(requests)
        for start in range(0, len(order), limit):
            chosen = order[start : start + limit]
            batch = self.pipeline([requests[i] for i in chosen], batch_size=len(chosen), **settings)
            for index, answer in zip(chosen, batch):
                answers[index] = answer
        return answers

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> dict[str, Any] | list[Any]:
        """One ``chat.completion`` for one chat request, a list of them for several; a list of responses for
        Dolly's table."""
        params = params or {}
        rows = model_input.to_dict(orient="records")
        if "messages" in model_input.columns:
            return self._chat(rows, params)
        return self._instructions(rows, params)

    def _chat(self, rows: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        requests = [{"messages": plain_messages(row["messages"])} for row in rows]
        settings = chat_generation(params)
        results = self._generate(requests, params, return_finish_reason=True, return_usage=True, **settings)
        completions = [chat_completion(answers, self.model_name) for answers in results]
        return completions[0] if len(completions) == 1 else completions

    def _instructions(self, rows: list[dict[str, Any]], params: dict[str, Any]) -> list[str]:
        requests = []
        for row in rows:
            request = {"instruction": row["instruction"]}
            if isinstance(row.get("context"), str) and row["context"]:
                request["context"] = row["context"]
            requests.append(request)
        settings = {
            "max_new_tokens": int(params.get("max_new_tokens") or DEFAULT_MAX_TOKENS),
            "do_sample": bool(params.get("do_sample", False)),
            **penalty_setting(params),
        }
        results = self._generate(requests, params, **settings)
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
    (and register it as a new version of ``registered_model_name``, when named). Returns MLflow's model info
    (``model_uri``; ``registered_model_version`` when registered).

    The model is logged from code (this file), not pickled. No input example is given: MLflow would load the whole
    model to check it, which for a 12B model means minutes and tens of GB on the driver; the signature says the
    same.
    """
    import warnings

    import transformers

    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix=".staging-mlflow-", dir=model_dir) as staging:
        chosen = Path(staging) / MODEL_FOLDER  # MLflow names the artifact after the folder: the same in every model
        chosen.mkdir()
        for path in served_files(model_dir):
            _link_or_copy(path, chosen / path.name)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = _log(chosen, model_dir.name, registered_model_name, transformers.__version__)
    logger.info("Logged the model to MLflow: %s", info.model_uri)
    return info


def _log(model_dir: str | Path, model_name: str, registered_model_name: str | None, transformers_version: str) -> Any:
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=__file__,
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(PROJECT_ROOT / "training")],
        signature=SIGNATURE,
        model_config={"model_name": model_name, "max_batch_size": DEFAULT_MAX_BATCH_SIZE},
        metadata={"task": "llm/v1/chat"},  # what chat endpoints look for
        pip_requirements=[f"transformers=={transformers_version}", f"torch=={_torch_version()}", "accelerate"],
        registered_model_name=registered_model_name,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


# Logged from code: MLflow runs this file to build the model it serves.
mlflow.models.set_model(DollyModel())
