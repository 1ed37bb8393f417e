"""Serving the trained model: OpenAI-style chat requests and Dolly's table through MLflow (a real sqlite store and
registry, and a real ``mlflow models serve`` on a loopback port), a version per run in the registry, and a name the
registry would refuse refused before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import assert_finished, invoke_trainer, quick_training_args, subprocess_env

from training.driver.launch import free_port
from training.rank.tracking import REGISTERED_TAG, local_mlflow_store
from training.saved_model.mlflow_model import chat_completion, chat_generation

EXPERIMENT = "dolly-serving"
REGISTERED = "dolly-chat"
CHAT = [{"role": "user", "content": "Who wrote it?", "context": "Hamlet is a play by Shakespeare."}]


@pytest.fixture(scope="module")
def registered(tiny_model_dir, sample_path, tmp_path_factory) -> SimpleNamespace:
    """Two runs that each register their model as a new version of ``dolly-chat`` in a local sqlite registry."""
    folder = tmp_path_factory.mktemp("registry")
    uri = local_mlflow_store(folder / "store", EXPERIMENT)
    outs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        for name in ("first", "second"):
            out = folder / name
            args = quick_training_args(
                tiny_model_dir, sample_path, out, "--max-steps", "1", "--test-size", "0", mlflow=True
            )
            assert_finished(invoke_trainer([*args, "--register-model", REGISTERED]))
            outs.append(out)
    return SimpleNamespace(uri=uri, outs=outs, folder=folder)


def pipeline_answers(model_dir: Path, requests: list, **settings) -> list[dict]:
    """The project's pipeline on the saved folder, greedy: what every served answer must equal."""
    from training.generate import InstructionTextGenerationPipeline, load_model_tokenizer_for_generate

    model, tokenizer = load_model_tokenizer_for_generate(str(model_dir), device_map="cpu")
    pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)
    results = pipeline(
        requests, batch_size=1, do_sample=False, return_finish_reason=True, return_usage=True, **settings
    )
    return [result[0] for result in results]


