#!/usr/bin/env bash
# Build, or reuse, the virtualenv of the simulation tier (test/sim): the public half of the Neuron SDK 2.28 stack,
# i.e. torch 2.9.0 + torch-xla 2.9.0 (PJRT CPU), vLLM 0.13.0, transformers 4.57 (what NxDI pins), NxD's pure-Python
# imports, vllm-neuron from source (editable, no deps) and this project (editable, no deps). NxD and NxDI are not
# installed: the tier puts the `src` trees of $NXDI_SOURCES on PYTHONPATH per release.
#
#   bash scripts/sim_env.sh            # prints progress on stderr and the venv's python as the LAST stdout line
#
# Environment:
#   VLLM_NEURON_SOURCE   vllm-neuron source folder (default ../shared/vllm-neuron-src/0.4.1 beside the repo); it is
#                        copied into the venv because the source may be read-only
#   NXDI_GEMMA_SIM_VENV  venv directory (default $HOME/.cache/nxdi-gemma/sim-<key>, key = hash of the pinned
#                        requirements, the base Python's version and the vllm-neuron source)
#   NXDI_GEMMA_SIM_BASE_PYTHON  interpreter the venv is made from (default python3; 3.10-3.12)
# A venv is reused only when its stamp file holds the same key; an interrupted build is resumed (pip skips what is
# already installed). The first build downloads ~7 GB (vLLM and torch with their CUDA wheels; only CPU is used).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
vllm_neuron_source="${VLLM_NEURON_SOURCE:-$repo/../shared/vllm-neuron-src/0.4.1}"
base_python="${NXDI_GEMMA_SIM_BASE_PYTHON:-python3}"

if [[ ! -f "$vllm_neuron_source/setup.py" || ! -d "$vllm_neuron_source/vllm_neuron" ]]; then
    echo "sim_env.sh: VLLM_NEURON_SOURCE=$vllm_neuron_source is not a vllm-neuron source folder (setup.py +" \
         "vllm_neuron/); clone github.com/whn09/vllm-neuron at 4fac6b7 (0.4.1) and point VLLM_NEURON_SOURCE at it" >&2
    exit 2
fi
# vLLM is the release the vllm-neuron source pins (0.4.1: 0.13.0, SDK 2.28; 0.5.0: 0.16.0, SDK 2.29). The 0.13 venv
# also carries torch-xla 2.9.0 for the XLA tests; the 0.16 venv (speculation through vLLM, NxDI 0.9) takes the torch
# its vLLM pins and runs only the vLLM tests.
vllm_version="$(sed -n 's/^vllm==\([0-9.]*\).*/\1/p' "$vllm_neuron_source/requirements/core.txt")"
[[ -n "$vllm_version" ]] || { echo "sim_env.sh: no vllm==X pin in $vllm_neuron_source/requirements/core.txt" >&2; exit 2; }
if [[ "$vllm_version" == "0.13.0" ]]; then
    requirements=("torch==2.9.0" "torch-xla==2.9.0" "vllm==0.13.0")
else
    requirements=("vllm==$vllm_version")
fi
requirements+=("transformers==4.57.*" "safetensors" "tokenizers" "tqdm" "boto3" "tenacity" "scipy" "pytest")

command -v "$base_python" >/dev/null || { echo "sim_env.sh: no $base_python; set NXDI_GEMMA_SIM_BASE_PYTHON" >&2; exit 2; }

# The key: what decides the venv's contents. The vllm-neuron tree is hashed file by file (names relative to it).
source_hash="$(cd "$vllm_neuron_source" && find . -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
               | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)"
py_version="$("$base_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$(printf '%s\n' "${requirements[@]}" "python $py_version" "vllm-neuron $source_hash" | sha256sum | cut -c1-12)"
venv="${NXDI_GEMMA_SIM_VENV:-$HOME/.cache/nxdi-gemma/sim-$key}"
stamp="$venv/.nxdi-gemma-sim-key"
py="$venv/bin/python"

log() { echo "sim_env.sh: $*" >&2; }

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9  # two builders of the same venv (parallel CI jobs) wait for each other

if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    log "reusing $venv (key $key)"
else
    if [[ ! -x "$py" ]]; then
        log "creating $venv (key $key)"
        "$base_python" -m venv "$venv"
    else
        log "completing $venv (key $key; no matching stamp)"
    fi
    rm -f "$stamp"
    "$py" -m pip install -q --disable-pip-version-check "${requirements[@]}" >&2
    rm -rf "$venv/src/vllm-neuron"
    mkdir -p "$venv/src"
    cp -r "$vllm_neuron_source" "$venv/src/vllm-neuron"
    chmod -R u+w "$venv/src/vllm-neuron"
    "$py" -m pip install -q --disable-pip-version-check --no-deps -e "$venv/src/vllm-neuron" >&2
    echo "$key" > "$stamp"
fi

# The project is installed per checkout (editable: its vLLM plugin entry point must be registered), so a venv reused
# by another clone is pointed at this one.
installed="$("$py" -I -c 'import pathlib, nxdi_gemma; print(pathlib.Path(nxdi_gemma.__file__).resolve().parents[1])' \
             2>/dev/null || true)"
if [[ "$installed" != "$repo/src" ]]; then
    log "installing the project from $repo (editable, no deps)"
    "$py" -m pip install -q --disable-pip-version-check --no-deps -e "$repo" >&2
fi
echo "$py"
