#!/usr/bin/env bash
# OpenAI-compatible vLLM server for a Gemma 2/3/4 checkpoint on AWS Neuron, through vllm-neuron and nxdi_gemma's NxDI
# classes (the `nxdi_gemma` vLLM plugin maps vllm-neuron's Gemma lookups to them).
#
# UNTESTED ON NEURON HARDWARE. For vllm-neuron 0.4.1 + vLLM 0.13.0 (Neuron SDK 2.28, NxDI 0.8) and vllm-neuron 0.5.0 +
# vLLM 0.16.0 (SDK 2.29, NxDI 0.9); install vllm-neuron from source at the SDK's release (the PyPI `vllm-neuron` is an
# empty placeholder; see README "Serving with vLLM on Neuron"). The simulation tier (test/sim/test_vllm.py) runs this
# script with real vLLM 0.13.0 + vllm-neuron 0.4.1 and NxDI in CPU mode and checks HF's greedy tokens over HTTP;
# nobody has run it on Trainium/Inferentia yet.
#
#   MODEL=/data/gemma-3-12b-it TP=8 MAX_MODEL_LEN=4096 MAX_NUM_SEQS=4 scripts/serve_vllm.sh
#   curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
#        -d '{"model": "/data/gemma-3-12b-it", "prompt": "def fibonacci(n):", "max_tokens": 64, "temperature": 0}'
#
# Parameters (environment variables):
#   MODEL            required: a LOCAL checkpoint directory (config.json + *.safetensors). nxdi_gemma reads both from
#                    disk, and vllm-neuron re-saves Hub ids through transformers' AutoModelForCausalLM (no Gemma 4 in
#                    transformers 4.57), so download first: `hf download google/gemma-3-12b-it --local-dir ...`.
#   TP               --tensor-parallel-size (default 8): NeuronCores; must divide the heads and widths (see
#                    compile_configs/ for the degree the planner picked per model and instance).
#   MAX_MODEL_LEN    --max-model-len (default 4096): also the NxDI seq_len. Required in practice: vllm-neuron replaces
#                    vLLM's max-length derivation with the value given here.
#   MAX_NUM_SEQS     --max-num-seqs (default 4): the NxDI batch size (continuous batching when > 1).
#   DTYPE            --dtype (default bfloat16).
#   OVERRIDE_NEURON_CONFIG  JSON object merged into vllm-neuron's NxDI neuron config (default {}), sent as
#                    --additional-config '{"override_neuron_config": ...}' (read by vllm-neuron's get_neuron_model).
#                    E.g. '{"context_encoding_buckets": [1024, 4096], "token_generation_buckets": [4096]}'.
#                    nxdi_gemma refuses chunked prefill, speculation, quantization and the NKI attention kernels
#                    (GemmaNeuronConfig). With prefix caching NxDI's context-encoding buckets are 2-D: set
#                    "context_encoding_buckets" (prefill lengths) and "prefix_buckets" (multiples of BLOCK_SIZE).
#   BLOCK_SIZE       --block-size (unset: the plugin's default, 32). Prefix caching stays on (vLLM's default), so
#                    vllm-neuron uses NxDI's block KV layout, which needs a block size.
#   NUM_BLOCKS       --num-gpu-blocks-override (unset: the plugin supplies ceil(MAX_MODEL_LEN / block size) x
#                    MAX_NUM_SEQS, the blocks vllm-neuron has NxDI allocate). vllm-neuron would otherwise size vLLM's
#                    block pool from the device's free memory and layer 0's head dim, which need not match the blocks
#                    NxDI holds (Gemma 4's full layers have twice layer 0's head dim); more blocks keep more
#                    prefixes cached (and take HBM: the plugin's HBM check plans them).
#   NEURON_COMPILED_ARTIFACTS  where the compiled model lives (default ./neuron-compiled/<model>-<settings hash>).
#                    vllm-neuron loads from this directory when it holds a compiled model and compiles into it
#                    otherwise. It does NOT check that the artifacts match the current settings (and ignores
#                    override_neuron_config when loading them), so the default name hashes every setting above.
#                    Unset, vllm-neuron would compile into MODEL/neuron-compiled-artifacts/<hash>, which it empties
#                    at every start (so every start recompiles) and which needs MODEL to be writable.
#   VLLM_PLUGINS     when set, vLLM loads only the listed plugins (platform plugins too): this script makes sure it
#                    lists vllm-neuron's platform plugin `neuron` and our `nxdi_gemma` (default: exactly those two).
#   HOST / PORT      bind address (default 127.0.0.1, loopback only) and port (default 8000).
#   Extra arguments are passed to `vllm serve` unchanged.
set -euo pipefail

if [[ -z "${MODEL:-}" ]]; then
    echo "error: set MODEL to a local Gemma checkpoint directory, e.g. MODEL=/data/gemma-3-12b-it $0" >&2
    exit 2
