"""Every GPU figure and every crash in one run: what ``benchmarks/gpu_check.sh`` executes.

A person with one GPU for ten minutes runs ``bash benchmarks/gpu_check.sh`` and gets, in one
summary at the end (also ``<out>/summary.md`` and ``<out>/summary.json``):

1. ``environment``: GPU, CUDA, torch, Lightning, bf16 support, CPUs; every package the project
   imports is importable (else: how to bring the wheels, see ``gpu_check.sh``).
2. ``data``: a synthetic set in the released layout at 720x1280 (64 training, 8 validation, 64
   test images) and a predict folder with images of two sizes, written with every CPU.
3. ``e2e <method>``, every registered method, each in its own process: the real-data configs
   (``configs/streethazards.yaml`` + ``configs/method/<method>.yaml`` + ``configs/trainer/gpu.yaml``,
   random init, nothing downloaded) through ``main.py`` ``fit`` (a few steps, validation, the
   post-hoc fit at the test size, ``last.ckpt``), ``test --ckpt_path last`` and ``predict
   --ckpt_path last``; each stage profiled per component (Lightning's hooks, the device
   synchronized around each, ``SyncedProfiler``) with every host synchronization named by file
   and line (``torch.cuda.set_sync_debug_mode('warn')``, ``HostSyncRecorder``).
4. ``training``: ``training_throughput.py``, compute only (fp32 with TF32 off, TF32, bf16 +
   channels_last) beside ``main.py fit`` end to end over the prepared folder.
5. ``test throughput``: ``test_throughput.py`` over the prepared folder, every method.
6. ``precision``: ``precision_scoring_check.py`` on the SML and dual-decoder checkpoints of step 3:
   one checkpoint scored in fp32 and in bf16.
7. ``loader``: ``loader_throughput.py`` before/after/cached at the real-data sizes with this
   node's CPUs.

Steps run in that order, each in a subprocess with its own time limit, under one overall budget
(``--budget``, 540 s by default: nine minutes); a step that would not fit is skipped and listed
as such. A failed step does not stop the others. ``--dry-run`` runs the same steps on the CPU at
the smallest sizes (64x96 images, ResNet-18, one batch per stage, SML alone end to end and in
the throughput figures), in this process, so CI keeps the script working (``tests/
test_benchmarks.py``); its figures say nothing about a GPU. ``--methods`` chooses the methods run
end to end (e.g. to rerun one that failed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.profilers import SimpleProfiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SYNC_MESSAGE = "called a synchronizing CUDA operation"
#: Packages the project imports beyond torch and Lightning (``gpu_check.sh`` installs them from wheels/).
REQUIRED_IMPORTS = (
    "torchvision", "torchmetrics", "segmentation_models_pytorch", "timm", "tensorboard", "jsonargparse",
    "albumentations", "cv2", "matplotlib", "scipy", "yaml", "PIL", "numpy",
)  # fmt: skip
PROJECT_DIRS = ("lightning_modules", "callbacks", "datamodules", "benchmarks")


# ------------------------------------------------------------------------------------------------
# Profiling and host syncs
# ------------------------------------------------------------------------------------------------
def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class SyncedProfiler(SimpleProfiler):
    """Lightning's ``SimpleProfiler`` with the device synchronized when each action starts and
    stops, so an action's time is its own GPU work rather than whatever was queued before it (at
    the cost of one synchronization per hook: use it to see where time goes, not for throughput)."""

    def start(self, action_name: str) -> None:
        _synchronize()
        super().start(action_name)

    def stop(self, action_name: str) -> None:
        _synchronize()
        super().stop(action_name)


def _short(filename: str) -> str:
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:  # an installed package, also when the venv sits in the repository
        return "/".join(parts[parts.index("site-packages") + 1 :])
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        pass
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return filename


def sync_site(stack: Sequence[traceback.FrameSummary]) -> str:
    """Where a synchronizing call came from: the innermost frame, and the innermost frame of this
    project's code below ``main.py`` (a method, a callback, the datamodule) when that is another.

    ``stack`` runs outermost first, as ``traceback.extract_stack`` gives it, and ends at the line
    that called the synchronizing operation.
    """
    frames = [f for f in stack if not f.filename.endswith(("warnings.py", "gpu_check.py"))]
    if not frames:
        return "?"
    innermost = frames[-1]
    site = f"{_short(innermost.filename)}:{innermost.lineno}"
    for frame in reversed(frames):
        short = _short(frame.filename)
        if short.split("/")[0] in PROJECT_DIRS and not short.startswith("benchmarks/gpu_check"):
            if frame is not innermost:
                site += f" <- {short}:{frame.lineno} ({frame.name})"
            break
    return site


class HostSyncRecorder:
    """Counts the host synchronizations ``torch.cuda.set_sync_debug_mode('warn')`` reports, by
    ``sync_site``, per stage. Does nothing without CUDA."""

    def __init__(self) -> None:
        self.sites: dict[str, Counter[str]] = {}
        self._stage: str | None = None
        self._previous_show: Callable[..., None] | None = None

    def _show(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
        if SYNC_MESSAGE in str(message) and self._stage is not None:
            self.record(traceback.extract_stack()[:-1])
            return
        assert self._previous_show is not None
        self._previous_show(message, category, filename, lineno, file, line)

    def record(self, stack: Sequence[traceback.FrameSummary]) -> None:
        assert self._stage is not None
        self.sites.setdefault(self._stage, Counter())[sync_site(stack)] += 1

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sites.setdefault(name, Counter())
        if not torch.cuda.is_available():
            yield
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=f".*{SYNC_MESSAGE}.*")
            self._previous_show, warnings.showwarning = warnings.showwarning, self._show
            self._stage = name
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self._stage = None


def profile_summary(profiler: Any, top: int = 12) -> list[dict[str, Any]]:
    """The actions with the most total time: name, calls, mean ms, total s."""
    durations = getattr(profiler, "recorded_durations", None) or {}
    rows = [
        {"action": name, "calls": len(d), "mean_ms": 1e3 * math.fsum(d) / len(d), "total_s": math.fsum(d)}
        for name, d in durations.items()
        if d
    ]
    rows.sort(key=lambda r: r["total_s"], reverse=True)
    return rows[:top]


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def settings(dry_run: bool) -> dict[str, Any]:
    """Sizes and limits of a GPU run or of the CPU dry run."""
    if not dry_run:
        return {
            "device": "cuda",
            "size": (720, 1280),
            "counts": (64, 8, 64),
            "e2e_overrides": [
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=4",
                "--trainer.limit_val_batches=2",
                "--trainer.limit_test_batches=4",
            ],
            "training": [
                "--methods", "sml", "dual_decoder", "--configs", "fp32", "tf32", "mixed-cl",
                "--steps=20", "--warmup=5", "--e2e-methods", "sml", "dual_decoder", "--epochs=3",
            ],
            "test": [],
            "test_methods": None,
            "precision_methods": ("sml", "dual_decoder"),
            "precision": ["--images=8"],
            "loader": ["--batches=24", "--warmup=3"],
            "timeouts": {"e2e": 150, "training": 240, "test": 150, "precision": 120, "loader": 150},
        }  # fmt: skip
    small = [
        "--data.image_size=[48, 64]",
        "--data.batch_size=2",
        "--data.eval_batch_size=2",
        "--data.num_workers=0",
        "--model.init_args.encoder_name=resnet18",
        "--evaluation.num_bits=16",
    ]
    return {
        "device": "cpu",
        "size": (64, 96),
        "counts": (4, 1, 2),
        "e2e_overrides": [
            *small,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.num_sanity_val_steps=0",
        ],
        "training": [
            "--methods", "sml", "--configs", "fp32", "--height=48", "--width=64", "--batch-size=2", "--steps=1",
            "--warmup=1", "--encoder=resnet18", "--threads=1", "--e2e-methods", "sml", "--epochs=2",
            "--num-workers=0", *(f"--override={o}" for o in [*small, "--trainer.limit_val_batches=1"]),
        ],
        "test": [
            "--batch-size=2", "--num-workers=0", "--warmup-batches=1", "--skip-batches=0", "--encoder=resnet18",
            "--threads=1", "--height=64", "--width=96",
        ],
        "test_methods": ("sml",),
        "precision_methods": ("sml",),
        "precision": ["--images=2", "--threads=1", *(f"--override={o}" for o in small)],
        "loader": ["--image-size", "48", "64", "--batches=1", "--warmup=0", "--workers=0"],
        "timeouts": {"e2e": 300, "training": 300, "test": 300, "precision": 300, "loader": 300},
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Steps (each returns a JSON-able dict; "figures" is the summary's one-line description)
# ------------------------------------------------------------------------------------------------
def step_environment(args: argparse.Namespace) -> dict[str, Any]:
    import lightning

    missing = missing_imports()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "missing": missing,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    elif not args.dry_run:
        raise RuntimeError("no CUDA device is visible (run with --dry-run for the CPU check)")
    if missing:
        raise RuntimeError(f"missing packages: {', '.join(missing)}; see benchmarks/gpu_check.sh on bringing wheels")
    where = f"{info.get('gpu', 'CPU')}, bf16 {info.get('bf16', 'n/a')}" if torch.cuda.is_available() else "CPU"
    info["figures"] = (
        f"{where}; CUDA {info['cuda']}, torch {info['torch']}, Lightning {info['lightning']}, "
        f"Python {info['python']}; {info['cpus_available']} of {info['cpus']} CPUs"
    )
    return info


def step_data(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from datamodules.synthetic import write_synthetic_streethazards

    config = settings(args.dry_run)
    root, predict = data_root(args), predict_dir(args)
    height, width = config["size"]
    num_train, num_val, num_test = config["counts"]
    if root.exists():
        shutil.rmtree(root)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = 1 if args.dry_run else max(1, min(16, cpus))
    write_synthetic_streethazards(root, num_train, num_val, num_test, image_size=(height, width), workers=workers)
    # predict: two test images at their size and one at three quarters of it (images of mixed sizes)
    shutil.rmtree(predict, ignore_errors=True)
    predict.mkdir(parents=True)
    tests = sorted((root / "test" / "images").rglob("*.png"))[:2]
    for i, path in enumerate(tests):
        shutil.copy(path, predict / f"native{i}.png")
    with Image.open(tests[0]) as image:
        image.resize((width * 3 // 4, height * 3 // 4)).save(predict / "smaller.png")
    return {
        "root": str(root),
        "figures": f"{num_train} training / {num_val} validation / {num_test} test images at {height}x{width} "
        f"({workers} processes); predict: 3 images of 2 sizes",
    }


def _method_args(method: str, stage: str, args: argparse.Namespace, out: Path) -> list[str]:
    config = settings(args.dry_run)
    preset = "gpu" if config["device"] == "cuda" else "cpu"
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": method, "version": "run"},
    }
    profiler = {
        "class_path": "benchmarks.gpu_check.SyncedProfiler",
        "init_args": {"dirpath": str(out / method / "profiles"), "filename": stage},
    }
    argv = [
        stage,
        f"--config={REPO / 'configs' / 'streethazards.yaml'}",
        f"--config={REPO / 'configs' / 'method' / f'{method}.yaml'}",
        f"--config={REPO / 'configs' / 'trainer' / f'{preset}.yaml'}",
        f"--data.root={data_root(args)}",
        "--model.init_args.encoder_weights=null",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.profiler={json.dumps(profiler)}",
        *config["e2e_overrides"],
    ]
    if stage != "fit":
        argv.append("--ckpt_path=last")
    if stage == "predict":
        argv.append(f"--data.predict_dir={predict_dir(args)}")
        argv.append(f"--predictions.output_dir={out / method / 'predictions'}")
    return argv


def step_e2e(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """fit, test --ckpt_path last, predict --ckpt_path last of one method: times, profiles, host syncs."""
    from main import cli_main

    out = Path(args.out) / "e2e"
    recorder = HostSyncRecorder()
    result: dict[str, Any] = {"method": method, "stages": {}}
    figures = []
    for stage in ("fit", "test", "predict"):
        start = time.perf_counter()
        saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI also reads sys.argv
        try:
            with recorder.stage(stage):
                cli = cli_main(_method_args(method, stage, args, out))
        finally:
            sys.argv = saved_argv
        _synchronize()
        seconds = time.perf_counter() - start
        info: dict[str, Any] = {"seconds": seconds, "profile": profile_summary(cli.trainer.profiler)}
        info["host_syncs"] = dict(recorder.sites.get(stage, Counter()).most_common())
        if stage == "fit":
            durations = cli.trainer.profiler.recorded_durations
            posthoc = [d for name, d in durations.items() if name.startswith("[LightningModule]") and
                       name.endswith(".on_train_end")]  # fmt: skip
            info["posthoc_s"] = math.fsum(posthoc[0]) if posthoc else math.nan
            after = f"post-hoc fit + save {info['posthoc_s']:.1f} s" if cli.model.needs_posthoc else "no post-hoc fit"
            text = f"fit {seconds:.0f} s ({after})"
        elif stage == "test":
            evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "AnomalyEvaluation")
            results = evaluation.results["test"]
            info["aupr"] = results["scores"][results["primary_score"]].get("aupr", math.nan)
            info["miou"] = results["segmentation"]["miou"]
            info["images"] = results["num_images"]
            text = f"test {seconds:.0f} s ({info['images']} images, AUPR {info['aupr']:.3f})"
        else:
            written = sorted((out / method / "predictions").glob("*.npy"))
            info["written"] = len(written)
            if len(written) != 3:
                raise RuntimeError(f"predict wrote {len(written)} score maps for the 3 images")
            text = f"predict {seconds:.0f} s (3 images)"
        syncs = sum(info["host_syncs"].values())
        if torch.cuda.is_available():
            text += f", {syncs} host syncs at {len(info['host_syncs'])} sites"
        figures.append(text)
        result["stages"][stage] = info
        del cli
    result["figures"] = "; ".join(figures)
    return result


def _run_benchmark(module_name: str, argv: list[str]) -> Any:
    import importlib

    module = importlib.import_module(f"benchmarks.{module_name}")
    return module.main(argv)


def step_training(args: argparse.Namespace) -> dict[str, Any]:
    config = settings(args.dry_run)
    argv = [f"--device={config['device']}", *config["training"]]
    argv += ["--end-to-end", f"--data-root={data_root(args)}", f"--output-dir={Path(args.out) / 'training'}"]
    rows = _run_benchmark("training_throughput", argv)
    parts = []
    for row in rows:
        if row["config"] == "main.py fit":
            share = row["epoch_images_per_s"] / row["compute_images_per_s"] if row["compute_images_per_s"] else 0
            parts.append(
                f"{row['method']} main.py fit {row['epoch_images_per_s']:.1f} images/s with validation "
                f"({row['train_images_per_s']:.1f} training only; {share:.0%} of compute-only)"
            )
        else:
            parts.append(f"{row['method']} {row['config']} {row['images_per_s']:.1f}")
    return {"rows": rows, "figures": "; ".join(parts)}


def step_test(args: argparse.Namespace) -> dict[str, Any]:
    config = settings(args.dry_run)
    argv = [f"--device={config['device']}", f"--data-root={data_root(args)}", *config["test"]]
    argv += [f"--output-dir={Path(args.out) / 'test_throughput'}"]
    if config["test_methods"]:
        argv += ["--methods", *config["test_methods"]]
    rows = _run_benchmark("test_throughput", argv)
    figures = "; ".join(
        f"{r['method']} {r['steady_images_per_s']:.1f} images/s (1500 images: {r['full_split_s']:.0f} s)" for r in rows
    )
    return {"rows": rows, "figures": figures}


def step_precision(args: argparse.Namespace) -> dict[str, Any]:
    config = settings(args.dry_run)
    results, parts = {}, []
    for method in [m for m in config["precision_methods"] if m in args.methods]:
        checkpoint = Path(args.out) / "e2e" / method / "run" / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise RuntimeError(f"no {checkpoint}: the e2e step of {method} did not write it")
        argv = [f"--method={method}", f"--checkpoint={checkpoint}", f"--device={config['device']}"]
        argv += [f"--output-dir={Path(args.out) / 'precision' / method}", *config["precision"]]
        argv += [f"--override=--data.root={data_root(args)}", *(f"--override={o}" for o in config["e2e_overrides"])]
        report = _run_benchmark("precision_scoring_check", argv)
        largest = report["largest"]
        agreement = report["agreement"].get("argmax_agreement", math.nan)
        results[method] = {"largest": largest, "argmax_agreement": agreement}
        parts.append(
            f"{method}: largest |bf16 - fp32| "
            + ", ".join(f"{k} {v:.4f}" for k, v in largest.items())
            + f"; argmax agrees on {100 * agreement:.2f}% of pixels"
        )
    return {"results": results, "figures": "; ".join(parts)}


def step_loader(args: argparse.Namespace) -> dict[str, Any]:
    config = settings(args.dry_run)
    argv = [f"--root={data_root(args)}", f"--device={config['device']}", *config["loader"]]
    rows = _run_benchmark("loader_throughput", argv)
    figures = "; ".join(
        f"{r['configuration']} train {r['train_images_per_s']:.1f}"
        + (f", test {r['test_images_per_s']:.1f}" if r["test_images_per_s"] == r["test_images_per_s"] else "")
        for r in rows
    )
    return {"rows": rows, "figures": f"images/s ({rows[0]['workers']} workers): {figures}"}


def data_root(args: argparse.Namespace) -> Path:
    return Path(args.out) / "data"


def predict_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) / "predict"


def all_methods() -> list[str]:
    from lightning_modules.registry import discover_methods, methods, roster

    discover_methods()
    return list(roster(methods()))


# ------------------------------------------------------------------------------------------------
# Offline installation
# ------------------------------------------------------------------------------------------------
def missing_imports() -> list[str]:
    import importlib

    missing = []
    for name in REQUIRED_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any import failure is a missing wheel to report
            missing.append(f"{name} ({type(error).__name__}: {error})")
    return missing


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: Sequence[str]) -> dict[str, str]:
    """Installed distributions reachable from the requirement strings ``roots``: name -> version."""
    from importlib import metadata

    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    queue = [Requirement(root) for root in roots]
    while queue:
        requirement = queue.pop()
        name = _canonical(requirement.name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        extras = set(requirement.extras)
        if name in found and not extras:
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            child = Requirement(text)
            marker = child.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras or {""}):
                queue.append(child)
    return found


def wheel_requirements() -> list[str]:
    """``name==version`` of every package the project needs beyond torch, Lightning and what they
    bring, as installed here; torchvision is left out (it must match the node's torch build)."""
    text = (REPO / "pyproject.toml").read_text()
    start = text.index("\ndependencies = [")
    block = text[start : text.index("\n]", start)]
    project = re.findall(r'"([^"]+)"', block)
    provided = _closure(["torch", "lightning"])
    needed = _closure(project)
    skip = set(provided) | {"torch", "lightning", "torchvision"}
    return sorted(f"{name}=={version}" for name, version in needed.items() if name not in skip)


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(name, step, extra step arguments) in the order they run."""
    steps = [("environment", "environment", []), ("data", "data", [])]
    steps += [(f"e2e {m}", "e2e", [f"--method={m}"]) for m in args.methods]
    steps += [("precision", "precision", []), ("training", "training", []), ("test throughput", "test", [])]
    return [*steps, ("loader", "loader", [])]


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "environment": step_environment,
    "data": step_data,
    "e2e": step_e2e,
    "training": step_training,
    "test": step_test,
    "precision": step_precision,
    "loader": step_loader,
}


def run_step_here(args: argparse.Namespace, step: str, extra: list[str]) -> dict[str, Any]:
    method = next((e.split("=", 1)[1] for e in extra if e.startswith("--method=")), None)
    return STEPS[step](args, method) if method is not None else STEPS[step](args)


def run_step_subprocess(args: argparse.Namespace, name: str, step: str, extra: list[str], timeout: float) -> dict:
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slug = name.replace(" ", "-")
    result_file = Path(args.out) / "steps" / f"{slug}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), f"--out={args.out}", f"--step={step}", *extra]
    command += ["--dry-run"] if args.dry_run else []
    command += ["--methods", *args.methods]
    with open(logs / f"{slug}.log", "w") as log:
        process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if result_file.is_file():
        return json.loads(result_file.read_text())
    tail = (logs / f"{slug}.log").read_text(errors="replace").strip().splitlines()[-15:]
    raise RuntimeError(f"exit code {process.returncode}; last lines of logs/{slug}.log:\n" + "\n".join(tail))


def step_main(args: argparse.Namespace) -> int:
    """``--step``: run one step in this process and leave its result in ``<out>/steps/<name>.json``."""
    extra = [f"--method={args.method}"] if args.method else []
    name = f"e2e {args.method}" if args.step == "e2e" else {"test": "test throughput"}.get(args.step, args.step)
    result = run_step_here(args, args.step, extra)
    path = Path(args.out) / "steps" / f"{name.replace(' ', '-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    return 0


def host_sync_table(records: list[dict[str, Any]]) -> list[str]:
    """Every host-sync site over all e2e steps: site, and the count per method and stage."""
    sites: dict[str, Counter[str]] = {}
    for record in records:
        method = record.get("result", {}).get("method")
        for stage, info in record.get("result", {}).get("stages", {}).items():
            for site, count in info.get("host_syncs", {}).items():
                sites.setdefault(site, Counter())[f"{method} {stage}"] += count
    lines = []
    for site, counts in sorted(sites.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append(f"| {site} | {sum(counts.values())} | " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " |")
    return lines


def component_table(records: list[dict[str, Any]], method: str = "sml") -> list[str]:
    record = next((r for r in records if r.get("result", {}).get("method") == method), None)
    if record is None:
        return []
    lines = []
    for stage, info in record["result"]["stages"].items():
        for row in info["profile"][:8]:
            lines.append(
                f"| {stage} | {row['action']} | {row['calls']} | {row['mean_ms']:.1f} | {row['total_s']:.2f} |"
            )
    return lines


def summary(records: list[dict[str, Any]], args: argparse.Namespace, elapsed: float) -> str:
    environment = next((r.get("result", {}) for r in records if r["name"] == "environment"), {})
    mode = "DRY RUN on the CPU (tiny sizes; no figure here is a GPU figure)" if args.dry_run else "GPU run"
    lines = [
        f"# gpu_check summary: {mode}",
        "",
        f"{environment.get('figures', 'environment unknown')}; {elapsed:.0f} s of a {args.budget:.0f} s budget; "
        f"logs and JSON in {args.out}",
        "",
        "| step | status | s | figures |",
        "|---|---|---|---|",
    ]
    for record in records:
        figures = record.get("result", {}).get("figures", "") if record["status"] == "ok" else record.get("error", "")
        figures = " ".join(str(figures).split())[:600]
        lines.append(f"| {record['name']} | {record['status']} | {record['seconds']:.0f} | {figures} |")
    syncs = host_sync_table([r for r in records if r["name"].startswith("e2e ")])
    if syncs:
        lines += ["", "Host synchronizations (set_sync_debug_mode 'warn'): site <- project caller | total | where",
                  "", "| site | count | method stage |", "|---|---|---|", *syncs]  # fmt: skip
    elif torch.cuda.is_available():
        lines += ["", "Host synchronizations: none reported"]
    components = component_table(records)
    if components:
        lines += ["", "Per-component times of SML (SyncedProfiler: device synchronized around each hook)", ""]
        lines += ["| stage | action | calls | mean ms | total s |", "|---|---|---|---|---|", *components]
    failed = [r["name"] for r in records if r["status"] not in ("ok", "skipped (budget)")]
    lines += ["", f"FAILED: {', '.join(failed)}" if failed else "every step that ran passed"]
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timeouts = settings(args.dry_run)["timeouts"]
    records: list[dict[str, Any]] = []
    isolate = not args.dry_run if args.isolate is None else args.isolate
    for name, step, extra in plan(args):
        left = args.budget - (time.perf_counter() - start)
        timeout = min(timeouts.get(step, 120), left)
        record: dict[str, Any] = {"name": name, "seconds": 0.0}
        if step in ("environment", "data") or timeout >= min(30.0, timeouts.get(step, 120)):
            began = time.perf_counter()
            try:
                if isolate and step not in ("environment", "data"):
                    record["result"] = run_step_subprocess(args, name, step, extra, timeout)
                else:
                    record["result"] = run_step_here(args, step, extra)
                record["status"] = "ok"
            except subprocess.TimeoutExpired:
                record["status"], record["error"] = "TIMEOUT", f"stopped after {timeout:.0f} s"
            except Exception as error:  # noqa: BLE001 - a failed step is reported, the next one runs
                record["status"] = "FAILED"
                record["error"] = f"{type(error).__name__}: {error}"
                (out / "logs").mkdir(exist_ok=True)
                (out / "logs" / f"{name.replace(' ', '-')}.traceback").write_text(traceback.format_exc())
            record["seconds"] = time.perf_counter() - began
            if step in ("environment", "data") and record["status"] != "ok":
                records.append(record)
                print(f"[{name}] {record['status']}: {record.get('error')}", flush=True)
                break  # nothing else can run
        else:
            record["status"] = "skipped (budget)"
        records.append(record)
        print(f"[{name}] {record['status']} in {record['seconds']:.0f} s", flush=True)
    text = summary(records, args, time.perf_counter() - start)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(records, indent=1, default=str))
    print("\n" + text)
    return 0 if all(r["status"] in ("ok", "skipped (budget)") for r in records) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/gpu_check", help="data, logs, summary (default: outputs/gpu_check)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all steps (default: 540)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU check at the smallest sizes")
    parser.add_argument(
        "--isolate",
        type=lambda text: text.lower() == "true",
        default=None,
        help="true/false: each step in its own process (default: true on a GPU, false for --dry-run)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods run end to end (default: every registered one; with --dry-run: sml, whose checkpoint the "
        "precision step scores)",
    )
    parser.add_argument("--check-imports", action="store_true", help="exit 1 when a needed package is missing")
    parser.add_argument("--list-wheels", action="store_true", help="print the pinned packages gpu_check.sh downloads")
    parser.add_argument("--step", choices=sorted(STEPS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_imports:
        missing = missing_imports()
        for line in missing:
            print(f"missing: {line}", file=sys.stderr)
        return 1 if missing else 0
    if args.list_wheels:
        print("\n".join(wheel_requirements()))
        return 0
    if args.dry_run:
        torch.set_num_threads(1)
    known = all_methods()
    if args.methods is None:
        args.methods = ["sml"] if args.dry_run else known
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    if args.step is not None:
        return step_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
