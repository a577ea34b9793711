"""vLLM offline inference on AWS Neuron with nxdi_gemma's NxDI classes: greedy completions of the code prompts.

UNTESTED ON NEURON HARDWARE. For vllm-neuron 0.4.1 + vLLM 0.13.0 (Neuron SDK 2.28, NxDI 0.8) and vllm-neuron 0.5.0 +
vLLM 0.16.0 (SDK 2.29, NxDI 0.9), vllm-neuron installed from source at the SDK's release (the PyPI `vllm-neuron` is an
empty placeholder; see README "Serving with vLLM on Neuron"). The same LLM(...) settings run in the simulation tier
(test/sim/test_vllm.py: real vLLM 0.13.0 + vllm-neuron 0.4.1, NxDI in CPU mode); nobody has run this on
Trainium/Inferentia yet.

    python scripts/offline_inference.py --model /data/gemma-3-12b-it --tp 8 --max-model-len 4096 --max-num-seqs 4

Same settings as scripts/serve_vllm.sh (see it for what each one does): a LOCAL checkpoint directory, prefix caching
on (vLLM's default; the plugin supplies the block size and block count), `override_neuron_config` passed through
`additional_config`, compiled artifacts in NEURON_COMPILED_ARTIFACTS (default ./neuron-compiled/<model>-<settings
hash>, as vllm-neuron reuses that directory without checking the settings), VLLM_PLUGINS listing `neuron` and
`nxdi_gemma` when set, and the top-level text fields multimodal Gemma 3 configs need under transformers 4.57
(`hf_overrides`, see nxdi_gemma/neuron/vllm_plugin.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from nxdi_gemma.errors import GemmaError
from nxdi_gemma.neuron.vllm_plugin import checkpoint_hf_overrides
from nxdi_gemma.token_match import DEFAULT_PROMPTS

REQUIRED_PLUGINS = ("neuron", "nxdi_gemma")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Gemma checkpoint directory (config.json, safetensors)")
    parser.add_argument("--tp", type=int, default=8, help="tensor parallel degree (NeuronCores)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="max tokens per sequence (NxDI seq_len)")
    parser.add_argument("--max-num-seqs", type=int, default=4, help="batch size (continuous batching when > 1)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--override-neuron-config", default="{}",
                        help='JSON object merged into the NxDI neuron config, e.g. \'{"skip_warmup": true}\'')
    return parser.parse_args(argv)


def compiled_artifacts_dir(args: argparse.Namespace, override: dict) -> str:
    """NEURON_COMPILED_ARTIFACTS if set, else a directory named after every setting that changes the compilation."""
    if os.environ.get("NEURON_COMPILED_ARTIFACTS"):
        return os.environ["NEURON_COMPILED_ARTIFACTS"]
    settings = json.dumps([str(args.model), args.tp, args.max_model_len, args.max_num_seqs, args.dtype, override],
                          sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    name = f"{Path(args.model).name}-tp{args.tp}-len{args.max_model_len}-seqs{args.max_num_seqs}-{digest}"
    return str(Path.cwd() / "neuron-compiled" / name)


def vllm_plugins(current: str | None) -> str:
    """VLLM_PLUGINS with our plugin and vllm-neuron's platform plugin; unset -> exactly those two."""
    if current is None:
        return ",".join(REQUIRED_PLUGINS)
    plugins = [name for name in current.split(",") if name]
    return ",".join(plugins + [name for name in REQUIRED_PLUGINS if name not in plugins])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        override = json.loads(args.override_neuron_config)
    except json.JSONDecodeError as error:
        print(f"error: --override-neuron-config is not JSON ({error})", file=sys.stderr)
        return 2
    if not isinstance(override, dict):
        print("error: --override-neuron-config must be a JSON object", file=sys.stderr)
        return 2
    if os.environ.get("DISABLE_NEURON_CUSTOM_SCHEDULER") == "1":
        print("error: unset DISABLE_NEURON_CUSTOM_SCHEDULER (chunked prefill is not supported by nxdi_gemma)",
              file=sys.stderr)
        return 2
    try:
        hf_overrides = checkpoint_hf_overrides(args.model)
    except GemmaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # vLLM reads both when it creates the engine (plugins) and when vllm-neuron compiles or loads (artifacts).
    os.environ["NEURON_COMPILED_ARTIFACTS"] = compiled_artifacts_dir(args, override)
    os.environ["VLLM_PLUGINS"] = vllm_plugins(os.environ.get("VLLM_PLUGINS"))

    try:
        from vllm import LLM, SamplingParams
    except ImportError as error:
        print(f"error: vLLM is not importable ({error}); on a Neuron instance install vllm-neuron from source at "
              "your SDK's release (0.4.1 with vLLM 0.13.0 for SDK 2.28, 0.5.0 with vLLM 0.16.0 for SDK 2.29; the PyPI "
              "package is a placeholder): see README 'Serving with vLLM on Neuron'", file=sys.stderr)
        return 2

    print(f"compiled artifacts: {os.environ['NEURON_COMPILED_ARTIFACTS']}; VLLM_PLUGINS={os.environ['VLLM_PLUGINS']}; "
          f"hf_overrides={hf_overrides}", file=sys.stderr)
    llm = LLM(
        model=str(args.model),
        tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        dtype=args.dtype,
        hf_overrides=hf_overrides or None,
        additional_config={"override_neuron_config": override},
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)  # greedy
    outputs = llm.generate(DEFAULT_PROMPTS, params)
    for prompt, output in zip(DEFAULT_PROMPTS, outputs, strict=True):
        print("=" * 80)
        print(prompt + output.outputs[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
