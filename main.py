"""Entry point: ``python main.py {fit,validate,test,predict,compare,download} ...``.

``fit``/``validate``/``test``/``predict`` are Lightning's CLI over a method (a registered
``AnomalySegmentationModule``: ``--model=<name>`` or a config's ``class_path``) and the
StreetHazards datamodule; ``compare`` runs every method on the same data and writes one table and
one figure; ``download`` fetches the real dataset.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
import time
from collections.abc import Collection, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.evaluation import AnomalyEvaluation, load_image_summaries
from callbacks.guards import NonFiniteLossGuard, PreemptionCheckpoint, TrainingPreempted
from callbacks.metrics.functional.bootstrap import (
    BOOTSTRAP_LEVEL,
    LOWER_IS_BETTER,
    PAIRED_KEYS,
    check_bootstrap_samples,
    check_bootstrap_seed,
    paired_comparison,
)
from callbacks.prediction_writer import AnomalyPredictionWriter
from callbacks.protocol import resolve_presets
from callbacks.visualization import AnomalyHeatmapLogger
from datamodules.io import atomic_open, atomic_write_json, atomic_write_text
from datamodules.labels import ANOMALY_INDEX, CLASS_NAMES, IMAGE_MEAN, IMAGE_STD, colorize
from datamodules.streethazards import InjectionConfig, StreetHazardsDataModule, prepare_batch
from lightning_modules.base import AnomalySegmentationModule
from lightning_modules.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint_class,
    check_checkpoint_matches,
    initial_weights_from,
    read_checkpoint,
    resolve_ckpt_path,
    upgrade_hyperparameters,
)
from lightning_modules.registry import discover_methods, get_method, roster
from lightning_modules.registry import methods as methods_registry

discover_methods()


class ConfigurationError(ValueError):
    """A method or datamodule rejected its configuration (raised while the CLI builds them)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what is wrong and where: printed as one line, exit code 2."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from callbacks.guards import GuardOptionError, NonFiniteLossError
    from callbacks.protocol import EvaluationOptionError
    from datamodules.download import DownloadError
    from datamodules.injection import OutlierSourceError
    from datamodules.streethazards import StreetHazardsDataError
    from lightning_modules.checkpoints import CheckpointError
    from lightning_modules.segmenter import PretrainedWeightsError

    return (
        StreetHazardsDataError,
        CheckpointError,
        PretrainedWeightsError,
        NonFiniteLossError,
        ConfigurationError,
        MisconfigurationException,
        DownloadError,
        OutlierSourceError,
        EvaluationOptionError,
        GuardOptionError,
    )


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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Lightning's version warns whenever args are given while sys.argv has options (as under
        # compare, whose own options are in sys.argv); args always win here.
        self.config = parser.parse_object(args) if isinstance(args, dict | Namespace) else parser.parse_args(args)
        # Given a checkpoint file, LightningCLI next rebuilds the model from the hyperparameters
        # stored in it, class included: check the file, and that it was written by the configured
        # method, before that happens.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            model = config.get("model")
            check_checkpoint_class(ckpt_path, model.get("class_path") if isinstance(model, Namespace) else None)

    def _parse_ckpt_path(self) -> None:
        """Take the model's options from a checkpoint file, upgraded if an older version wrote it.

        ``--ckpt_path last`` is resolved to its file first (Lightning itself would resolve it only
        after building the model from the config), so ``test``, ``predict`` and a resumed ``fit``
        take the model's options from the checkpoint too.
        """
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            directory = _checkpoint_dir_of(config)
            if directory is not None:
                ckpt_path = config.ckpt_path = resolve_ckpt_path("last", directory)
                if ckpt_path is not None:
                    model = config.get("model")
                    check_checkpoint_class(ckpt_path, model.get("class_path") if isinstance(model, Namespace) else None)
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        hparams = upgrade_hyperparameters(hparams)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        # Without a configured logger, Lightning's default TensorBoardLogger numbers its folder
        # version_0, version_1, ... per run, so a requeued job would not find its last.ckpt. Use
        # a fixed folder instead: <default_root_dir>/<method>/run, like the shipped configs.
        config = self.config[self.subcommand] if self.subcommand else self.config
        # The prediction writer saves every output; keeping them all in memory too would take tens
        # of GB on the full test set. (Trainer.predict's arguments join the parser after
        # add_arguments_to_parser runs, so its default cannot be changed there.)
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config.return_predictions = False
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
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        # The checkpoint's weights replace pretrained and init_checkpoint weights: do not load them.
        replaced = initial_weights_from(ckpt_path) if ckpt_path and Path(ckpt_path).is_file() else nullcontext()
        try:
            with replaced:
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


def _checkpoint_dir_of(config: Namespace) -> Path | None:
    """Where a run of ``config`` keeps its checkpoints, as ModelCheckpoint will resolve it (``None``
    when the logger is one whose folder is not known before it is built)."""
    checkpoint = config.get("checkpoint")
    if isinstance(checkpoint, Namespace) and checkpoint.get("dirpath"):
        return Path(checkpoint.dirpath)
    trainer = config.trainer
    logger = trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger in (None, True):  # the fixed folder before_instantiate_classes gives the default logger
        class_path = str(config.model.get("class_path", "")) if config.get("model") else ""
        module_name, _, class_name = class_path.rpartition(".")
        method = getattr(getattr(sys.modules.get(module_name), class_name, None), "method_name", "default")
        return Path(trainer.get("default_root_dir") or "outputs") / method / "run" / "checkpoints"
    if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace):
        args = logger.init_args
        version = args.get("version")
        if args.get("save_dir") and isinstance(version, str):
            return Path(args.save_dir) / (args.get("name") or "lightning_logs") / version / "checkpoints"
    return None


