"""Batched chat requests: N requests in one call against the same N requests one call each, through the run's MLflow
model (the code ``mlflow models serve`` runs), in one process.

    python -m bench.serving [--input-model embedded|PATH] [--requests 8] [--max-tokens 64] [--repeats 3]

The model is the embedded SmolLM2-135M-Instruct made ready for Dolly's format as a training run saves it (Dolly's
special tokens, its chat template, the stopping generation config and the pipeline code), without training, then
logged to a scratch MLflow store as the trainer logs it. The requests are the first N instructions (with their
context) of the project's sample records, greedy, at most ``--max-tokens`` new tokens each. Each way is timed
``--repeats`` times after a warm-up call; the median counts. Writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, RESULTS_DIR, result_header, write_json
from bench.throughput import resolve_model
from training.logs import configure_logging

logger = logging.getLogger(__name__)

SAMPLE = PROJECT_ROOT / "data" / "dolly_sample.jsonl"


def dolly_ready_model(model_dir: str, folder: Path) -> Path:
    """``model_dir`` saved as a training run saves its model: Dolly's tokens, chat template, generation config and
    pipeline code (no training)."""
    from training.rank.modeling import get_model_tokenizer
    from training.rank.saving import add_pipeline_to_config, save_tokenizer, write_pipeline_code

    model, tokenizer = get_model_tokenizer(model_dir)
    add_pipeline_to_config(model, tokenizer)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    write_pipeline_code(folder)
    return folder


def chat_requests(count: int) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [
        {
            "messages": [
                {"role": "user", "content": r["instruction"], **({"context": r["context"]} if r["context"] else {})}
            ]
        }
        for r in records[:count]
    ]


def timed(call) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-model", default="embedded")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serving.json")
    options = parser.parse_args(argv)

    import mlflow
    import pandas as pd

    from training.rank.tracking import local_mlflow_store
    from training.saved_model.mlflow_model import log_pipeline_model

    requests = chat_requests(options.requests)
    params = {"max_tokens": options.max_tokens, "temperature": 0.0}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = dolly_ready_model(str(resolve_model(options.input_model)), scratch / "model")
        mlflow.set_tracking_uri(local_mlflow_store(scratch / "store"))
        with mlflow.start_run():
            info = log_pipeline_model(folder)
        model = mlflow.pyfunc.load_model(info.model_uri)
        model.predict(pd.DataFrame(requests[:2]), params=params)  # warm-up
        one_call, separate = [], []
        for _ in range(options.repeats):
            seconds, batched = timed(lambda: model.predict(pd.DataFrame(requests), params=params))
            one_call.append(seconds)
            seconds, alone = timed(
                lambda: [model.predict(pd.DataFrame([request]), params=params) for request in requests]
            )
            separate.append(seconds)
        mlflow.end_run()
    batched_tokens = sum(answer["usage"]["completion_tokens"] for answer in batched)
    alone_tokens = sum(answer["usage"]["completion_tokens"] for answer in alone)
    same = sum(
        a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"] for a, b in zip(batched, alone)
    )
    payload = {
        **result_header("bench.serving", argv),
        "model": options.input_model,
        "requests": options.requests,
        "max_tokens": options.max_tokens,
        "repeats": options.repeats,
        "one_call_seconds": one_call,
        "separate_calls_seconds": separate,
        "one_call_median_s": statistics.median(one_call),
        "separate_calls_median_s": statistics.median(separate),
        "ratio": statistics.median(one_call) / statistics.median(separate),
        "completion_tokens_one_call": batched_tokens,
        "completion_tokens_separate": alone_tokens,
        "same_answers": same,
        "finish_reasons_one_call": [answer["choices"][0]["finish_reason"] for answer in batched],
    }
    write_json(options.out, payload)
    print(json.dumps({k: payload[k] for k in ("one_call_median_s", "separate_calls_median_s", "ratio")}, indent=2))
    return payload


if __name__ == "__main__":
    main()