fi
if [[ ! -f "$MODEL/config.json" ]]; then
    echo "error: MODEL=$MODEL has no config.json; give a local checkpoint directory (download it first)" >&2
    exit 2
fi
if [[ "${DISABLE_NEURON_CUSTOM_SCHEDULER:-0}" == "1" ]]; then
    # vllm-neuron then keeps vLLM's chunked prefill, i.e. a block KV layout, which nxdi_gemma does not implement.
    echo "error: unset DISABLE_NEURON_CUSTOM_SCHEDULER (chunked prefill is not supported by nxdi_gemma)" >&2
    exit 2
fi

TP="${TP:-8}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-4096}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-4}"
BLOCK_SIZE="${BLOCK_SIZE:-}"
NUM_BLOCKS="${NUM_BLOCKS:-}"
DTYPE="${DTYPE:-bfloat16}"
OVERRIDE_NEURON_CONFIG="${OVERRIDE_NEURON_CONFIG:-}"
[[ -n "$OVERRIDE_NEURON_CONFIG" ]] || OVERRIDE_NEURON_CONFIG="{}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
PYTHON="${PYTHON:-python3}"

ADDITIONAL_CONFIG="{\"override_neuron_config\": ${OVERRIDE_NEURON_CONFIG}}"
"$PYTHON" -c 'import json, sys; assert isinstance(json.loads(sys.argv[1])["override_neuron_config"], dict)' \
    "$ADDITIONAL_CONFIG" 2>/dev/null || {
    echo "error: OVERRIDE_NEURON_CONFIG is not a JSON object: ${OVERRIDE_NEURON_CONFIG}" >&2
    exit 2
}

# vllm-neuron reads num_key_value_heads / head_dim from the top level of the transformers config; multimodal Gemma 3
# configs parsed by transformers 4.57 only have them under text_config, so pass them as overrides (empty for
# text-only checkpoints). See nxdi_gemma/neuron/vllm_plugin.py.
HF_OVERRIDES="$("$PYTHON" -m nxdi_gemma.neuron.vllm_plugin "$MODEL")"

if [[ -z "${NEURON_COMPILED_ARTIFACTS:-}" ]]; then
    settings="$MODEL|$TP|$MAX_MODEL_LEN|$MAX_NUM_SEQS|$DTYPE|$OVERRIDE_NEURON_CONFIG|$BLOCK_SIZE|$NUM_BLOCKS"
    digest="$(printf '%s' "$settings" | sha256sum | cut -c1-12)"
    NEURON_COMPILED_ARTIFACTS="$PWD/neuron-compiled/$(basename "$MODEL")-tp${TP}-len${MAX_MODEL_LEN}-seqs${MAX_NUM_SEQS}-${digest}"
fi
export NEURON_COMPILED_ARTIFACTS

if [[ -z "${VLLM_PLUGINS+set}" ]]; then
    VLLM_PLUGINS="neuron,nxdi_gemma"
else
    for plugin in neuron nxdi_gemma; do
        [[ ",${VLLM_PLUGINS}," == *",${plugin},"* ]] || VLLM_PLUGINS="${VLLM_PLUGINS:+${VLLM_PLUGINS},}${plugin}"
    done
fi
export VLLM_PLUGINS

echo "serving $MODEL on http://$HOST:$PORT (tp=$TP max_model_len=$MAX_MODEL_LEN max_num_seqs=$MAX_NUM_SEQS)" >&2
echo "compiled artifacts: $NEURON_COMPILED_ARTIFACTS; VLLM_PLUGINS=$VLLM_PLUGINS; hf overrides: $HF_OVERRIDES" >&2

# Prefix caching stays on (vLLM's default): vllm-neuron then sets is_prefix_caching / is_block_kv_layout and nxdi_gemma
# runs NxDI's block-KV path (neuron/block_kv.py); --block-size and --num-gpu-blocks-override only when set (above).
BLOCK_ARGS=()
[[ -z "$BLOCK_SIZE" ]] || BLOCK_ARGS+=(--block-size "$BLOCK_SIZE")
[[ -z "$NUM_BLOCKS" ]] || BLOCK_ARGS+=(--num-gpu-blocks-override "$NUM_BLOCKS")
exec vllm serve "$MODEL" \
    --host "$HOST" \
    --port "$PORT" \
    --tensor-parallel-size "$TP" \
    --max-model-len "$MAX_MODEL_LEN" \
    --max-num-seqs "$MAX_NUM_SEQS" \
    --dtype "$DTYPE" \
    "${BLOCK_ARGS[@]}" \
    --hf-overrides "$HF_OVERRIDES" \
    --additional-config "$ADDITIONAL_CONFIG" \
    "$@"
