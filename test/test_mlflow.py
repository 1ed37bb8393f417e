"""The trained model goes where users take it: an MLflow run (a real sqlite store), a model MLflow loads and serves
over HTTP, held-out evaluation in the model card and the run, and LangChain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, assert_finished, invoke_trainer, quick_training_args, run_example

from training.rank.tracking import local_mlflow_store

CPU_CONFIG = str(PROJECT_ROOT / "config" / "cpu_config.json")
EXPERIMENT = "dolly-tests"


@pytest.fixture(scope="module")
def tracked_run(zero3_run) -> dict:
    """The shared 2-rank ZeRO-3 run (conftest), which logged to an MLflow store of its own."""
    log = zero3_run.result.stdout + zero3_run.result.stderr
    return {"uri": zero3_run.uri, "out": zero3_run.out, "env": zero3_run.env, "log": log}


def only_run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]  # rank 0 only: one run for two ranks
    return client, runs[0]


def test_one_run_with_settings_metrics_files_and_model(tracked_run):
    client, run = only_run(tracked_run["uri"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["setting.lr"] == "0.001" and params["setting.deepspeed"] == CPU_CONFIG
    assert params["setting.per_device_train_batch_size"] == "4" and "learning_rate" in params  # ours, the Trainer's
    steps = lambda key: [m.step for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert steps("loss") == [1, 2, 3, 4]  # --logging-steps 1, --max-steps 4
    assert steps("eval_loss") == [2, 4]
    assert steps("learning_rate") == [1, 2, 3, 4]
    speeds = client.get_metric_history(run.info.run_id, "tokens_per_second")
    assert [m.step for m in speeds] == [1, 2, 3, 4] and all(m.value > 0 for m in speeds)
    files = {item.path for item in client.list_artifacts(run.info.run_id, "training")}
    assert files == {"training/run_config.json", "training/README.md", "training/training_loss.png"}
    record = json.loads((tracked_run["out"] / "run_config.json").read_text())
    assert record["resolved"]["mlflow_run_id"] == run.info.run_id


def test_the_logged_model_holds_the_model_not_the_runs_checkpoints(tracked_run, monkeypatch):
    """The run kept checkpoint-2 and checkpoint-4 (and runs/, the records, the lock): the MLflow model has none of
    them, and its size is the saved model's."""
    client, run = only_run(tracked_run["uri"])
    out = tracked_run["out"]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir() and (out / "runs").is_dir()

    def files(path: str) -> list:
        found = []
        for item in client.list_artifacts(run.info.run_id, path):
            found.extend(files(item.path) if item.is_dir else [item])
        return found

    from mlflow.artifacts import download_artifacts

    track_to(monkeypatch, tracked_run["uri"])
    logged = Path(download_artifacts(f"runs:/{run.info.run_id}/model"))
    artifacts = [path for path in (logged / "artifacts").rglob("*") if path.is_file()]
    assert {path.relative_to(logged / "artifacts").parts[0] for path in artifacts} == {"hf_model"}  # a stable name
    names = {path.name for path in artifacts}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert {"instruct_pipeline.py", "consts.py", "prompts.py"} <= names
    assert not [path for path in artifacts if "checkpoint" in str(path) or "/runs/" in str(path)]
    assert not names & {"run_config.json", "trainer_state.json", "training_args.bin", ".dolly-run.lock"}
    logged_bytes = sum(path.stat().st_size for path in artifacts)
    saved_bytes = sum(path.stat().st_size for path in out.iterdir() if path.is_file())
    assert abs(logged_bytes - saved_bytes) <= 0.05 * saved_bytes, (logged_bytes, saved_bytes)
    assert files("training")  # the run's own files stay on the run


