"""Fine-tune a causal LM on dolly-format records: ``python -m training.trainer`` or
``deepspeed --num_gpus N --module training.trainer``.

:func:`train` reads in three steps: **prepare** (arguments, model, tokenizer, data: ``training.rank.prepare``),
**train** (the Hugging Face Trainer: ``training.rank.dolly_trainer``) and **publish** (the finished model, its copy
and its MLflow model: ``training.rank.publish``). The public names of Dolly's ``training/trainer.py`` are kept here,
so code written against Dolly keeps working.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click

from .data import load_training_dataset
from .logs import configure_logging
from .preprocess import preprocess_batch, preprocess_dataset
from .rank.checkpoints import CheckpointCompletion
from .rank.collators import DataCollatorForCompletionOnlyLM
from .rank.disk_check import DiskTooSmallError
from .rank.distributed import (
    barrier,
    end_process,
    exit_after_success,
    is_distributed,
    is_main_process,
    leave_process_group,
    world_size,
)
from .rank.dolly_trainer import DollyTrainer, run_training
from .rank.elastic import resume_point
from .rank.modeling import get_model_tokenizer, load_model, load_tokenizer
from .rank.op_builds import prepare_op_builds
from .rank.option_checks import check_max_length
from .rank.packing import DataCollatorForPackedCompletionOnlyLM
from .rank.prepare import PreparedRun, parameter_count, prepare, split_dataset, training_arguments
from .rank.publish import TRAINING_LOG_NAME, publish, save_trained_model
from .rank.run_lock import run_lock
from .rank.run_record import RUN_CONFIG_NAME, RunRecorder, read_run_config
from .rank.saving import prepare_output_dir
from .rank.stopping import STOPPED_EXIT_CODE, RunStopped, StopRequests
from .rank.tracking import check_registry, mlflow_run
from .saved_model.model_card import read_json
from .settings import SettingsError, TrainSettings, click_options, given_settings, parse_test_size

__all__ = [
    "CheckpointCompletion",
    "DataCollatorForCompletionOnlyLM",
    "DataCollatorForPackedCompletionOnlyLM",
    "DollyTrainer",
    "TRAINING_LOG_NAME",
    "get_model_tokenizer",
    "load_model",
    "load_tokenizer",
    "load_training_dataset",
    "parameter_count",
    "parse_test_size",
    "preprocess_batch",
    "preprocess_dataset",
    "save_trained_model",
    "split_dataset",
    "train",
    "training_arguments",
]

logger = logging.getLogger("training.trainer")  # also when run as __main__


def train(settings: TrainSettings | None = None, **kwargs) -> Path:
    """Fine-tune a model on dolly records and save a pipeline-ready model to ``local_output_dir``.

    Takes Dolly's keywords (``train(input_model=..., local_output_dir=..., epochs=..., ...)``) and ours: each is a
    field of :class:`~training.settings.TrainSettings`, where its default and meaning are. Or pass the settings
    themselves (keywords then override them).
    """
    if settings is None:
        settings = TrainSettings(**kwargs)
    elif kwargs:
        settings = dataclasses.replace(settings, **kwargs)
    output_dir = Path(settings.local_output_dir)
    check_registry(settings)  # a name the registry would refuse, refused now rather than after training
    with run_lock(output_dir, is_main_process(), settings.launch_id):
        checkpoint = prepare_output_dir(
            output_dir,
            resume=settings.resume,
            overwrite=settings.overwrite_output_dir,
            is_main_process=is_main_process(),
        )
        resume = None
        if checkpoint is not None:  # on another number of ranks: the global batch kept (prepare makes it loadable)
            settings, resume = resume_point(settings, checkpoint, world_size())
        with StopRequests(output_dir, settings.stop_grace_period, settings.launch_id) as stops:
            prepared = prepare(settings, resume)
            stop_if_asked(stops, prepared, step=resume.step if resume else 0)
            resumed_from = earlier_mlflow_run(output_dir, settings)
            with mlflow_run(settings, main_process=is_main_process(), resumed_from=resumed_from) as tracking:
                recorder = RunRecorder(prepared.record(**({"mlflow_run_id": tracking.info.run_id} if tracking else {})))
                trainer = run_training(prepared, recorder, stops)
                stop_if_asked(stops, prepared, step=trainer.state.global_step)
                publish(trainer, prepared, recorder, tracking)
    logger.info("Done.")
    return output_dir


def stop_if_asked(stops: StopRequests, prepared: PreparedRun, *, step: int) -> None:
    """Raise :class:`RunStopped` on every rank when any rank was asked to stop (collective), once every rank's part of
    the checkpoint at ``step`` is written and marked."""
    if not stops.agreed(prepared.args.device):
        return
    barrier()
    stops.done()
    raise RunStopped(step, stops.reason or "", nothing_trained=step == 0 and prepared.resume is None)


def earlier_mlflow_run(output_dir: Path, settings: TrainSettings) -> str | None:
    """The MLflow run a resumed training continues (from the run record it left), if any."""
    if not settings.resume:
        return None
    return read_json(output_dir / RUN_CONFIG_NAME).get("resolved", {}).get("mlflow_run_id")


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Replay the settings of a run's run_config.json; options given here win.",
)
@click_options
@click.pass_context
def main(ctx: click.Context, config_file: str | None, **options) -> None:
    """Fine-tune a causal LM on dolly-format instruction records."""
    try:
        chosen = {**(read_run_config(config_file) if config_file else {}), **given_settings(ctx)}
        if "local_output_dir" not in chosen:
            raise click.UsageError("Missing option '--local-output-dir' (or --config with a run's run_config.json).")
        settings = TrainSettings(**chosen)
    except SettingsError as err:
        raise click.UsageError(str(err)) from None
    check_max_length(settings)  # before any model is loaded or process group started
    if settings.deepspeed:
        prepare_op_builds()  # DeepSpeed builds ops on first use: a killed build must not hang this launch
    try:
        train(settings)
    except (SettingsError, DiskTooSmallError) as err:  # found before any model was loaded: no traceback
        raise click.ClickException(str(err)) from None
    except RunStopped as stopped:
        logger.warning("%s", stopped)  # the run's last line
        if is_distributed():
            end_process(STOPPED_EXIT_CODE)  # as after success, see exit_after_success
        raise SystemExit(STOPPED_EXIT_CODE) from None
    finally:
        distributed = leave_process_group()
    if distributed:
        exit_after_success()


def run_cli(argv: list[str] | None = None) -> None:
    """The command line, with logging set up and a failure logged with its traceback on the rank that failed."""
    configure_logging()
    try:
        main(args=argv)
    except Exception:
        logger.exception("main failed")
        raise


if __name__ == "__main__":
    run_cli()
