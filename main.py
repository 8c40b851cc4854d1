"""Entry point: ``python main.py {fit,validate,test,predict,compare,download} ...``.

``fit``/``validate``/``test``/``predict`` are Lightning's CLI over a method (any subclass of
``AnomalySegmentationModule``) and the StreetHazards datamodule; ``compare`` runs every method
on the same data and writes one table and one figure; ``download`` fetches the real dataset.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_modules.dual_decoder  # noqa: F401  (imported: registers the methods for --model=<ClassName>)
import lightning_modules.fre  # noqa: F401
import lightning_modules.sml  # noqa: F401
from callbacks.checkpointing import AtomicCheckpointIO, resolve_ckpt_path
from callbacks.evaluation import AnomalyEvaluation
from callbacks.guards import (
    ConfigurationError,
    NonFiniteLossGuard,
    PreemptionCheckpoint,
    TrainingPreempted,
    check_checkpoint_class,
    check_checkpoint_matches,
)
from callbacks.prediction_writer import AnomalyPredictionWriter
from callbacks.visualization import AnomalyHeatmapLogger
from datamodules.streethazards import StreetHazardsDataModule
from lightning_modules.base import AnomalySegmentationModule


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what is wrong and where: printed as one line, exit code 2."""
    from callbacks.checkpointing import CheckpointError
    from callbacks.guards import NonFiniteLossError
    from datamodules.streethazards import StreetHazardsDataError
    from lightning_modules.segmenter import PretrainedWeightsError

    errors: list[type[BaseException]] = [StreetHazardsDataError, CheckpointError, PretrainedWeightsError]
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    errors += [NonFiniteLossError, ConfigurationError, MisconfigurationException]
    from datamodules.download import DownloadError
    from datamodules.injection import OutlierSourceError

    errors += [DownloadError, OutlierSourceError]
    return tuple(errors)


class AnomalyCLI(LightningCLI):
    """LightningCLI with the evaluation callbacks and checkpointing always present and configurable."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/miou",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
                # The log folder is fixed (version: run): a restarted run must overwrite last.ckpt,
                # not write last-v1.ckpt beside it (which --ckpt_path last would never find).
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(AnomalyEvaluation, "evaluation")
        parser.add_lightning_class_args(AnomalyHeatmapLogger, "heatmaps")
        parser.add_lightning_class_args(AnomalyPredictionWriter, "predictions")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(NonFiniteLossGuard, "nonfinite")
        # The prediction writer saves every output; keeping them all in memory too would take
        # tens of GB on the full test set.
        try:
            parser.set_defaults({"return_predictions": False})
        except KeyError:
            pass  # not the predict subcommand

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Given a checkpoint file, LightningCLI next rebuilds the model from the hyperparameters
        # stored in it, class included: check the file, and that it was written by the configured
        # method, before that happens.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            model = config.get("model")
            check_checkpoint_class(ckpt_path, model.get("class_path") if isinstance(model, Namespace) else None)

    def before_instantiate_classes(self) -> None:
        # Without a configured logger, Lightning's default TensorBoardLogger numbers its folder
        # version_0, version_1, ... per run, so a requeued job would not find its last.ckpt. Use
        # a fixed folder instead: <default_root_dir>/<method>/run, like the shipped configs.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("logger") in (None, True):
            class_path = str(config.model.get("class_path", "")) if config.get("model") else ""
            module_name, _, class_name = class_path.rpartition(".")
            model_class = getattr(sys.modules.get(module_name), class_name, None)
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=config.trainer.get("default_root_dir") or "outputs",
                    name=getattr(model_class, "method_name", "default"),
                    version="run",
                ),
            )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # jsonargparse wraps what a constructor raised ("Does not validate against any of the
            # Union subtypes ..."); the constructor's own message says what is wrong.
            cause = _root_cause(error)
            if cause is error or not isinstance(cause, ValueError):
                raise
            raise ConfigurationError(str(cause)) from error
        # Every checkpoint is written atomically and loaded with weights_only=True.
        self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _checkpoint_dir(self) -> Path | None:
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath)
        logger = self.trainer.logger
        if logger is not None and logger.log_dir is not None:
            return Path(logger.log_dir) / "checkpoints"
        return Path(self.trainer.default_root_dir) / "checkpoints"

    def _resolve_ckpt_path(self) -> None:
        config = self.config_init[self.subcommand]
        if "ckpt_path" in config:
            config["ckpt_path"] = resolve_ckpt_path(config["ckpt_path"], self._checkpoint_dir())
            if config["ckpt_path"] not in (None, "best", "hpc", "registry"):
                check_checkpoint_matches(config["ckpt_path"], self.model)

    before_fit = before_validate = before_test = before_predict = _resolve_ckpt_path


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> AnomalyCLI:
    return AnomalyCLI(
        AnomalySegmentationModule,
        StreetHazardsDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "outputs"},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def _root_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


USAGE = """usage: main.py {fit,validate,test,predict,compare,download} [options]

  fit, validate, test, predict   LightningCLI subcommands: main.py <subcommand> --config configs/<method>.yaml
  compare                        train, fit and test every method; one table and one figure (no options:
                                 the embedded synthetic dataset, about 10 minutes on 2 CPU cores)
  download                       fetch and unpack StreetHazards: main.py download --root DIR

main.py <subcommand> --help lists a subcommand's options."""


def main(argv: Sequence[str] | None = None) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    # LightningCLI reads sys.argv itself when given None (and warns when given both).
    cli_args = None if argv is None else list(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        if argv:
            return 0
        print(
            "error: no subcommand given; pick one of fit, validate, test, predict, compare, download", file=sys.stderr
        )
        return 2
    errors = _user_errors()
    try:
        if argv and argv[0] == "compare":
            from callbacks.comparison import compare_main

            try:
                return compare_main(argv[1:])
            except (FileNotFoundError, ValueError) as error:
                if not str(error).startswith("compare: "):  # compare's own checks of its options
                    raise
                print(f"error: {error}", file=sys.stderr)
                return 2
        if argv and argv[0] == "download":
            from datamodules.download import download_main

            return download_main(argv[1:])
        cli_main(cli_args)
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # A user error raised inside a constructor reaches here wrapped by jsonargparse; an
        # OSError about a path (an output folder that cannot be created) names that path.
        cause = _root_cause(error)
        if not isinstance(cause, errors) and not (isinstance(cause, OSError) and cause.filename is not None):
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    except TrainingPreempted as stop:
        print(f"stopped: {stop.message}", file=sys.stderr)
        return int(stop.code)
    except SIGTERMException:
        # Lightning's own stop on SIGTERM outside a training batch (see PreemptionCheckpoint).
        print("stopped: training stopped by SIGTERM; run the same command with --ckpt_path last", file=sys.stderr)
        return 128 + 15
    return 0


if __name__ == "__main__":
    sys.exit(main())