def test_every_evaluation_logs_sample_answers_and_their_stop_rate(tracked_run):
    """Under ZeRO-3 on 2 ranks (the shared run): eval_stop_rate at each evaluation step, the answers as a table in
    MLflow and as text in TensorBoard, and the warning that none stopped (a 4-step tiny model never does)."""
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client, run = only_run(tracked_run["uri"])
    rates = client.get_metric_history(run.info.run_id, "eval_stop_rate")
    assert [m.step for m in rates] == [2, 4] and all(math.isnan(m.value) or 0 <= m.value <= 1 for m in rates)
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_answers.json")).read_text())
    table = pd.DataFrame(logged["data"], columns=logged["columns"])  # mlflow.log_table's layout
    assert list(table.columns) == ["step", "instruction", "reference", "answer", "stopped", "outcome"]
    assert table["step"].tolist() == [2, 2, 2, 2, 4, 4, 4, 4]  # the default 4 answers, at both evaluations
    assert table["instruction"].tolist()[:4] == table["instruction"].tolist()[4:]  # the same fixed instructions
    last = table[table["step"] == 4]
    could_stop = (last["outcome"] != "token cap").sum()
    assert set(table["outcome"]) <= {"stopped", "token cap", "ran on"}
    assert all(table["reference"]) and (
        last["stopped"].sum() / could_stop == pytest.approx(rates[-1].value)
        if could_stop
        else math.isnan(rates[-1].value)
    )
    events = EventAccumulator(str(next((tracked_run["out"] / "runs").iterdir())), size_guidance={"tensors": 0})
    events.Reload()
    assert [event.step for event in events.Tensors("eval_answers/text_summary")] == [2, 4]
    # The model card says it too, with the cap.
    card = (tracked_run["out"] / "README.md").read_text()
    assert "| answers that stop at `### End`, last evaluation | " in card and "at most 8 new tokens" in card
    if (table["outcome"] == "ran on").any() and not table["stopped"].any():
        assert "No sample answer stopped at ### End in 2 evaluations" in tracked_run["log"]


def test_the_logged_model_loads_and_answers(tracked_run, monkeypatch):
    import mlflow
    import pandas as pd

    _, run = only_run(tracked_run["uri"])
    track_to(monkeypatch, tracked_run["uri"])
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    table = pd.DataFrame({"instruction": ["Name a colour.", "Who wrote it?"], "context": ["", "Hamlet is a play."]})
    answers = model.predict(table, params={"max_new_tokens": 6})
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    assert model.metadata.get_input_schema().input_names() == ["messages", "instruction", "context"]


def test_evaluation_before_and_after_lands_in_the_card_and_the_run(
    tracked_run, tiny_model_dir, sample_path, monkeypatch
):
    from training.evaluate import evaluate

    out = tracked_run["out"]
    track_to(monkeypatch, tracked_run["uri"])
    result = evaluate(out, str(sample_path), baseline=str(tiny_model_dir), answered=2, max_new_tokens=6)
    assert result["records"] == 8  # the run's own held-out split (--test-size 8)
    trained = result["metrics"][str(out)]
    # The same held-out records and loss the Trainer evaluated at its last step.
    state = json.loads((out / "trainer_state.json").read_text())
    final_eval = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry][-1]
    assert trained["response_loss"] == pytest.approx(final_eval, rel=1e-3)
    assert set(trained["response_loss_by_category"]) <= {json.loads(line)["category"] for line in sample_path.open()}
    assert 0 <= trained["stops_at_end"] <= 1 and len(result["samples"]) == 2
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: cc-by-sa-3.0" in card and "pipeline_tag: text-generation" in card
    assert (
        f"| held-out response loss (per token) | {result['metrics'][str(tiny_model_dir)]['response_loss']:.3f} | "
        f"{trained['response_loss']:.3f} |" in card
    )
    client, run = only_run(tracked_run["uri"])
    assert client.get_run(run.info.run_id).data.metrics["eval_trained_response_loss"] == pytest.approx(
        trained["response_loss"]
    )