def _with_method_names(args: Sequence[str]) -> list[str]:
    """``--model=<name>`` / ``--model <name>`` with a registered name -> the method's class path."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--model="):
            name = arg.partition("=")[2]
            if name in methods_registry():
                out[i] = f"--model={get_method(name).class_path}"
        elif arg == "--model" and i + 1 < len(out) and out[i + 1] in methods_registry():
            out[i + 1] = get_method(out[i + 1]).class_path
    return out


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> AnomalyCLI:
    discover_methods()
    return AnomalyCLI(
        AnomalySegmentationModule,
        StreetHazardsDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "outputs"},
        args=_with_method_names(sys.argv[1:] if args is None else args),
        run=run,
        auto_configure_optimizers=False,
    )


def _root_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


# ------------------------------------------------------------------------------------------- compare
# ``python main.py compare``: train (or reuse), fit, test and compare every method on one dataset.
# Each method runs from its config through the same CLI as ``main.py fit/test``, so what the
# comparison measures is exactly what a user gets. Results in ``--output_dir``: comparison.json
# (one record per method and per extra score, with bootstrap intervals and the paired differences
# of every two rows), comparison.md (the table, each value with its interval), comparison.png
# (PR/ROC curves, the headline values with their intervals, example heatmaps), and each method's
# run folder. The roster and how methods share
# networks come from the method registry; configs/compare.yaml holds the defaults.
TABLE_KEYS = ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image")
#: The metrics ``compare --seeds`` summarises over seeds and ranks the methods by.
HEADLINE_KEYS = (*TABLE_KEYS, "miou")
#: Column titles of the headline metrics in comparison.md.
COLUMN_TITLES = {
    "aupr": "AUPR",
    "auroc": "AUROC",
    "fpr95": "FPR95",
    "aupr_per_image": "AUPR/img",
    "auroc_per_image": "AUROC/img",
    "fpr95_per_image": "FPR95/img",
    "miou": "mIoU",
}
#: Marks rows whose paired difference from the column's best row has a 95% interval containing 0.
TIED_MARK = "≈"
#: What comparison.md says about the budget columns of its table.
BUDGET_NOTE = (
    " `train s`: the row's own training, + the training of the network it starts from or scores (inherited, "
    "recursively), so rows are compared at their whole cost. `outliers in training`: whether that network (or "
    "one it was initialised from) was trained on pasted outlier objects (`data.injection`)."
)


REPO = Path(__file__).resolve().parent
#: The defaults of ``compare``, loaded before any --config.
DEFAULT_COMPARE_CONFIG = REPO / "configs" / "compare.yaml"


def build_compare_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="main.py compare",
        description="Train (or reuse), fit and test every method on the same data; write one table and one figure.",
        default_config_files=[str(DEFAULT_COMPARE_CONFIG)],
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A comparison config (configs/compare*.yaml).")
    parser.add_argument("--output_dir", type=str, default="outputs/compare", help="Where results and runs go.")
    parser.add_argument(
        "--base_config", type=str, default="configs/demo.yaml", help="Data and trainer config every method runs with."
    )
    parser.add_argument(
        "--method_config_dir",
        type=str,
        default="configs/method/demo",
        help="Folder of the method configs (<name>.yaml), composed on top of base_config.",
    )
    parser.add_argument(
        "--methods",
        type=list[str] | dict[str, str] | str | None,
        default=None,
        help="Method names (configs from method_config_dir), or name -> config, or 'all'; default: every "
        "registered method compared by default.",
    )
    parser.add_argument(
        "--scores_network_of",
        type=dict[str, str] | None,
        default=None,
        help="Method -> the method whose trained network it scores instead of training its own "
        "(default: what each method registered).",
    )
    parser.add_argument(
        "--init_from",
        type=dict[str, str] | None,
        default=None,
        help="Method -> the method whose trained network initializes its training (its init_checkpoint); "
        "default: what each method registered.",
    )
    parser.add_argument(
        "--overrides",
        type=list[str],
        default=[],
        help="Extra CLI arguments for every method, e.g. ['--trainer.max_epochs=2'].",
    )
    parser.add_argument(
        "--reuse_checkpoints", type=bool, default=True, help="Resume or reuse runs found in output_dir."
    )
    parser.add_argument("--num_examples", type=int, default=2, help="Example images in the heatmap rows.")
    parser.add_argument(
        "--bootstrap_samples",
        type=int,
        default=1000,
        help="Resamples of the test images for the 95%% intervals and the paired differences (0: none).",
    )
    parser.add_argument(
        "--bootstrap_seed", type=int, default=0, help="Seed of the resamples (the same for every method)."
    )
    parser.add_argument(
        "--protocols",
        type=list[str],
        default=[],
        help="Protocol presets evaluated besides the default metrics (callbacks.protocol.PRESETS: reference, "
        "densehybrid, mask2anomaly, pooled); one extra table each.",
    )
    parser.add_argument(
        # Not typed int: jsonargparse would reject 1.5 in a multi-line message; compare's own check
        # gives one line naming the option, as for every other bad value of compare.
        "--seeds",
        type=int | float | str,
        default=1,
        help="Train every method this many times, seed i with --seed_everything=<base + i> (base: the base "
        "config's seed_everything), each seed's comparison in <output_dir>/seed_<s>/; over 1, the top-level "
        "files summarise the seeds (mean, standard deviation, whether the ranking held).",
    )
    return parser


def _method_args(configs: Sequence[str], name: str, output_dir: Path, overrides: Sequence[str]) -> list[str]:
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(output_dir), "name": name, "version": "run"},
    }
    return [
        *(arg for config in configs for arg in ("--config", config)),
        f"--trainer.default_root_dir={output_dir / name}",
        f"--trainer.logger={json.dumps(logger)}",
        *overrides,
    ]


def _records_of(name: str, results: dict[str, Any], extra: dict[str, Any], listed: Collection[str] = ()) -> list[dict]:
    """One record per score of a method's test results; extra scores named in ``listed`` are skipped."""
    records = []
    primary = results["primary_score"]
    for score, values in results["scores"].items():
        if score != primary and score in listed:
            continue
        record = {
            "method": name if score == primary else f"{score}@{name}",
            "network": name,
            "score": score,
            **{key: values.get(key, math.nan) for key in TABLE_KEYS},
            **{f"{key}_ci": values[f"{key}_ci"] for key in TABLE_KEYS if f"{key}_ci" in values},
            "miou": results["segmentation"]["miou"],
            **({"miou_ci": results["segmentation"]["miou_ci"]} if "miou_ci" in results["segmentation"] else {}),
            "anomaly_fraction": results["anomaly_fraction"],
            "num_classes": results["num_classes"],
            **extra,
        }
        under = {name: p["scores"][score] for name, p in results.get("protocols", {}).items() if score in p["scores"]}
        if under:
            record["protocols"] = under
        operating = results.get("operating_points")
        if score == primary and operating and operating.get("thresholds"):
            record["operating_points"] = _operating_summary(operating)
        records.append(record)
    return records


def _operating_summary(operating: dict[str, Any]) -> dict[str, Any]:
    """What ``comparison.json``/``.md`` show of a method's operating points, oracle and size strata."""
    rows = {name: operating["operating_points"][name] for name in operating["operating_points"]}
    if operating.get("oracle", {}).get("threshold") is not None:
        rows["oracle"] = operating["oracle"]
    keys = ("sIoU_gt", "PPV", "F1_mean", "F1_25", "F1_50", "F1_75")
    return {
        "points": {
            name: {
                "threshold": row["threshold"],
                **{k: row["pixels"][k] for k in ("tpr", "fpr", "precision", "f1")},
                **{k: row["components"].get(k, math.nan) for k in keys},
            }
            for name, row in rows.items()
        },
        "size_strata": operating.get("size_strata"),
        "component_settings": operating.get("component_settings"),
    }


