"""Entry point: ``python main.py {fit,validate,test,predict,compare,download} ...``.

``fit``/``validate``/``test``/``predict`` are Lightning's CLI over a method (any subclass of
``AnomalySegmentationModule``) and the StreetHazards datamodule; ``compare`` runs every method
on the same data and writes one table and one figure; ``download`` fetches the real dataset.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_modules  # noqa: F401  (registers the methods for --model)
from callbacks.checkpointing import AtomicCheckpointIO, resolve_ckpt_path
from callbacks.evaluation import AnomalyEvaluation
from callbacks.prediction_writer import AnomalyPredictionWriter
from callbacks.visualization import AnomalyHeatmapLogger
from datamodules.streethazards import StreetHazardsDataModule
from lightning_modules.base import AnomalySegmentationModule


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what is wrong and where: printed as one line, exit code 2."""
    from callbacks.checkpointing import CheckpointError
    from datamodules.streethazards import StreetHazardsDataError
    from lightning_modules.segmenter import PretrainedWeightsError

    errors: list[type[BaseException]] = [StreetHazardsDataError, CheckpointError, PretrainedWeightsError]
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
            }
        )
        parser.add_lightning_class_args(AnomalyEvaluation, "evaluation")
        parser.add_lightning_class_args(AnomalyHeatmapLogger, "heatmaps")
        parser.add_lightning_class_args(AnomalyPredictionWriter, "predictions")
        # The prediction writer saves every output; keeping them all in memory too would take
        # tens of GB on the full test set.
        try:
            parser.set_defaults({"return_predictions": False})
        except KeyError:
            pass  # not the predict subcommand

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    errors = _user_errors()
    try:
        if argv and argv[0] == "compare":
            from callbacks.comparison import compare_main

            return compare_main(argv[1:])
        if argv and argv[0] == "download":
            from datamodules.download import download_main

            return download_main(argv[1:])
        cli_main(argv)
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