def test_each_run_registers_a_new_version_and_says_which(registered, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registered.uri)
    versions = sorted(client.search_model_versions(f"name='{REGISTERED}'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2]
    for number, out in enumerate(registered.outs, start=1):
        record = json.loads((out / "mlflow_model.json").read_text())
        assert record["registered_model"] == REGISTERED and record["version"] == number
        run = client.get_run(record["run_id"])
        assert run.data.tags[REGISTERED_TAG] == f"{REGISTERED}/{number}"
        assert versions[number - 1].run_id == record["run_id"]
        card = (out / "README.md").read_text()
        assert f"Registered as **{REGISTERED}** version **{number}** (`models:/{REGISTERED}/{number}`)" in card
    logged_card = Path(client.download_artifacts(record["run_id"], "training/README.md")).read_text()
    assert "version **2**" in logged_card  # the run's copy of the card names the version too

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/2")
    answer = model.predict(pd.DataFrame({"messages": [CHAT]}), params={"max_tokens": 6, "temperature": 0.0})
    expected = pipeline_answers(registered.outs[1], [{"messages": CHAT}], max_new_tokens=6)[0]
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected["generated_text"]}


def post(port: int, body: dict) -> object:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def bin_first() -> str:
    """PATH with this environment's scripts first (the scoring server starts ``uvicorn`` by name)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def wait_until_serving(server: subprocess.Popen, port: int, log: Path, within_s: float = 180) -> None:
    deadline = time.monotonic() + within_s
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as ping:
                if ping.status == 200:
                    return
        except OSError:
            time.sleep(1)


def test_the_registered_model_serves_chat_and_dolly_requests_over_http(registered, tmp_path):
    out = registered.outs[1]
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{REGISTERED}/2"]
            + ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=subprocess_env(MLFLOW_TRACKING_URI=registered.uri, PATH=bin_first()),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until_serving(server, port, log)
            # An OpenAI chat request as a chat client sends it: one chat.completion back.
            expected = pipeline_answers(out, [{"messages": CHAT}], max_new_tokens=8)[0]
            answer = post(port, {"messages": CHAT, "max_tokens": 8, "temperature": 0})
            assert answer["object"] == "chat.completion" and len(answer["choices"]) == 1
            choice = answer["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": expected["generated_text"]}
            assert (
                choice["finish_reason"]
                == {"end_key": "stop", "eos": "stop", "length": "length"}[expected["finish_reason"]]
            )
            assert answer["usage"] == {
                "prompt_tokens": expected["prompt_tokens"],
                "completion_tokens": expected["completion_tokens"],
                "total_tokens": expected["prompt_tokens"] + expected["completion_tokens"],
            }
            # A stop string that the answer reaches ends it there, with finish_reason "stop".
            words = expected["generated_text"].split()
            if len(words) > 1:
                stopped = post(port, {"messages": CHAT, "max_tokens": 8, "temperature": 0, "stop": [words[1]]})
                content = stopped["choices"][0]["message"]["content"]
                assert stopped["choices"][0]["finish_reason"] == "stop"
                assert content == expected["generated_text"][: expected["generated_text"].find(words[1])].rstrip()
            # Several chat requests in one call: generated together, one completion each, the same answers.
            chats = [CHAT, [{"role": "user", "content": "Name a colour."}], CHAT]
            batch = post(port, {"dataframe_records": [{"messages": c} for c in chats], "params": {"max_tokens": 8}})
            alone = pipeline_answers(out, [{"messages": c} for c in chats], max_new_tokens=8)
            assert [c["choices"][0]["message"]["content"] for c in batch["predictions"]] == [
                a["generated_text"] for a in alone
            ]
            # Dolly's table still answers, from the same model.
            table = [{"instruction": "Name a colour."}, {"instruction": "Who wrote it?", "context": CHAT[0]["context"]}]
            dolly = post(port, {"dataframe_records": table, "params": {"max_new_tokens": 8}})
            assert dolly["predictions"] == [a["generated_text"] for a in pipeline_answers(out, table, max_new_tokens=8)]
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)


def test_a_name_unity_catalog_would_refuse_is_refused_before_training(
    tiny_model_dir, sample_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_mlflow_store(tmp_path / "store", EXPERIMENT))
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "databricks-uc")  # Databricks' default registry
    args = quick_training_args(tiny_model_dir, sample_path, tmp_path / "out", "--max-steps", "1", mlflow=True)
    run = invoke_trainer([*args, "--register-model", "dolly"])
    assert run.exit_code != 0
    assert "Unity Catalog (databricks-uc), which needs a three-part name, catalog.schema.model" in run.log
    assert not (tmp_path / "out").exists()  # refused before anything was written, let alone trained
    bad = invoke_trainer([*args, "--register-model", "main.default.my model"])
    assert "'my model' in 'main.default.my model' is not a Unity Catalog name" in bad.log


def test_chat_options_map_to_generation_and_answers_to_openais_shape():
    assert chat_generation({}) == {"max_new_tokens": 256, "do_sample": False}
    assert chat_generation({"max_tokens": 12, "temperature": 0.7, "stop": ["\n\n"], "n": 2}) == {
        "max_new_tokens": 12,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": 0,
        "num_return_sequences": 2,
        "stop": ["\n\n"],
    }
    assert chat_generation({"answer_repetition_penalty": 1}) == {
        "max_new_tokens": 256,
        "do_sample": False,
        "answer_repetition_penalty": 1.0,
    }
    with pytest.raises(ValueError, match="n above 1 needs a temperature above 0"):
        chat_generation({"n": 3})
    answers = [
        {"generated_text": "Blue.", "finish_reason": "end_key", "prompt_tokens": 20, "completion_tokens": 3},
        {"generated_text": "Red and", "finish_reason": "length", "prompt_tokens": 20, "completion_tokens": 4},
    ]
    completion = chat_completion(answers, "dolly-run")
    assert completion["id"].startswith("chatcmpl-") and completion["model"] == "dolly-run"
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in completion["choices"]] == [
        (0, "Blue.", "stop"),
        (1, "Red and", "length"),
    ]
    assert completion["usage"] == {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}


def test_served_answers_come_in_request_order_the_same_with_and_without_batches(zero3_run):
    """The MLflow model splits a call into batches of at most max_batch_size requests of similar prompt length and
    answers in the request order: the same answers as one batch and as one request at a time."""
    from types import SimpleNamespace

    import pandas as pd

    from training.saved_model.mlflow_model import MODEL_ARTIFACT, DollyModel

    served = DollyModel()
    served.load_context(
        SimpleNamespace(artifacts={MODEL_ARTIFACT: str(zero3_run.out)}, model_config={"max_batch_size": 2})
    )
    sizes = []
    pipeline = served.pipeline
    served.pipeline = lambda requests, **kwargs: sizes.append(len(requests)) or pipeline(requests, **kwargs)
    served.pipeline.tokenizer = pipeline.tokenizer
    instructions = [
        "Name a primary colour and say why it is called primary, in one sentence.",
        "Hi",
        "Summarise the plot of a story about a fox who jumps over a lazy dog, then give it a title.",
        "What is two plus two?",
        "List three fruits.",
    ]
    rows = pd.DataFrame([{"instruction": text} for text in instructions])
    params = {"max_new_tokens": 6}
    batched = served.predict(None, rows, params)
    assert sizes == [2, 2, 1]
    whole = served.predict(None, rows, {**params, "max_batch_size": 100})
    alone = [served.predict(None, rows.iloc[[i]], params)[0] for i in range(len(instructions))]
    assert batched == whole == alone and len(batched) == 5
    chats = served.predict(
        None, pd.DataFrame([{"messages": [{"role": "user", "content": t}]} for t in instructions]), {"max_tokens": 6}
    )
    assert [c["choices"][0]["message"]["content"] for c in chats] == alone