@torch.no_grad()
def _examples(model: Any, datamodule: Any, count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` test images with anomalies, with the method's primary score."""
    examples: list[dict[str, np.ndarray]] = []
    model.eval()
    for batch in datamodule.test_dataloader():
        batch = prepare_batch(batch)  # the loaders ship uint8: normalize as the Trainer's transfer would
        for i in range(batch["image"].shape[0]):
            if len(examples) >= count:
                return examples
            if not bool((batch["mask"][i] == ANOMALY_INDEX).any()):
                continue
            image = batch["image"][i : i + 1].to(model.device)
            output = model.segment(image)
            score = output.scores[output.primary_score_name]
            if score.shape[-2:] != image.shape[-2:]:
                score = torch.nn.functional.interpolate(score[:, None], size=image.shape[-2:], mode="bilinear")[:, 0]
            mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGE_STD).view(3, 1, 1)
            rgb = ((batch["image"][i] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            examples.append({"image": rgb, "mask": batch["mask"][i].numpy(), "score": score[0].float().cpu().numpy()})
    return examples


def run_method(
    name: str,
    configs: Sequence[str],
    output_dir: Path,
    overrides: Sequence[str],
    reuse: bool,
    init_checkpoint: str | None,
    train: bool = True,
) -> dict[str, Any]:
    """Fit (if ``train``; starting from ``init_checkpoint`` if given) and test one method; return its results."""
    args = _method_args(configs, name, output_dir, overrides)
    if init_checkpoint is not None:
        args.append(f"--model.init_args.init_checkpoint={init_checkpoint}")
    cli = cli_main(args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    evaluation = next(cb for cb in trainer.callbacks if isinstance(cb, AnomalyEvaluation))
    checkpoint_dir = output_dir / name / "run" / "checkpoints"
    last = checkpoint_dir / "last.ckpt"

    train_time = 0.0
    if train:
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if reuse and last.is_file() else None)
        train_time = time.perf_counter() - start
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    test_time = time.perf_counter() - start
    results = evaluation.results["test"]
    evaluation.release("test")  # the histograms (64 MiB per score) are no longer needed
    return {
        "results": results,
        "curves": evaluation.curves.get("test", {}),
        "train_time_s": train_time,
        "test_time_s": test_time,
        "checkpoint": str(last) if last.is_file() else init_checkpoint,
        "metrics_file": str(evaluation.metrics_path) if evaluation.metrics_path else None,
        "model": model,
        "datamodule": datamodule,
    }


def _budget(run: dict[str, Any], feeder: dict[str, Any] | None, trained: bool) -> dict[str, Any]:
    """What a method's network cost and saw in training, counting the network it scores or starts from.

    ``feeder``: the budget of that network (``None`` when it trains from scratch); since a feeder
    runs first and carries its own inherited time, the sum is recursive. ``trained``: the run fit
    its own network (a method that only scores another's inherits that network's training whole).
    """
    inherited = float(feeder["total_train_time_s"]) if feeder else 0.0
    outliers = bool(feeder and feeder["outliers_in_training"])
    if trained:
        outliers = outliers or _pastes_outliers(run["datamodule"])
    return {
        "inherited_train_time_s": inherited,
        "total_train_time_s": float(run["train_time_s"]) + inherited,
        "outliers_in_training": outliers,
    }


def _pastes_outliers(datamodule: Any) -> bool:
    """Whether a datamodule's training split pastes outlier objects (``data.injection``, probability > 0).

    Read from the configured datamodule rather than from the method, so that any method trained on
    injected outliers is marked, and a method whose config turns injection off is not.
    """
    injection = getattr(datamodule, "injection", None)
    if injection is None:
        return False
    if isinstance(injection, dict):  # a datamodule built by hand; the CLI gives an InjectionConfig
        injection = InjectionConfig(**injection)
    return float(injection.probability) > 0


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def format_value(value: Any, interval: Sequence[float | None] | None = None, digits: int = 3) -> str:
    """``0.122 [0.110, 0.135]``: a value and its interval (the value alone without one)."""
    text = _number(value, digits)
    if interval is None or text == "n/a" or any(bound is None or not math.isfinite(bound) for bound in interval):
        return text
    low, high = interval
    return f"{text} [{_number(low, digits)}, {_number(high, digits)}]"


def format_table(records: list[dict[str, Any]], best: dict[str, dict[str, Any]] | None = None) -> str:
    """The results table: each value with its 95% interval where there is one.

    ``best`` (``paired_comparison``'s): the best value of a column is bold, and rows not
    distinguishable from it (the paired interval of their difference contains 0) get ``TIED_MARK``.
    The budget columns: training time as own + inherited (the network a row starts from or scores)
    and whether that network saw pasted outliers; a note under the table says which row reuses what.
    """
    titles = [COLUMN_TITLES[key] for key in HEADLINE_KEYS]
    header = "| method | " + " | ".join(titles) + " | outliers in training | train s (own + inherited) | test s |"
    lines = [header, "|" + "---|" * (len(titles) + 4)]
    best = best or {}

    def cell(record: dict[str, Any], key: str) -> str:
        text = format_value(record[key], record.get(f"{key}_ci"))
        mark = best.get(key)
        if mark is None or text == "n/a":
            return text
        if record["method"] == mark["method"]:
            value, _, rest = text.partition(" ")
            return f"**{value}** {rest}".rstrip()
        if record["method"] in mark["not_distinguishable"]:
            return f"{text} {TIED_MARK}"
        return text

    for r in records:
        cells = [cell(r, key) for key in HEADLINE_KEYS]
        cells += [_yes_no(r.get("outliers_in_training")), _train_time(r), _number(r["test_time_s"], 0)]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + _reuse_note(records)


def _train_time(record: dict[str, Any]) -> str:
    """``95 + 150``: a row's own training seconds plus those of the network it starts from or scores."""
    own, inherited = record["train_time_s"], record.get("inherited_train_time_s") or 0.0
    if isinstance(inherited, (int, float)) and inherited > 0:
        return f"{_number(own, 0)} + {_number(inherited, 0)}"
    return _number(own, 0)


def _yes_no(flag: Any) -> str:
    return "n/a" if flag is None else ("yes" if flag else "no")


def _reuse_note(records: list[dict[str, Any]]) -> str:
    """The line under a table naming the rows that score or start from another method's network."""
    reused = {r["network"]: r["reuses"] for r in records if r.get("reuses")}
    if not reused:
        return ""
    return (
        "\n\nReused networks (their training time is the inherited part): "
        + "; ".join(f"{name} {text}" for name, text in reused.items())
        + "."
    )


def format_protocol_tables(records: list[dict[str, Any]]) -> str:
    """One table per protocol preset: AUPR, AUROC and FPR95 of every record evaluated under it."""
    names = list(dict.fromkeys(name for r in records for name in r.get("protocols", {})))
    parts = []
    for name in names:
        lines = [f"\n\nProtocol preset `{name}` (see `comparison.json` for its card):\n"]
        lines += ["| method | AUPR | AUROC | FPR95 |", "|---|---|---|---|"]
        for r in records:
            values = r.get("protocols", {}).get(name)
            if values is not None:
                cells = [format_value(values[key], values.get(f"{key}_ci")) for key in ("aupr", "auroc", "fpr95")]
                lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "".join(parts)


def format_operating_tables(records: list[dict[str, Any]], galleries: dict[str, list[str]] | None = None) -> str:
    """Operating points, component metrics and size strata of every method (its own score)."""
    with_points = [r for r in records if r.get("operating_points")]
    if not with_points:
        return ""

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "n/a"

    lines = [
        "\n\nOperating points: `tpr95` and `best_f1` are thresholds fixed on the calibration split (validation "
        "images with pasted outliers) before the test split is read; `oracle` is the best component F1 among "
        "the evaluated thresholds on the test split itself (an upper bound, not a result). Pixel rates on test; "
        "components as SegmentMeIfYouCan counts them (sIoU, PPV, F1 over sIoU 0.25..0.75).\n",
        "| method | point | threshold | TPR | FPR | precision | F1 | sIoU_gt | PPV | F1_mean | F1_50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in with_points:
        for name, row in r["operating_points"]["points"].items():
            cells = [f"{row['threshold']:.4g}"] + [
                fmt(row[k]) for k in ("tpr", "fpr", "precision", "f1", "sIoU_gt", "PPV", "F1_mean", "F1_50")
            ]
            lines.append(f"| {r['method']} | {name} | " + " | ".join(cells) + " |")
    strata = [(r["method"], r["operating_points"].get("size_strata")) for r in with_points]
    strata = [(m, s) for m, s in strata if s]
    if strata:
        lines += [
            "\n\nSize strata: anomaly components by area (share of the image), found = sIoU >= 0.5 at the "
            "operating point; AUPR of the bin's pixels against all negatives.\n",
            "| method | area | components | found tpr95 | pixel TPR tpr95 | found best_f1 | pixel TPR best_f1 | AUPR |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, stratum in strata:
            for b in stratum["bins"]:
                low, high = b["area_fraction"]
                area = (
                    f"{100 * low:.2g}%-{100 * high:.2g}%"
                    if high is not None and math.isfinite(high)
                    else f">= {100 * low:.2g}%"
                )
                cells = [str(b["components"])]
                for t in range(len(stratum["thresholds"])):
                    cells += [fmt(b["component_recall"][t]), fmt(b["pixel_tpr"][t])]
                cells.append(fmt(b["aupr"]))
                lines.append(f"| {method} | {area} | " + " | ".join(cells) + " |")
    if galleries:
        lines.append("\n\nFailure galleries (largest false-positive areas and missed components at `tpr95`):\n")
        for method, paths in galleries.items():
            lines.append(f"- {method}: " + ", ".join(f"`{path}`" for path in paths))
    return "\n".join(lines)


def _plot_size_strata(ax: Any, records: list[dict[str, Any]]) -> None:
    """Share of anomaly components found at ``tpr95`` per size bin, one bar group per bin."""
    strata = [(r["method"], r["operating_points"]["size_strata"]) for r in records if r.get("operating_points")]
    strata = [(m, s) for m, s in strata if s and any(b["components"] for b in s["bins"])]
    if not strata:
        ax.axis("off")
        return
    bins = strata[0][1]["bins"]
    x = np.arange(len(bins))
    width = 0.8 / len(strata)
    for k, (method, stratum) in enumerate(strata):
        recall = [
            b["component_recall"][0] if b["component_recall"][0] is not None else math.nan for b in stratum["bins"]
        ]
        ax.bar(x - 0.4 + (k + 0.5) * width, recall, width, label=method)
    labels = []
    for b in bins:
        low, high = b["area_fraction"]
        labels.append(f"<{100 * high:.2g}%" if high is not None and math.isfinite(high) else f">={100 * low:.2g}%")
    ax.set_xticks(x, [f"{label}\n{b['components']}" for label, b in zip(labels, bins, strict=True)], fontsize=6)
    ax.set(title="Components found at tpr95 by area", ylabel="component recall (sIoU >= 0.5)", ylim=(0, 1.02))
    ax.legend(fontsize=6)


def plot_comparison(
    records: list[dict[str, Any]],
    curves: dict[str, dict[str, Any]],
    examples: dict[str, list[dict]],
    path: Path,
    best: dict[str, dict[str, Any]] | None = None,
) -> None:
    """PR and ROC curves of every record, their headline values with 95% intervals, then example heatmaps.

    The interval row shows AUPR, AUROC and FPR95 (pooled) of every record as a point with its
    bootstrap interval as a bar (a point alone where there is none); the column's best value is
    drawn in red and rows not distinguishable from it (``best``'s ``not_distinguishable``) hollow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in examples if examples[m]]
    shown = examples[methods[0]] if methods else []  # every method scores the same test images
    columns = max(3, len(shown))  # PR, ROC and the size-strata panel on top
    # Curves on top, the intervals under them, then the inputs, their ground truth and one row of
    # heatmaps per method; each example image keeps its column, so a method's heatmap sits under
    # the image it scores.
    summary_height = max(1.2, 0.13 * len(records))
    heights = [1.6, summary_height] + [1.0] * (2 + len(methods)) if shown else [1.6, summary_height]
    fig, axes = plt.subplots(
        len(heights), columns, figsize=(4.0 * columns, 2.1 * sum(heights)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    pr_ax, roc_ax = axes[0, 0], axes[0, 1]
    for ax in axes[1]:
        ax.remove()
    _plot_intervals(fig, axes[0, 0].get_gridspec()[1, :], records, best or {})
    axes = np.concatenate([axes[:1], axes[2:]])  # the rows below keep their former indices
    for record in records:
        curve = curves.get(record["method"])
        if not curve:
            continue
        style = "-" if record["method"] == record["network"] else ":"
        pr_ax.plot(curve["recall"], curve["precision"], style, label=f"{record['method']} ({record['aupr']:.3f})")
        roc_ax.plot(curve["fpr"], curve["tpr"], style, label=f"{record['method']} ({record['auroc']:.3f})")
    fraction = records[0]["anomaly_fraction"] if records else math.nan
    if math.isfinite(fraction):
        pr_ax.axhline(fraction, color="grey", lw=0.8, ls="--", label=f"chance ({fraction:.3f})")
    pr_ax.set(title="Precision-recall (pooled)", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    roc_ax.set(title="ROC (pooled)", xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1))
    roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    pr_ax.legend(fontsize=6)
    roc_ax.legend(fontsize=6)
    _plot_size_strata(axes[0, 2], records)
    for ax in axes[0, 3:]:
        ax.axis("off")
    for col in range(columns):
        for row in range(1, axes.shape[0]):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if col >= len(shown):
                axes[row, col].axis("off")
    for col, example in enumerate(shown):
        anomaly = example["mask"] == ANOMALY_INDEX
        axes[1, col].imshow(example["image"])
        axes[1, col].set_title(f"test image {col + 1}", fontsize=8)
        axes[2, col].imshow(colorize(example["mask"]))
        axes[2, col].set_title("ground truth (anomaly cyan)", fontsize=8)
        for row, method in enumerate(methods, start=3):
            # fixed scale per method: the 1st-99th percentile over its examples
            values = np.concatenate([e["score"].ravel() for e in examples[method]])
            lo, hi = np.percentile(values, [1, 99])
            ax = axes[row, col]
            ax.imshow(examples[method][col]["score"], cmap="inferno", vmin=lo, vmax=hi)
            if anomaly.any():  # outline of the true anomaly, to judge the heatmap against
                ax.contour(anomaly.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(f"{method} score (cyan: true anomaly)", fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def _plot_intervals(fig: Any, cell: Any, records: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> None:
    """Point summaries with 95% interval bars: AUPR, AUROC and FPR95 of every record, one panel each."""
    panels = cell.subgridspec(1, 3, wspace=0.08)
    rows = np.arange(len(records))[::-1]
    for column, (key, title) in enumerate((("aupr", "AUPR"), ("auroc", "AUROC"), ("fpr95", "FPR95"))):
        ax = fig.add_subplot(panels[0, column])
        mark = best.get(key, {})
        for y, record in zip(rows, records, strict=True):
            value = record.get(key)
            if value is None or not math.isfinite(value):
                continue
            interval = record.get(f"{key}_ci")
            if interval is not None and all(b is not None and math.isfinite(b) for b in interval):
                ax.plot(interval, [y, y], color="tab:blue", lw=1.2)
            is_best = record["method"] == mark.get("method")
            tied = record["method"] in mark.get("not_distinguishable", ())
            ax.plot(
                [value], [y], "o", ms=3.5,
                color="tab:red" if is_best else "tab:blue", markerfacecolor="white" if tied else None,
            )  # fmt: skip
        ax.set_yticks(rows)
        ax.set_yticklabels([r["method"] for r in records] if column == 0 else [], fontsize=6)
        ax.set_ylim(-0.7, len(records) - 0.3)
        ax.tick_params(axis="x", labelsize=6)
        ax.grid(axis="x", lw=0.3)
        lower = ", lower is better" if key == "fpr95" else ""
        ax.set_title(f"{title}{lower} [95% interval]", fontsize=7)
        if column == 1 and best:
            ax.set_xlabel("red: best row; hollow: not distinguishable from it (paired bootstrap)", fontsize=6)


def compare(
    output_dir: str,
    methods: Sequence[str] | dict[str, str] | str | None = None,
    scores_network_of: dict[str, str] | None = None,
    overrides: Sequence[str] = (),
    reuse_checkpoints: bool = True,
    num_examples: int = 2,
    init_from: dict[str, str] | None = None,
    base_config: str | None = "configs/demo.yaml",
    method_config_dir: str = "configs/method/demo",
    protocols: Sequence[str] = (),
    bootstrap_samples: int = 1000,
    bootstrap_seed: int = 0,
    seeds: int = 1,
) -> list[dict[str, Any]]:
    """Run the comparison and write its three files; return the records.

    ``seeds``: how many times every method is trained. Over 1, seed ``s = base + i``
    (``--seed_everything``; ``base``: the last ``--seed_everything`` of ``overrides``, else the
    base config's, else 0) runs the whole comparison in ``output_dir/seed_<s>/`` (each method's
    network from that seed's run, reused and initialising networks alike), and the top-level
    ``comparison.json`` / ``comparison.md`` summarise the seeds (:func:`seed_summary`); the
    records of every seed are returned, each with its ``seed``. ``data.seed`` (shuffling,
    augmentation, pasted outliers, the calibration split) is not changed, so the seeds differ in
    weight initialisation and dropout, and every seed is tested on the same images.

    ``bootstrap_samples`` / ``bootstrap_seed``: every method's test run resamples the test images
    that many times with that seed (``--evaluation.bootstrap_*``), so each value gets a 95%
    interval; ``comparison.json`` then holds, for every two rows and every headline metric, the
    difference, its interval from the *same* resamples of both and whether it excludes zero, and
    ``comparison.md`` marks the rows that are not distinguishable from each column's best.

    ``protocols``: presets of :data:`callbacks.protocol.PRESETS` evaluated too (the method's own
    score under each); every record then holds them under ``protocols`` and ``comparison.md``
    has one more table per preset.

    ``methods``: names (their configs are ``method_config_dir/<name>.yaml``) or name -> config;
    ``None``: every registered method compared by default; ``"all"``: every registered method.
    Each method runs with ``base_config`` (data and trainer) and its own config on top.
    ``scores_network_of`` / ``init_from`` default to what the methods registered, restricted to
    the methods run.
    """
    seeds = check_seeds(seeds)
    settings = {
        "methods": methods,
        "scores_network_of": scores_network_of,
        "reuse_checkpoints": reuse_checkpoints,
        "num_examples": num_examples,
        "init_from": init_from,
        "base_config": base_config,
        "method_config_dir": method_config_dir,
        "protocols": protocols,
        "bootstrap_samples": bootstrap_samples,
        "bootstrap_seed": bootstrap_seed,
    }
    if seeds == 1:  # exactly the single comparison it always was: no seed folder, no seed override
        return _compare_once(output_dir, overrides=overrides, **settings)["records"]
    out = Path(output_dir)
    base = _seed_base(base_config, overrides)
    values = [base + i for i in range(seeds)]
    documents: dict[int, dict[str, Any]] = {}
    for i, seed in enumerate(values):
        print(f"compare: seed {seed} ({i + 1} of {seeds}) -> {out / f'seed_{seed}'}")
        seeded = [*overrides, f"--seed_everything={seed}"]
        documents[seed] = _compare_once(str(out / f"seed_{seed}"), overrides=seeded, **settings)
    block = seed_summary({seed: document["records"] for seed, document in documents.items()})
    block["folders"] = [f"seed_{seed}" for seed in values]
    first = documents[values[0]]
    atomic_write_json(
        out / "comparison.json",
        {
            "seeds": block,
            "methods": first["methods"],
            "base_config": base_config,
            "scores_network_of": first["scores_network_of"],
            "init_from": first["init_from"],
            "protocol": _common_protocol({str(seed): document["protocol"] for seed, document in documents.items()}),
        },
    )
    table = format_seed_table(block)
    atomic_write_text(
        out / "comparison.md",
        f"# Method comparison over {seeds} training seeds\n\n"
        f"Every method trained {seeds} times, with `--seed_everything` {', '.join(map(str, values))} "
        "(weight initialisation and dropout; the data order, augmentation and pasted outliers follow "
        "`data.seed`, unchanged), each seed's whole comparison (reused and initialising networks from "
        "the same seed) in `seed_<s>/comparison.md`, on the same test images. `mean ± std`: over the "
        "seeds, sample standard deviation (ddof=1); the per-seed values are in `comparison.json`, key "
        "`seeds`. Train time: the mean seconds per seed, own + inherited (the network a row starts "
        "from or scores).\n\n" + table + "\n",
    )
    print(table)
    print(f"compare: wrote {out / 'comparison.json'}, {out / 'comparison.md'} and one folder per seed")
    return [{**record, "seed": seed} for seed, document in documents.items() for record in document["records"]]


def check_seeds(value: Any) -> int:
    """``value`` as an int if it is a valid number of training seeds (at least 1), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"compare: --seeds (how many times every method is trained, each with its own seed) must be an "
            f"integer >= 1, got {value!r}"
        )
    return int(value)


def _seed_base(base_config: str | None, overrides: Sequence[str]) -> int:
    """The seed ``compare --seeds`` counts up from: the last ``--seed_everything`` of the overrides
    (they are given after the configs, so they win), else the base config's, else 0 (a random or
    absent seed gives nothing to count from)."""
    value: Any = None
    if base_config is not None and Path(base_config).is_file():
        loaded = yaml.safe_load(Path(base_config).read_text())
        value = loaded.get("seed_everything") if isinstance(loaded, dict) else None
    for i, arg in enumerate(overrides):
        if arg.startswith("--seed_everything="):
            value = yaml.safe_load(arg.partition("=")[2])
        elif arg == "--seed_everything" and i + 1 < len(overrides):
            value = yaml.safe_load(overrides[i + 1])
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def _compare_once(
    output_dir: str,
    methods: Sequence[str] | dict[str, str] | str | None,
    scores_network_of: dict[str, str] | None,
    overrides: Sequence[str],
    reuse_checkpoints: bool,
    num_examples: int,
    init_from: dict[str, str] | None,
    base_config: str | None,
    method_config_dir: str,
    protocols: Sequence[str],
    bootstrap_samples: int,
    bootstrap_seed: int,
) -> dict[str, Any]:
    """One comparison (one training seed) into ``output_dir``; the content of its comparison.json."""
    try:
        bootstrap_samples = check_bootstrap_samples(bootstrap_samples)
        bootstrap_seed = check_bootstrap_seed(bootstrap_seed)
    except ValueError as error:
        raise ValueError(f"compare: {error}") from None
    overrides = [
        *overrides,
        f"--evaluation.bootstrap_samples={bootstrap_samples}",
        f"--evaluation.bootstrap_seed={bootstrap_seed}",
    ]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    discover_methods()
    if protocols:
        resolve_presets(protocols, CLASS_NAMES)  # an unknown preset fails before any training
        overrides = [*overrides, f"--evaluation.protocols={json.dumps(list(protocols))}"]
    if methods == "all" or methods == ["all"]:
        methods = list(methods_registry())
    if methods is None or not isinstance(methods, dict):
        names = roster(methods)
        configs = {name: str(Path(method_config_dir) / f"{name}.yaml") for name in names}
    else:
        names = roster(methods)
        configs = dict(methods)
    for name in names:
        if not Path(configs[name]).is_file():
            raise FileNotFoundError(f"compare: config of method '{name}' not found: {configs[name]}")
    if base_config is not None and not Path(base_config).is_file():
        raise FileNotFoundError(f"compare: base_config not found: {base_config}")
    registry = methods_registry()
    if scores_network_of is None:
        scores_network_of = {n: e.scores_network_of for n, e in registry.items() if n in names and e.scores_network_of}
    if init_from is None:
        init_from = {n: e.init_from for n, e in registry.items() if n in names and e.init_from}
    scores_network_of, init_from = dict(scores_network_of), dict(init_from)
    for name, source in scores_network_of.items():
        if name in names and source not in names:
            raise ValueError(f"compare: '{name}' reuses the network of '{source}', which is not in --methods")
    for name, source in init_from.items():
        if name in scores_network_of:
            raise ValueError(f"compare: '{name}' is in both --scores_network_of and --init_from; pick one")
        if name in names and (source not in names or source in init_from or source in scores_network_of):
            raise ValueError(
                f"compare: '{name}' starts from the network of '{source}', which is not a method trained "
                f"from scratch in --methods (--init_from '{{}}' trains '{name}' from scratch)"
            )
    # methods that provide a network for others run first
    order = sorted(names, key=lambda m: m in scores_network_of or m in init_from)
    base = [base_config] if base_config is not None else []
    records: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    examples: dict[str, list[dict]] = {}
    runs: dict[str, dict[str, Any]] = {}
    budgets: dict[str, dict[str, Any]] = {}
    for name in order:
        source = scores_network_of.get(name)
        start_from = init_from.get(name)
        init_checkpoint = runs[source or start_from]["checkpoint"] if (source or start_from) else None
        reuses = f"scores the network of {source}" if source else ""
        reuses = f"starts from the network of {start_from}" if start_from else reuses
        print(f"compare: {name} ({configs[name]})" + (f", {reuses}" if reuses else ""))
        method_overrides = list(overrides)
        if source:  # the network's own scores (its baselines) are that row's already: not evaluated twice
            evaluated = sorted(runs[source]["results"]["scores"])
            method_overrides.append(f"--evaluation.exclude_scores={json.dumps(evaluated)}")
        run = run_method(
            name,
            [*base, configs[name]],
            out,
            method_overrides,
            reuse_checkpoints,
            init_checkpoint,
            train=source is None,
        )
        runs[name] = run
        budgets[name] = _budget(run, budgets.get(source or start_from), trained=source is None)
        extra = {
            "train_time_s": run["train_time_s"],
            "test_time_s": run["test_time_s"],
            "checkpoint": run["checkpoint"],
            "metrics_file": run["metrics_file"],
            "config": configs[name],
            "initialized_from": start_from,
            **budgets[name],
            "reuses": reuses,
        }
        # Baselines of a network (MSP, ...) are listed once, with the method that trained it;
        # scores only this method computes (e.g. FRE's unsmoothed fre_raw) are listed with it.
        listed = runs[source]["results"]["scores"] if source else ()
        method_records = _records_of(name, run["results"], extra, listed)
        records.extend(method_records)
        for record in method_records:
            if record["score"] in run["curves"]:
                curves[record["method"]] = run["curves"][record["score"]]
        examples[name] = _examples(run["model"], run["datamodule"], num_examples)

    rank = {name: i for i, name in enumerate(names)}
    primary = sorted((r for r in records if r["method"] == r["network"]), key=lambda r: rank[r["network"]])
    records = primary + [r for r in records if r["method"] != r["network"]]
    bootstrap, comparison = _paired_differences(records, runs, bootstrap_samples, bootstrap_seed)
    best = comparison["best"] if comparison else None
    document = {
        "records": records,
        "methods": configs,
        "base_config": base_config,
        "scores_network_of": scores_network_of,
        "init_from": init_from,
        "protocol": _common_protocol({name: runs[name]["results"].get("protocol") for name in names}),
        "bootstrap": bootstrap,
        "best": best,
        "pairs": comparison["pairs"] if comparison else None,
    }
    atomic_write_json(out / "comparison.json", document)
    galleries = {
        name: sorted(str(p) for p in (out / name / "run" / "images" / "test" / "gallery").glob("*.png"))
        for name in names
    }
    galleries = {name: paths for name, paths in galleries.items() if paths}
    table = format_table(records, best) + format_protocol_tables(records) + format_operating_tables(records, galleries)
    fraction = records[0]["anomaly_fraction"] if records else math.nan
    atomic_write_text(
        out / "comparison.md",
        f"# Method comparison\n\nTest split, anomaly pixel fraction {fraction:.4f}; "
        f"{records[0]['num_classes'] if records else '?'} known classes. Pooled metrics over all test pixels; "
        "`/img`: mean over test images with anomalies (StreetHazards reference protocol). "
        "FPR95: the first ROC point reaching 95% TPR (pooled), the threshold whose recall is closest "
        "to 0.95 (`/img`, the reference code's rule). `score@network`: another score of that network. "
        "Protocol card: `comparison.json`, key `protocol`."
        + _intervals_note(bootstrap)
        + BUDGET_NOTE
        + "\n\n"
        + table
        + "\n",
    )
    plot_comparison(records, curves, examples, out / "comparison.png", best)
    print(table)
    print(f"compare: wrote {out / 'comparison.json'}, {out / 'comparison.md'}, {out / 'comparison.png'}")
    return document


def _paired_differences(
    records: list[dict[str, Any]], runs: dict[str, dict[str, Any]], samples: int, seed: int
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The ``bootstrap`` block of comparison.json and ``paired_comparison`` over every record (or ``None``).

    Each record's per-image summaries come from the file its test run wrote beside metrics.json;
    all records are resampled with the same image draws. Without the bootstrap, or when the
    methods were not scored on the same named images, there are no pairs (the block says why).
    """
    if samples == 0:
        return None, None
    block: dict[str, Any] = {
        "samples": samples,
        "seed": seed,
        "level": BOOTSTRAP_LEVEL,
        "interval": "percentile, over test images resampled with replacement; the same resamples for every row",
    }
    summaries: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[str, float]] = {}
    loaded: dict[str, dict[str, Any]] = {}
    try:
        for record in records:
            run = runs[record["network"]]
            name = run["results"].get("bootstrap", {}).get("image_summaries")
            if name is None or run["metrics_file"] is None:
                raise ValueError(f"'{record['method']}' wrote no per-image summaries")
            path = Path(run["metrics_file"]).parent / name
            if record["network"] not in loaded:
                loaded[record["network"]] = load_image_summaries(path)
            data = loaded[record["network"]]
            if record["score"] not in data["scores"]:
                raise ValueError(f"{path} holds no summaries of the score '{record['score']}'")
            summary = dict(data["scores"][record["score"]])
            if data["segmentation"] is not None:
                summary["confusion_image_id"] = data["segmentation"]["image_id"]
                summary["confusion"] = data["segmentation"]["confusion"]
            summaries[record["method"]] = summary
            values[record["method"]] = {key: float(_finite_or_nan(record.get(key))) for key in PAIRED_KEYS}
        comparison = paired_comparison(summaries, values, samples, seed)
    except (OSError, ValueError, KeyError) as error:
        print(f"compare: no paired differences: {error}")
        block["pairs_unavailable"] = str(error)
        return block, None
    block["num_images"] = comparison["num_images"]
    return block, comparison


def seed_summary(records_by_seed: dict[int, Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """The ``seeds`` block of comparison.json: each row's headline metrics over the training seeds,
    and whether the ranking of the methods held in every seed.

    ``records_by_seed``: seed -> that seed's records (rows keyed by ``method``). Per row and metric
    of :data:`HEADLINE_KEYS`: ``values`` (one per seed, in seed order; NaN where a seed has none),
    their ``mean`` and sample standard deviation ``std`` (ddof=1; NaN when a value is missing or
    there is one seed). The training times get the same summary. Per metric, ``rankings``: the
    order of the primary rows (``method == network``, the methods' own scores) in every seed, best
    first (lower is better for the FPR95 keys), as groups of equal values in table order, with the
    rows that have no value ``unranked``; ``held`` is whether every seed gave the same order.
    """
    seeds = sorted(records_by_seed)
    by_seed = [{r["method"]: r for r in records_by_seed[seed]} for seed in seeds]
    methods = list(dict.fromkeys(method for rows in by_seed for method in rows))
    times = ("train_time_s", "inherited_train_time_s", "total_train_time_s")
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        first = next(seed_rows[method] for seed_rows in by_seed if method in seed_rows)
        row: dict[str, Any] = {
            "network": first["network"],
            "outliers_in_training": first.get("outliers_in_training"),
            "reuses": first.get("reuses", ""),
        }
        for key in (*HEADLINE_KEYS, *times):
            values = [_finite_or_nan(seed_rows.get(method, {}).get(key)) for seed_rows in by_seed]
            row[key] = {**_mean_std(values), "values": values}
        rows[method] = row
    primary = [method for method in methods if rows[method]["network"] == method]
    rankings = {}
    for key in HEADLINE_KEYS:
        higher = key not in LOWER_IS_BETTER
        orders, unranked = [], []
        for i in range(len(seeds)):
            groups, missing = _ranking({method: rows[method][key]["values"][i] for method in primary}, higher)
            orders.append(groups)
            unranked.append(missing)
        held = all(order == orders[0] for order in orders) and all(m == unranked[0] for m in unranked)
        rankings[key] = {"higher_is_better": higher, "held": held, "orders": orders, "unranked": unranked}
    return {
        "values": seeds,
        "varies": "seed_everything (weight initialisation, dropout); data.seed unchanged",
        "std": "sample standard deviation over the seeds (ddof=1)",
        "rows": rows,
        "primary": primary,
        "rankings": rankings,
    }


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1); NaN where a value is missing or there is one."""
    finite = len(values) > 0 and all(math.isfinite(v) for v in values)
    mean = float(np.mean(values)) if finite else math.nan
    std = float(np.std(values, ddof=1)) if finite and len(values) > 1 else math.nan
    return {"mean": mean, "std": std}


def _ranking(values: dict[str, float], higher_is_better: bool) -> tuple[list[list[str]], list[str]]:
    """Rows best first as groups of equal values (table order inside a group), and the rows without a value.

    Grouping ties keeps the order well defined: rows that share a network (e.g. two scores of one
    segmenter) share its mIoU, and no tie-breaking rule should turn that into a ranking.
    """
    ranked = sorted(
        ((method, value) for method, value in values.items() if math.isfinite(value)),
        key=lambda item: -item[1] if higher_is_better else item[1],
    )
    groups: list[list[str]] = []
    previous = math.nan
    for method, value in ranked:
        if groups and value == previous:
            groups[-1].append(method)
        else:
            groups.append([method])
        previous = value
    return groups, [method for method, value in values.items() if not math.isfinite(value)]


def _order_text(groups: list[list[str]], unranked: list[str]) -> str:
    """``a > b = c`` (``; n/a: d`` for rows without a value)."""
    text = " > ".join(" = ".join(group) for group in groups) or "none"
    return text + (f"; n/a: {', '.join(unranked)}" if unranked else "")


def format_seed_table(block: dict[str, Any]) -> str:
    """comparison.md of ``compare --seeds``: ``mean ± std`` per row and metric, then the rankings."""
    titles = [COLUMN_TITLES[key] for key in HEADLINE_KEYS]
    header = "| method | " + " | ".join(titles) + " | outliers in training | train s (own + inherited) |"
    lines = [header, "|" + "---|" * (len(titles) + 3)]
    for method, row in block["rows"].items():
        cells = []
        for key in HEADLINE_KEYS:
            mean, std = row[key]["mean"], row[key]["std"]
            cells.append(_number(mean) if not math.isfinite(std) else f"{_number(mean)} ± {_number(std)}")
        own, inherited = row["train_time_s"]["mean"], row["inherited_train_time_s"]["mean"]
        times = {"train_time_s": own, "inherited_train_time_s": inherited}
        cells += [_yes_no(row["outliers_in_training"]), _train_time(times)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines[-1] += _reuse_note(list(block["rows"].values()))
    seeds = block["values"]
    lines.append(
        "\nRanking of the methods' own scores (best first; `=`: equal values), per metric: the same in every "
        "seed, or each order with the seeds that gave it.\n"
    )
    for key in HEADLINE_KEYS:
        ranking = block["rankings"][key]
        title = COLUMN_TITLES[key] + ("" if ranking["higher_is_better"] else " (lower is better)")
        texts = [_order_text(o, u) for o, u in zip(ranking["orders"], ranking["unranked"], strict=True)]
        if ranking["held"]:
            lines.append(f"- {title}: held in every seed: {texts[0] if texts else 'none'}")
            continue
        occurred = {}
        for seed, text in zip(seeds, texts, strict=True):
            occurred.setdefault(text, []).append(str(seed))
        orders = "; ".join(f"{text} (seed{'s' if len(s) > 1 else ''} {', '.join(s)})" for text, s in occurred.items())
        lines.append(f"- {title}: **changed** between seeds: {orders}")
    return "\n".join(lines)


def _finite_or_nan(value: Any) -> float:
    """A record's value as a float (NaN where it is missing or not a number)."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def _intervals_note(bootstrap: dict[str, Any] | None) -> str:
    """The sentence of comparison.md that explains the intervals and the marks."""
    if bootstrap is None:
        return ""
    text = (
        f" `[low, high]`: 95% percentile interval from {bootstrap['samples']} resamples of the test images "
        f"(seed {bootstrap['seed']})."
    )
    if "pairs_unavailable" in bootstrap:
        return text + f" No paired differences: {bootstrap['pairs_unavailable']}."
    return text + (
        " **Bold**: the best value of its column. "
        f"{TIED_MARK}: not distinguishable from that best row (the 95% interval of their paired difference, "
        "bootstrapped with the same resampled images for both, contains 0); unmarked rows differ from it. "
        "Every pair's difference is in `comparison.json`, key `pairs`."
    )


def _common_protocol(cards: dict[str, Any]) -> dict[str, Any]:
    """The protocol card every method's results share, or every card when they differ."""
    values = list(cards.values())
    if values and all(card == values[0] for card in values):
        return values[0]
    return {"differs_between_methods": cards}


def compare_main(argv: Sequence[str]) -> int:
    cfg = build_compare_parser().parse_args(list(argv))
    compare(
        cfg.output_dir,
        cfg.methods,
        cfg.scores_network_of,
        list(cfg.overrides),
        cfg.reuse_checkpoints,
        cfg.num_examples,
        cfg.init_from,
        cfg.base_config,
        cfg.method_config_dir,
        cfg.protocols,
        cfg.bootstrap_samples,
        cfg.bootstrap_seed,
        cfg.seeds,
    )
    return 0


USAGE = """usage: main.py {fit,validate,test,predict,compare,download} [options]

  fit, validate, test, predict   LightningCLI subcommands: main.py <subcommand> --config configs/<method>.yaml
  compare                        train, fit and test every method; one table and one figure (no options:
                                 the embedded synthetic dataset, about 8 minutes on 2 CPU cores)
  download                       fetch and unpack StreetHazards: main.py download --root DIR

main.py <subcommand> --help lists a subcommand's options."""


def main(argv: Sequence[str] | None = None) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    # LightningCLI reads sys.argv itself when given None (and warns when given both).
    cli_args = None if argv is None else list(argv)
    if argv is None:  # the process's own command: it ends when this returns
        PreemptionCheckpoint.ignore_signals_after_stop = True
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