def track_to(monkeypatch, uri: str, experiment: str | None = None) -> None:
    """MLflow in this process logs to ``uri`` (and ``experiment``) for this test, as a process started with
    MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME does (nothing here sets MLflow's process-wide overrides)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if experiment:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)


def test_no_mlflow_logs_nothing(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = local_mlflow_store(tmp_path / "store", EXPERIMENT)
    track_to(monkeypatch, uri, EXPERIMENT)
    args = quick_training_args(tiny_model_dir, sample_path, tmp_path / "out", "--max-steps", "1", "--no-mlflow")
    assert_finished(invoke_trainer(args))
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT)
    assert MlflowClient(tracking_uri=uri).search_runs([experiment.experiment_id]) == []
    assert "mlflow_run_id" not in json.loads((tmp_path / "out" / "run_config.json").read_text())["resolved"]


def test_a_resumed_training_is_a_new_run_tagged_with_the_one_it_continues(
    tiny_model_dir, sample_path, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from training.rank.tracking import RESUMED_FROM_TAG

    uri = local_mlflow_store(tmp_path / "store", EXPERIMENT)
    track_to(monkeypatch, uri, EXPERIMENT)
    out = tmp_path / "out"
    assert_finished(
        invoke_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--max-steps", "2", mlflow=True))
    )
    first_id = json.loads((out / "run_config.json").read_text())["resolved"]["mlflow_run_id"]
    assert_finished(
        invoke_trainer(
            quick_training_args(tiny_model_dir, sample_path, out, "--max-steps", "4", "--resume", mlflow=True)
        )
    )
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], order_by=["start_time ASC"])
    assert [run.info.run_id for run in runs][0] == first_id and len(runs) == 2
    assert runs[1].data.tags[RESUMED_FROM_TAG] == first_id and runs[1].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[1].info.run_id, "loss")] == [3, 4]


def test_langchain_example_answers_with_and_without_context(embedded_model_dir, capsys, monkeypatch):
    printed = run_example("langchain.py", capsys=capsys, monkeypatch=monkeypatch)
    without, _, rest = printed.partition("-----------")
    assert without.startswith("Without context:\n") and len(without.split("\n", 1)[1].strip()) > 0
    with_context = rest.strip().split("\n", 1)
    assert with_context[0] == "With context:" and len(with_context[1].replace("-", "").strip()) > 0


def test_a_tracking_store_failing_at_the_end_hides_no_training_error(tmp_path, monkeypatch):
    """The training's own error reaches the user even when MLflow cannot be written any more (a full disk)."""
    import mlflow

    from training.rank.tracking import mlflow_run
    from training.settings import TrainSettings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_mlflow_store(tmp_path / "store"))
    settings = TrainSettings(local_output_dir=str(tmp_path / "out"))

    def store_gone(*args, **kwargs):
        raise OSError("disk full")

    end_run = mlflow.end_run
    with pytest.raises(ValueError, match="the training's own error"), mlflow_run(settings, main_process=True):
        monkeypatch.setattr(mlflow, "end_run", store_gone)
        raise ValueError("the training's own error")
    end_run()  # in this test's store, before its tracking URI is undone


LOCAL_TASK = """task: dolly_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
LOCAL_QUESTIONS = [
    {"question": "The sky on a clear day is", "choices": [" blue", " green", " red"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin"], "answer": 0},
    {"question": "A cat says", "choices": [" meow", " moo", " quack"], "answer": 0},
    {"question": "The opposite of hot is", "choices": [" cold", " loud"], "answer": 0},
]


def test_lm_eval_benchmarks_land_in_evaluation_the_card_and_the_run(tracked_run, tiny_model_dir, tmp_path, monkeypatch):
    """The dolly-v2 card's table, with a task written in lm-eval's own format over a local file (the dolly-v2 tasks
    need the hub): lm-eval itself runs it, for the trained model and its base."""
    from training.evaluate import evaluate, report

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in LOCAL_QUESTIONS))
    (tasks / "dolly_local_mc.yaml").write_text(LOCAL_TASK.format(data=tasks / "questions.jsonl"))
    out = tracked_run["out"]
    track_to(monkeypatch, tracked_run["uri"])
    result = evaluate(
        out, None, baseline=str(tiny_model_dir), benchmarks=["dolly_local_mc"], benchmark_tasks_dir=str(tasks)
    )
    benchmarks = result["benchmarks"]
    assert benchmarks["metric"] == {"dolly_local_mc": "acc_norm"}  # lm-eval's normalised accuracy, as dolly-v2's
    for model in (str(tiny_model_dir), str(out)):
        score = benchmarks["scores"][model]["dolly_local_mc"]
        assert score in {0, 0.25, 0.5, 0.75, 1}  # a share of the 4 questions
    assert json.loads((out / "evaluation.json").read_text())["benchmarks"]["scores"] == benchmarks["scores"]
    card = (out / "README.md").read_text()
    assert "| model | dolly_local_mc | gmean |" in card
    assert "| after training (this model) | " in card and f"| before training (`{tiny_model_dir.name}`) | " in card
    assert "held-out response loss" in card  # the held-out figures of the earlier evaluation stay
    client, run = only_run(tracked_run["uri"])
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["bench_trained_dolly_local_mc"] == benchmarks["scores"][str(out)]["dolly_local_mc"]
    assert {"bench_baseline_dolly_local_mc", "bench_trained_gmean", "bench_baseline_gmean"} <= set(logged)
    assert "lm-evaluation-harness:" in report(result)
