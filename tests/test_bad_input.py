"""Bad input exits with code 2 and one clear error line, for every entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    REPO,
    checkpoint_dir,
    cli_args,
)

# --------------------------------------------------------------------------------------- 6. bad input
#: Each case runs main.py as its own process (forked from one that imported main once, to save the
#: 4 s import per case; test_bad_input_runner_matches_a_real_subprocess checks the emulation).
_RUNNER = textwrap.dedent(
    """
    import json, os, sys, traceback
    repo, cases_file, out_dir = sys.argv[1:4]
    os.chdir(repo)
    sys.path.insert(0, repo)
    import main

    codes = {}
    for name, argv in json.loads(open(cases_file).read()).items():
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # what `python main.py *argv` does, interpreter exit included
            os.dup2(os.open(os.path.join(out_dir, name + ".err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = ["main.py", *argv]
            try:
                code = main.main()
            except SystemExit as stop:
                code = stop.code
                if code is None:
                    code = 0
                elif not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    json.dump(codes, open(os.path.join(out_dir, "codes.json"), "w"))
    """
)


def _bad_input_cases(root: Path, work: Path, sml_checkpoint: Path) -> dict[str, tuple[str, str, list[str], str]]:
    """name -> (fault, entry point, arguments, text the error must contain)."""
    sml, fre = str(REPO / "configs/method/demo/sml.yaml"), str(REPO / "configs/method/demo/fre.yaml")
    dual_decoder = str(REPO / "configs/method/demo/dual_decoder.yaml")
    truncated = work / "truncated.ckpt"
    truncated.write_bytes(sml_checkpoint.read_bytes()[:1_000_000])
    a_file = work / "a_file"
    a_file.write_text("not a folder")
    empty, images = work / "empty", work / "images"
    empty.mkdir()
    images.mkdir()
    shutil.copy(next((root / "test").rglob("*.png")), images / "frame.png")
    run = [*cli_args(root, work / "runs"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    other = work / "other"  # its last.ckpt is the SML checkpoint; the FRE config logs into the same folder
    checkpoint_dir(other).mkdir(parents=True)
    shutil.copy(sml_checkpoint, checkpoint_dir(other) / "last.ckpt")
    ck = f"--ckpt_path={sml_checkpoint}"
    compare_out = f"--output_dir={work / 'compare'}"
    custom = '[{"name": "x", "void_classes": ["sky"]}]'
    return {
        "fit_missing_root": ("missing dataset folder", "fit", ["fit", *run, "--data.root=/nonexistent/sh"],
                             "StreetHazards root '/nonexistent/sh' does not exist"),
        "fit_missing_config": ("missing config file", "fit", ["fit", "--config=/nonexistent/sml.yaml"],
                               "File does not exist: '/nonexistent/sml.yaml'"),
        "fit_wrong_type": ("wrong type (`--data.batch_size=abc`)", "fit", ["fit", *run, "--data.batch_size=abc"],
                           'Parser key "data.batch_size"'),
        "fit_bad_value": ("invalid value (`--data.batch_size=0`)", "fit", ["fit", *run, "--data.batch_size=0"],
                          "data.batch_size must be >= 1, got 0"),
        "fit_unknown_method": ("unknown method (`--model=NoSuchMethod`)", "fit",
                               ["fit", *run, "--model=NoSuchMethod"], "NoSuchMethod"),
        "fit_unknown_option": ("unknown option (`--model.init_args.no_such_option=1`)", "fit",
                               ["fit", *run, "--model.init_args.no_such_option=1"], "no_such_option"),
        "fit_bad_method_option": ("invalid method option (FRE `--model.init_args.mode=bogus`)", "fit",
                                  ["fit", *run, f"--config={fre}", "--model.init_args.mode=bogus"],
                                  "model.mode must be one of"),
        "fit_other_method_checkpoint": ("checkpoint of another method (FRE config, SML checkpoint)", "fit",
                                        ["fit", *run, f"--config={fre}", ck],
                                        "was written by method sml (lightning_modules.sml.SMLSegmenter), not fre"),
        "fit_truncated_checkpoint": ("truncated checkpoint as explicit `--ckpt_path`", "fit",
                                     ["fit", *run, f"--ckpt_path={truncated}"],
                                     f"checkpoint '{truncated}' cannot be loaded safely"),
        "fit_resume_past_max_epochs": ("resume with `max_epochs` below the checkpoint's epoch", "fit",
                                       ["fit", *run, ck], "You restored a checkpoint with current_epoch=2"),
        "fit_output_not_a_folder": ("output folder cannot be created", "fit",
                                    ["fit", *run, f"--trainer.default_root_dir={a_file / 'out'}",
                                     f"--trainer.logger.init_args.save_dir={a_file / 'out'}"], "Not a directory"),
        "fit_bad_preemption_option": ("preemption agreement interval below 1 (`--preemption.check_every_n_steps=0`)",
                                      "fit", ["fit", *run, "--preemption.check_every_n_steps=0"],
                                      "preemption.check_every_n_steps must be >= 1, got 0"),
        "fit_bad_nonfinite_option": ("non-finite check interval below 1 (`--nonfinite.check_every_n_steps=0`)",
                                     "fit", ["fit", *run, "--nonfinite.check_every_n_steps=0"],
                                     "nonfinite.check_every_n_steps must be >= 1, got 0"),
        "validate_missing_checkpoint": ("missing checkpoint", "validate",
                                        ["validate", *run, "--ckpt_path=/nonexistent/model.ckpt"],
                                        "checkpoint '/nonexistent/model.ckpt' does not exist"),
        "test_missing_checkpoint": ("missing checkpoint", "test", ["test", *run, "--ckpt_path=/nonexistent/model.ckpt"],
                                    "checkpoint '/nonexistent/model.ckpt' does not exist"),
        "test_other_method_checkpoint": ("checkpoint of another method (FRE config, SML checkpoint)", "test",
                                         ["test", *run, f"--config={fre}", ck],
                                         "was written by method sml (lightning_modules.sml.SMLSegmenter), not fre"),
        "test_last_of_other_method": ("`--ckpt_path last` finds another method's checkpoint", "test",
                                      ["test", *cli_args(root, other, method="fre"),
                                       "--ckpt_path=last"], "was written by method sml"),
        "test_truncated_checkpoint": ("truncated checkpoint", "test", ["test", *run, f"--ckpt_path={truncated}"],
                                      f"checkpoint '{truncated}' cannot be loaded safely"),
        "test_other_class_set": ("checkpoint of another class set (`--data.ignore_unlabeled=true`)", "test",
                                 ["test", *run, ck, "--data.ignore_unlabeled=true"],
                                 "'net.model.segmentation_head.0.weight': [13, 256, 1, 1] in the checkpoint, "
                                 "[12, 256, 1, 1] here"),
        "test_missing_init_checkpoint": ("missing `init_checkpoint`", "test",
                                         ["test", *run, f"--config={fre}",
                                          "--model.init_args.init_checkpoint=/nonexistent/model.ckpt"],
                                         "checkpoint '/nonexistent/model.ckpt' does not exist"),
        "test_wrong_type": ("wrong type (`--data.eval_batch_size=abc`)", "test",
                            ["test", *run, "--data.eval_batch_size=abc"], "eval_batch_size"),
        "test_unknown_protocol": ("unknown protocol preset (`--evaluation.protocols=[bogus]`)", "test",
                                  ["test", *run, ck, "--evaluation.protocols=[bogus]"],
                                  "unknown protocol preset 'bogus'"),
        "test_protocol_unknown_class": ("protocol preset with an unknown void class", "test",
                                        ["test", *run, ck, f"--evaluation.protocols={custom}"],
                                        "unknown void class(es) ['sky']"),
        "fit_train_crop_size_not_positive": ("training crop of size 0 (`--data.train_crop_size=[0, 12]`)", "fit",
                                             ["fit", *run, "--data.train_crop_size=[0, 12]"],
                                             "data.train_crop_size must be (height, width) >= 1"),
        "test_exclude_own_score": ("own score left out of the metrics (`--evaluation.exclude_scores=[sml]`)", "test",
                                   ["test", *run, ck, "--evaluation.exclude_scores=[sml]"],
                                   "evaluation.exclude_scores names the method's own score 'sml'"),
        "test_histogram_size_out_of_range": ("histogram size out of range (`--evaluation.num_bits=40`)", "test",
                                             ["test", *run, ck, "--evaluation.num_bits=40"],
                                             "evaluation.num_bits (log2 of the histogram's sub-bin budget) must be"),
        "test_bootstrap_negative": ("negative bootstrap resamples (`--evaluation.bootstrap_samples=-1`)", "test",
                                    ["test", *run, ck, "--evaluation.bootstrap_samples=-1"],
                                    "evaluation.bootstrap_samples (resamples of the test images; 0 turns the "
                                    "intervals off) must be a non-negative integer, got -1"),
        "test_bootstrap_not_integer": ("bootstrap resamples not an integer (`--evaluation.bootstrap_samples=2.5`)",
                                       "test", ["test", *run, ck, "--evaluation.bootstrap_samples=2.5"],
                                       "evaluation.bootstrap_samples"),
        "test_bad_tta_scale": ("test-time scale that is not positive", "test",
                               ["test", *run, ck, "--evaluation.test_time_augmentation={scales: [1.0, 0]}"],
                               "scales must be positive numbers"),
        "test_size_bins_not_increasing": ("size bins that are not increasing", "test",
                                          ["test", *run, ck, "--evaluation.size_bins=[0.01, 0.005]"],
                                          "evaluation.size_bins must be strictly increasing"),
        "test_gallery_size_below_one": ("failure gallery of size 0", "test",
                                        ["test", *run, ck, "--evaluation.gallery_size=0"],
                                        "evaluation.gallery_size must be an integer >= 1"),
        "predict_missing_folder": ("missing image folder", "predict",
                                   ["predict", *run, ck, "--data.predict_dir=/nonexistent/images"],
                                   "predict_dir '/nonexistent/images' does not exist or is not a folder"),
        "predict_no_folder": ("no image folder given", "predict", ["predict", *run, ck],
                              "predict needs data.predict_dir"),
        "predict_empty_folder": ("folder without images", "predict",
                                 ["predict", *run, ck, f"--data.predict_dir={empty}"], "contains no .png/.jpg images"),
        "predict_other_method_checkpoint": ("checkpoint of another method (FRE config, SML checkpoint)", "predict",
                                            ["predict", *run, f"--config={fre}", ck, f"--data.predict_dir={images}"],
                                            "was written by method sml"),
        "compare_missing_config": ("missing comparison config", "compare",
                                   ["compare", "--config=/nonexistent/compare.yaml"],
                                   "File does not exist: '/nonexistent/compare.yaml'"),
        "compare_missing_method_config": ("missing method config", "compare",
                                          ["compare", compare_out, '--methods={"sml": "/nonexistent/sml.yaml"}'],
                                          "config of method 'sml' not found: /nonexistent/sml.yaml"),
        "compare_wrong_type": ("wrong type (`--num_examples=abc`)", "compare",
                               ["compare", compare_out, "--num_examples=abc"], 'Parser key "num_examples"'),
        "compare_unknown_reuse": ("reuses a method that is not run", "compare",
                                  ["compare", compare_out, f'--methods={{"fre": "{fre}"}}',
                                   '--scores_network_of={"fre": "sml"}'], "which is not in --methods"),
        "compare_unknown_init": ("starts from a method that is not run", "compare",
                                 ["compare", compare_out, f'--methods={{"dual_decoder": "{dual_decoder}"}}'],
                                 "starts from the network of 'sml', which is not a method trained from scratch"),
        "compare_unknown_protocol": ("unknown protocol preset", "compare",
                                     ["compare", compare_out, "--protocols=[bogus]"],
                                     "unknown protocol preset 'bogus'"),
        "compare_bootstrap_negative": ("negative bootstrap resamples (`--bootstrap_samples=-1`)", "compare",
                                       ["compare", compare_out, "--bootstrap_samples=-1"],
                                       "compare: bootstrap_samples (resamples of the test images; 0 turns the "
                                       "intervals off) must be a non-negative integer, got -1"),
        "compare_seeds_zero": ("no training seed (`--seeds=0`)", "compare", ["compare", compare_out, "--seeds=0"],
                               "compare: --seeds (how many times every method is trained, each with its own seed) "
                               "must be an integer >= 1, got 0"),
        "compare_seeds_negative": ("negative seed count (`--seeds=-1`)", "compare",
                                   ["compare", compare_out, "--seeds=-1"], "--seeds (how many times"),
        "compare_seeds_not_integer": ("seed count not an integer (`--seeds=1.5`)", "compare",
                                      ["compare", compare_out, "--seeds=1.5"], "must be an integer >= 1, got 1.5"),
        "compare_unknown_method": ("unknown method in the overrides", "compare",
                                   ["compare", compare_out, f'--methods={{"sml": "{sml}"}}',
                                    '--overrides=["--model=NoSuchMethod"]'], "NoSuchMethod"),
        "download_no_root": ("no `--root`", "download", ["download"], "the following arguments are required: --root"),
        "download_wrong_type": ("wrong type (`--retries=abc`)", "download",
                                ["download", f"--root={work / 'dl'}", "--retries=abc"], "invalid int value: 'abc'"),
        "download_root_not_a_folder": ("root cannot be created", "download",
                                       ["download", f"--root={a_file / 'sh'}", "--no_progress"], "Not a directory"),
        "download_unreachable": ("server unreachable", "download",
                                 ["download", f"--root={work / 'dl'}", "--splits", "train", "--no_progress",
                                  "--retries=0", "--train_url=http://127.0.0.1:9/streethazards_train.tar"],
                                 "cannot reach http://127.0.0.1:9/streethazards_train.tar"),
        "no_subcommand": ("no subcommand", "main.py", [], "no subcommand given; pick one of fit, validate"),
        "unknown_subcommand": ("unknown subcommand (`train`)", "main.py", ["train"], "invalid choice: 'train'"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def bad_input(data_root: Path, trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bad_input")
    cases = _bad_input_cases(data_root, work, trained["last"])
    (work / "cases.json").write_text(json.dumps({name: case[2] for name, case in cases.items()}))
    runner = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(REPO), str(work / "cases.json"), str(work)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert runner.returncode == 0, runner.stderr[-3000:]
    codes = json.loads((work / "codes.json").read_text())
    return {
        name: {"case": case, "code": codes[name], "stderr": (work / f"{name}.err").read_text()}
        for name, case in cases.items()
    } | {"_work": work, "_cases": cases}


def _error_block(stderr: str) -> list[str]:
    """The lines from the first error line on (`error: ...`, or argparse's `prog: error: ...`)."""
    lines = stderr.rstrip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error: ") or ": error: " in line:
            return lines[i:]
    return []


BAD_INPUT = [
    "fit_missing_root", "fit_missing_config", "fit_wrong_type", "fit_bad_value", "fit_unknown_method",
    "fit_unknown_option", "fit_bad_method_option", "fit_other_method_checkpoint", "fit_truncated_checkpoint",
    "fit_resume_past_max_epochs", "fit_output_not_a_folder", "fit_bad_preemption_option", "fit_bad_nonfinite_option",
    "validate_missing_checkpoint",
    "test_missing_checkpoint", "test_other_method_checkpoint", "test_last_of_other_method", "test_truncated_checkpoint",
    "test_other_class_set", "test_missing_init_checkpoint", "test_wrong_type", "test_unknown_protocol",
    "test_protocol_unknown_class", "fit_train_crop_size_not_positive", "test_exclude_own_score",
    "test_histogram_size_out_of_range", "test_bootstrap_negative",
    "test_bootstrap_not_integer", "test_bad_tta_scale", "test_size_bins_not_increasing", "test_gallery_size_below_one",
    "predict_missing_folder",
    "predict_no_folder",
    "predict_empty_folder", "predict_other_method_checkpoint", "compare_missing_config",
    "compare_missing_method_config", "compare_wrong_type", "compare_unknown_reuse", "compare_unknown_init",
    "compare_unknown_method", "compare_unknown_protocol", "compare_bootstrap_negative", "compare_seeds_zero",
    "compare_seeds_negative", "compare_seeds_not_integer",
    "download_no_root", "download_wrong_type", "download_root_not_a_folder", "download_unreachable",
    "no_subcommand", "unknown_subcommand",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_exits_non_zero_with_one_clear_error(name: str, bad_input: dict[str, Any]) -> None:
    result = bad_input[name]
    _, _, _, expected = result["case"]
    stderr = result["stderr"]
    assert result["code"] == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    block = _error_block(stderr)
    # Our errors are one line; jsonargparse explains a rejected value in a few more.
    assert 1 <= len(block) <= 10, stderr[-3000:]
    assert expected in "\n".join(block), block


@pytest.mark.parametrize("name", ["compare_seeds_zero", "compare_seeds_negative", "compare_seeds_not_integer"])
def test_bad_seed_count_is_one_line_naming_the_option(name: str, bad_input: dict[str, Any]) -> None:
    # compare checks --seeds itself (jsonargparse would explain a non-integer in several lines)
    block = _error_block(bad_input[name]["stderr"])
    assert len(block) == 1 and block[0].startswith("error: compare: --seeds "), block


def test_every_bad_input_case_is_checked(bad_input: dict[str, Any]) -> None:
    assert sorted(BAD_INPUT) == sorted(bad_input["_cases"])


def test_bad_input_runner_matches_a_real_subprocess(bad_input: dict[str, Any]) -> None:
    """The forked runner reports what `python main.py ...` itself prints and returns."""
    for name in ("test_truncated_checkpoint", "fit_wrong_type"):
        argv = bad_input["_cases"][name][2]
        real = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert real.returncode == bad_input[name]["code"]
        assert _error_block(real.stderr) == _error_block(bad_input[name]["stderr"])
