#!/usr/bin/env bash
# Every GPU figure and every crash, in one run of about nine minutes on one H100/H200:
#
#   bash benchmarks/gpu_check.sh                 # on the GPU node, from the repository root or anywhere
#   bash benchmarks/gpu_check.sh --dry-run       # the same steps on the CPU at tiny sizes (CI runs this)
#   bash benchmarks/gpu_check.sh --out DIR --budget 540
#
# What it runs and prints: see benchmarks/gpu_check.py. Nothing is downloaded: networks start from
# random weights and the data is written on the node.
#
# Offline nodes with only torch and Lightning installed: bring the other packages as wheels in
# a wheels/ folder of the working tree. On a machine with internet and the same Python version
# and platform as the node (or name them, see below):
#
#   bash benchmarks/gpu_check.sh --download-wheels                # -> wheels/, from this environment's versions
#   bash benchmarks/gpu_check.sh --download-wheels --python-version 3.11 --platform manylinux2014_x86_64
#
# That writes the pinned list of what the project needs beyond torch, Lightning and their own
# dependencies (wheels/requirements.txt, from the packages installed where it runs) and runs
# `pip download --no-deps --only-binary=:all:` for it. Copy the working tree with wheels/ to the node;
# there this script first runs (about a minute the first time, seconds afterwards)
#
#   pip install --no-index --find-links wheels -r wheels/requirements.txt
#
# torchvision is not in the list: it must match the node's torch build (it is usually installed
# with torch; otherwise download the matching wheel from the PyTorch index).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo" || exit 2
python="${PYTHON:-python}"

if [[ "${1:-}" == "--download-wheels" ]]; then
    shift
    mkdir -p wheels
    "$python" benchmarks/gpu_check.py --list-wheels > wheels/requirements.txt || exit 1
    echo "wheels/requirements.txt: $(wc -l < wheels/requirements.txt) packages"
    exec "$python" -m pip download --no-deps --only-binary=:all: -d wheels -r wheels/requirements.txt "$@"
fi

# No network on the node: never wait for a download.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1

if ! "$python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('lightning')))"; then
    echo "error: torch and lightning must be installed in '$python' (set PYTHON=... to choose another)" >&2
    exit 2
fi
if [[ -f wheels/requirements.txt ]]; then
    # Brought wheels: install what is missing (a few seconds when everything is there already).
    "$python" -m pip install --quiet --no-index --find-links wheels -r wheels/requirements.txt || exit 2
fi
# Without them, the environment step names any missing package and how to bring it.

exec "$python" benchmarks/gpu_check.py "$@"
