"""Serving through the real vLLM and the real vllm-neuron with the project's `nxdi_gemma` plugin: greedy tokens equal
Hugging Face's on every Gemma family and config form, offline (`LLM()`), after a restart from saved artifacts, and
over HTTP through scripts/serve_vllm.sh.

Runs in the simulation tier's environment (vLLM 0.13.0 + vllm-neuron 0.4.1 as Neuron SDK 2.28 ships them,
transformers 4.57; scripts/sim_env.sh) with the NxD / NxDI trees of NXDI_GEMMA_SIM_VLLM_RELEASE (default sdk-2.28;
the tier's `sim` fixture finds them under NXDI_SOURCES). Each vLLM start is a subprocess (vllm_driver.py, or
`vllm serve`) whose processes start with vllm_site/sitecustomize.py: the tier's closed-source stand-ins plus
vllm_standins.py (the /dev/neuron probe says yes; NxDI compile() only saves neuron_config.json; load() is NxDI's
CPU path to_cpu()). Checkpoints and HF goldens come from the tier's make_goldens.py in the reference Python
(NXDI_GEMMA_REFERENCE_PYTHON). TP 1: vllm-neuron drives every core from one process, while NxDI CPU mode needs one
process per rank. vLLM starts are slow, so each start generates all six prompts and cases share starts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

import pytest
from conftest import gemma4_unified_multimodal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SITE = HERE / "vllm_site"
RELEASE = os.environ.get("NXDI_GEMMA_SIM_VLLM_RELEASE", "sdk-2.28")
MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 4  # fewer than the 6 prompts: sequences join and leave the batch while others decode
PROMPT_LENGTHS = [3, 9, 17, 26, 33, 40]  # the tiny models' sliding window is 8
NEW_TOKENS = 16
START_TIMEOUT = 900


def _missing() -> str | None:
    """Why this tier's vLLM tests cannot run here, as one line; None when they can."""
    for package in ("vllm", "vllm-neuron"):
        try:
            version(package)
        except PackageNotFoundError:
            return f"{package} is not installed in this environment (run the tier in the venv of scripts/sim_env.sh)"
    if not any(ep.name == "nxdi_gemma" for ep in entry_points(group="vllm.general_plugins")):
        return "the nxdi_gemma vLLM plugin is not installed here (pip install --no-deps -e . in the tier's venv)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _checkpoints() -> dict[str, dict]:
    """config.json of every case (weights: nxdi_gemma.tiny.random_weights, seed 0, named as each class stores them)."""
    from nxdi_gemma.tiny import TINY_CONFIGS

    def text(kind: str, **changes: object) -> dict:
        return {**{k: v for k, v in TINY_CONFIGS[kind].items() if k != "architectures"}, **changes}

    gemma3 = TINY_CONFIGS["gemma3"]
    full, sliding = gemma3["rope_parameters"]["full_attention"], gemma3["rope_parameters"]["sliding_attention"]
    assert (full["rope_type"], sliding["rope_type"]) == ("linear", "default")
    # The transformers-4 RoPE fields of Gemma 3 checkpoints on the Hub, for the same RoPE.
    hub = {k: v for k, v in gemma3.items() if k != "rope_parameters"}
    hub.update(rope_theta=full["rope_theta"], rope_local_base_freq=sliding["rope_theta"],
               rope_scaling={"rope_type": "linear", "factor": full["factor"]})
    return {
        "gemma2": TINY_CONFIGS["gemma2"],
        "gemma3": gemma3,  # rope_parameters keyed by layer type, as transformers 5 saves it
        "gemma3hub": hub,
        # `nxdi-gemma make-tiny --kind gemma4`: text-only Gemma4ForCausalLM with MoE, PLE, KV sharing, K=V
        "gemma4moe": TINY_CONFIGS["gemma4"],
        # `make-tiny --kind gemma4_unified`: Gemma 4 12B-like text-only save (Gemma4UnifiedForCausalLM, model.*)
        "gemma4unified": TINY_CONFIGS["gemma4_unified"],
        # dense Gemma 4 in the multimodal layout of the Hub's Gemma 4 checkpoints (weights under model.language_model.)
        "gemma4mm": {
            "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "initializer_range": 0.2,
            "tie_word_embeddings": True,
            "text_config": text("gemma4", model_type="gemma4_text", enable_moe_block=False, num_experts=None,
                                top_k_experts=None, moe_intermediate_size=None),
        },
        # Gemma 4 12B-like in its any-to-any layout (Gemma4UnifiedForConditionalGeneration: text weights under
        # model.language_model., tiny vision/audio embedders HF initializes and saves (HF_SAVED); vllm-neuron's
        # MODEL_TYPES key "gemma4unified")
        "gemma4unifiedmm": gemma4_unified_multimodal(TINY_CONFIGS["gemma4_unified"]),
        # multimodal Gemma 3 (text served; weights under language_model.model.), transformers-5 RoPE in text_config
        "gemma3mm": {
            "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "initializer_range": 0.2,
            "tie_word_embeddings": True, "text_config": text("gemma3"),
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
            "mm_tokens_per_image": 4, "boi_token_index": 261, "eoi_token_index": 262, "image_token_index": 263,
        },
    }  # fmt: skip


# Checkpoints re-saved by HF's own class: the 12B-like any-to-any one then holds its vision and audio embedder tensors
# (and HF's full config.json), as a Hub checkpoint does.
HF_SAVED = {"gemma4unifiedmm"}


@pytest.fixture(scope="module")
def cases(sim) -> dict[str, dict]:
    """name -> {"ckpt", "prompts", "tokens" (HF's), "max_tokens" (per prompt), "transformers"}. Every checkpoint gets
    the byte tokenizer.json and no tokenizer_config.json, so transformers must find the tokenizer class from the
    config class (what failed for Gemma 4 before the plugin registered it)."""
    from nxdi_gemma.tiny import byte_tokenizer_json

    sim.need(RELEASE)
    specs = {f"vllm_{name}": {"config": config, "seed": 0, "prompt_lengths": PROMPT_LENGTHS, "prompt_seed": 2026,
                              "new_tokens": NEW_TOKENS, **({"hf_saved": True} if name in HF_SAVED else {})}
             for name, config in _checkpoints().items()}
    out = {}
    for name, case_dir in sim.goldens(specs).items():
        golden = json.loads((case_dir / "golden.json").read_text())
        tokenizer = case_dir / "ckpt" / "tokenizer.json"
        if not tokenizer.exists():
            tokenizer.write_text(byte_tokenizer_json())
        out[name.removeprefix("vllm_")] = {
            "ckpt": case_dir / "ckpt", "prompts": golden["prompts"], "tokens": golden["tokens"],
            "transformers": golden["transformers"],
            # different lengths: slots free up at different steps, so prefills land between other decodes
            "max_tokens": [NEW_TOKENS if i % 2 == 0 else NEW_TOKENS - 5 * i // 2 for i in range(len(PROMPT_LENGTHS))],
        }
    return out


def _env(sim, **extra: str) -> dict[str, str]:
    """The tier's environment for NxDI of RELEASE, with vllm_site first (its sitecustomize replaces the stand-ins'
    own and adds vllm_standins)."""
    env = sim.env(RELEASE, "cpu")
    env.update(PYTHONPATH=os.pathsep.join([str(SITE), env["PYTHONPATH"]]), NXDI_GEMMA_SIM_VLLM="1", HF_HUB_OFFLINE="1",
               # the instance the plugin's HBM check plans for (no EC2 DMI product name here); the tiny models fit
               NXDI_GEMMA_INSTANCE="trn1.2xlarge")
    for name in ("VLLM_PLUGINS", "NEURON_COMPILED_ARTIFACTS", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def _drive(sim, tmp_path: Path, case: dict, name: str, artifacts: Path | None = None, **spec: object) -> dict:
    """One `LLM()` start generating every prompt of `case`; returns the driver's report after asserting that vLLM's
    tokens equal HF's on every prompt and that no closed-source stand-in ran while generating."""
    spec = {"ckpt": str(case["ckpt"]), "prompts": case["prompts"], "max_tokens": case["max_tokens"],
            "max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS, "dtype": "float32", **spec}
    tag = f"{name}-{len(list(tmp_path.glob('*.spec.json')))}"
    spec_path, out_path = tmp_path / f"{tag}.spec.json", tmp_path / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = _env(sim, NEURON_COMPILED_ARTIFACTS=str(artifacts or tmp_path / f"{tag}-artifacts"))
    run = subprocess.run([sys.executable, str(HERE / "vllm_driver.py"), str(spec_path), str(out_path)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=START_TIMEOUT)
    assert run.returncode == 0 and out_path.exists(), f"vLLM run on {name} failed:\n{run.stderr[-6000:]}"
    report = json.loads(out_path.read_text())
    report["stderr"] = run.stderr
    print(f"{name}: vLLM {report['versions']['vllm']}, vllm-neuron {report['versions']['vllm-neuron']}, NxDI {RELEASE}, "
          f"{report['seconds']}")
    want = [tokens[:n] for tokens, n in zip(case["tokens"], case["max_tokens"], strict=True)]
    assert report["tokens"] == want, f"{name}: vLLM greedy tokens differ from HF {case['transformers']}"
    assert report["closed_calls_while_generating"] == []
    assert set(report["model_types"].values()) == {"NeuronGemmaForCausalLM"}
    assert report["model_class"] == "nxdi_gemma.neuron.modeling.NeuronGemmaForCausalLM"
    return report


def _final_norm(case: dict) -> list[float]:
    """HF's final-norm weight w of a checkpoint (Gemma 2/3 norms compute x * (1 + w))."""
    from safetensors import safe_open

    with safe_open(str(case["ckpt"] / "model.safetensors"), "pt") as weights:
        return weights.get_tensor("model.norm.weight").tolist()


def test_gemma2(sim, tmp_path, cases):
    report = _drive(sim, tmp_path, cases["gemma2"], "gemma2")
    assert report["versions"]["transformers"].startswith("4.")  # the tier runs what NxDI pins
    assert any(report["texts"])  # vLLM loaded the tokenizer and detokenized (ids past the byte vocab decode to "")
    assert report["neuron_config"]["fold_norm_offset"] is False  # default: HF's w kept, 1 added at run time
    assert report["final_norm_weight"] == _final_norm(cases["gemma2"])


def test_gemma3_hub_config_and_override_neuron_config(sim, tmp_path, cases):
    """Gemma 3 with the Hub's RoPE fields (rope_theta / rope_local_base_freq / rope_scaling; the transformers-5 form
    of the same checkpoint is served in test_serve_script_over_http), built with
    `additional_config={"override_neuron_config": {"fold_norm_offset": true}}` (vllm-neuron's channel): the model
    holds Gemma's 1 + w folded into the norm weights (test_gemma2 shows the default keeps HF's w); float32 gives HF's
    tokens either way."""
    import torch

    case = cases["gemma3hub"]
    report = _drive(sim, tmp_path, case, "gemma3hub", override_neuron_config={"fold_norm_offset": True})
    assert report["hf_config_class"] == "Gemma3TextRopeCompatConfig"
    assert report["neuron_config"]["fold_norm_offset"] is True
    assert report["final_norm_weight"] == (torch.tensor(_final_norm(case)) + 1.0).tolist()


def test_gemma4_moe_with_tokenizer_then_restart_from_artifacts(sim, tmp_path, cases):
    """`make-tiny --kind gemma4` (MoE, PLE, KV sharing, K=V), whose directory names no tokenizer class: the first
    start loads the tokenizer through the config class the plugin registered and "compiles" into the artifacts
    folder; the second start, without a tokenizer, goes through vllm-neuron's precompiled-load path."""
    artifacts = tmp_path / "artifacts"
    first = _drive(sim, tmp_path, cases["gemma4moe"], "gemma4moe", artifacts=artifacts)
    assert first["hf_config_class"] == "Gemma4TextCompatConfig"
    assert any(first["texts"])  # the tokenizer loaded (what failed before) and detokenized
    assert any(".compile(" in event for event in first["events"])
    assert (artifacts / "neuron_config.json").is_file()
    second = _drive(sim, tmp_path, cases["gemma4moe"], "gemma4moe", artifacts=artifacts, skip_tokenizer_init=True)
    assert not any(".compile(" in event for event in second["events"])  # loaded, not compiled again
    assert any(".load(" in event for event in second["events"])


@pytest.mark.parametrize("name", ["gemma4mm", "gemma3mm", "gemma4unifiedmm"])
def test_multimodal_checkpoints_without_hf_overrides(sim, tmp_path, cases, name):
    """Gemma4ForConditionalGeneration (dense), Gemma3ForConditionalGeneration (transformers-5 RoPE in text_config)
    and Gemma4UnifiedForConditionalGeneration (Gemma 4 12B-like, with vision and audio embedders; vllm-neuron's
    MODEL_TYPES key "gemma4unified"), served text-only by `LLM(model=DIR, ...)` with neither hf_overrides nor
    limit_mm_per_prompt: the plugin's serving check supplies both (the tiny checkpoints have no image processor,
    which vLLM would load for image inputs)."""
    report = _drive(sim, tmp_path, cases[name], name)
    assert report["hf_config_class"] == {"gemma4mm": "Gemma4CompatConfig", "gemma3mm": "Gemma3RopeCompatConfig",
                                         "gemma4unifiedmm": "Gemma4UnifiedCompatConfig"}[name]


def test_gemma4_unified_text_only(sim, tmp_path, cases):
    """Gemma 4 12B-like in its text-only save (`gemma4_unified_text`, Gemma4UnifiedForCausalLM, weights under
    `model.`): global layers with one KV head of twice the head dim and K=V, sliding layers GQA, final softcap."""
    report = _drive(sim, tmp_path, cases["gemma4unified"], "gemma4unified")
    assert report["hf_config_class"] == "Gemma4UnifiedTextCompatConfig"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _post_error(url: str, body: dict) -> tuple[int, str]:
    """(HTTP status, body) of a request the server must refuse."""
    try:
        _post(url, body)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    raise AssertionError(f"{url} accepted {body}")


@contextlib.contextmanager
def _serving(cmd: list[str], env: dict[str, str], tmp_path: Path):
    """A server started with `cmd` (in its own session), yielding its base URL once /v1/models answers; stopped on
    exit. `env` must hold PORT."""
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert server.poll() is None, f"{cmd[1]} exited ({server.returncode}):\n" + log_path.read_text()[-6000:]
            try:
                urllib.request.urlopen(f"{base}/v1/models", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not answer in time"
                time.sleep(2)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _complete_all(base: str, case: dict, model: str) -> list[list[int]]:
    """Every prompt of `case` sent concurrently to /v1/completions as token ids; the generated token ids."""

    def complete(i: int) -> list[int]:
        body = {"model": model, "prompt": case["prompts"][i], "temperature": 0, "max_tokens": case["max_tokens"][i],
                "ignore_eos": True, "return_token_ids": True}
        return _post(f"{base}/v1/completions", body)["choices"][0]["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(len(case["prompts"])) as pool:
        return list(pool.map(complete, range(len(case["prompts"]))))


def _prefix_cache_queries(base: str) -> float:
    """vLLM's prefix-cache lookups so far (prompt tokens looked up), from /metrics: counted only when prefix caching
    is on (vLLM 0.13.0 / 0.16.0 `vllm:prefix_cache_queries`)."""
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    found = re.findall(r"^vllm:prefix_cache_queries_total\{[^}]*\} ([0-9.e+]+)$", metrics, re.MULTILINE)
    return float(found[0]) if found else 0.0


def _want(case: dict) -> list[list[int]]:
    return [tokens[:n] for tokens, n in zip(case["tokens"], case["max_tokens"], strict=True)]


def _vllm_command() -> Path:
    vllm = Path(sys.executable).parent / "vllm"
    assert vllm.exists(), "the vllm command of this environment is needed"
    return vllm


def test_serve_script_over_http(sim, tmp_path, cases):
    """scripts/serve_vllm.sh (`vllm serve` with the settings the README documents) on 127.0.0.1 with the Gemma 3
    checkpoint whose config.json transformers 5 wrote (rope_parameters keyed by layer type, which vLLM rejects under
    transformers 4.57 unless the plugin rewrites it), the six prompts sent concurrently to /v1/completions as token
    ids: HF's greedy tokens on every one."""
    case = cases["gemma3"]
    bash, vllm = shutil.which("bash"), _vllm_command()
    assert bash, "bash is needed"
    env = _env(sim, MODEL=str(case["ckpt"]), TP="1", MAX_MODEL_LEN=str(MAX_MODEL_LEN), MAX_NUM_SEQS=str(MAX_NUM_SEQS),
               DTYPE="float32", OVERRIDE_NEURON_CONFIG='{"on_cpu": true}', HOST="127.0.0.1", PORT=str(_free_port()),
               PYTHON=sys.executable, PATH=f"{vllm.parent}{os.pathsep}{os.environ['PATH']}")
    with _serving([bash, str(ROOT / "scripts" / "serve_vllm.sh")], env, tmp_path) as base:
        got = _complete_all(base, case, str(case["ckpt"]))
        queries = _prefix_cache_queries(base)
    assert got == _want(case)
    assert queries >= sum(map(len, case["prompts"])), queries  # prefix caching on (vLLM's default)
    served_log = (tmp_path / "serve.log").read_text()
    assert "vllm_neuron._is_neuron_dev -> True" in served_log  # served by vllm-neuron's platform, stand-ins active


PREFIX_BLOCK = 8  # vLLM's --block-size; the tiny models' window is 8 too
PREFIX_LENGTHS = [60, 67, 74, 81]  # all start with the same 56 tokens: 7 blocks, 7 windows
PREFIX_SHARED = 56
PREFIX_MAX_FED = 0.35  # of the prompt tokens, in the second round


@pytest.fixture(scope="module")
def prefix_cases(sim) -> dict[str, dict]:
    """HF goldens of prompts sharing a long prefix, for one checkpoint per family (the tiny Gemma 4 has PLE, KV
    sharing, K=V and MoE; the Gemma 4 12B-like one K=V global layers with 1 KV head of twice the head dim) and Gemma 3
    with the transformers-4 config the Hub's checkpoints publish."""
    sim.need(RELEASE)
    configs = _checkpoints()
    specs = {f"vllm_prefix_{name}": {"config": configs[name], "seed": 0, "prompt_lengths": PREFIX_LENGTHS,
                                     "prompt_seed": 2027, "shared_prefix": PREFIX_SHARED, "new_tokens": NEW_TOKENS}
             for name in ("gemma2", "gemma3", "gemma3hub", "gemma4moe", "gemma4unified")}
    out = {}
    for name, case_dir in sim.goldens(specs).items():
        golden = json.loads((case_dir / "golden.json").read_text())
        out[name.removeprefix("vllm_prefix_")] = {
            "ckpt": case_dir / "ckpt", "prompts": golden["prompts"], "tokens": golden["tokens"],
            "transformers": golden["transformers"], "max_tokens": [NEW_TOKENS] * len(PREFIX_LENGTHS)}
    return out


@pytest.mark.parametrize("name", ["gemma3", "gemma3hub", "gemma4moe", "gemma4unified",
                                  pytest.param("gemma2", marks=pytest.mark.slow)])
def test_prefix_caching_on(sim, tmp_path, prefix_cases, name, sim_report):
    """vLLM's default prefix caching left on, --block-size 8 (vllm-neuron then sets is_block_kv_layout and
    is_prefix_caching): four prompts sharing 7 blocks, sent concurrently (max_num_seqs 4), twice. HF's greedy tokens
    on every request of both rounds; in the second round vLLM reports cached tokens and the NxDI context-encoding
    model is fed at most 35% of the prompt tokens (NxDI's 16-token prefill bucket recomputes a few cached ones)."""
    case = prefix_cases[name]
    buckets = {"context_encoding_buckets": [16, MAX_MODEL_LEN], "prefix_buckets": [MAX_MODEL_LEN],
               "token_generation_buckets": [MAX_MODEL_LEN]}
    report = _drive(sim, tmp_path, case, f"prefix_{name}", enable_prefix_caching=True, block_size=PREFIX_BLOCK,
                    rounds=2, override_neuron_config=buckets, skip_tokenizer_init=True)
    assert report["neuron_config"]["is_prefix_caching"] and report["neuron_config"]["is_block_kv_layout"]
    want = [tokens[:n] for tokens, n in zip(case["tokens"], case["max_tokens"], strict=True)]
    first, second = report["rounds"]
    assert first["tokens"] == want and second["tokens"] == want
    total = sum(map(len, case["prompts"]))
    assert all(n and n >= PREFIX_SHARED for n in second["cached_tokens"]), second["cached_tokens"]
    assert second["prefill_tokens"] <= PREFIX_MAX_FED * total, (second, total)
    sim_report(f"vLLM prefix caching {name} {RELEASE}",
               f"vLLM {report['versions']['vllm']} + vllm-neuron {report['versions']['vllm-neuron']}: prefill tokens fed: round 1 {first['prefill_tokens']}, round 2 {second['prefill_tokens']} of {total}"
               f" (vLLM cached {sum(second['cached_tokens'])})")


# The simulation's own settings, and nothing else: NxDI's CPU mode (on_cpu) and float32 (HF's goldens are float32).
SIM_SETTINGS = ["--dtype", "float32", "--additional-config", json.dumps({"override_neuron_config": {"on_cpu": True}})]


def test_plainest_serve_multimodal_over_http(sim, tmp_path, cases):
    """`vllm serve DIR --max-model-len N` plus only the simulation's settings, on the multimodal Gemma 3 checkpoint
    without --hf-overrides: prefix caching stays on (vLLM's default; the plugin supplies --block-size and
    --num-gpu-blocks-override, so vllm-neuron runs NxDI's block KV layout), the serving check supplies the text
    fields, and vLLM's default max_num_seqs (256) fits the trn1.2xlarge the tier names (NXDI_GEMMA_INSTANCE), so it
    is the NxDI batch. HF's greedy tokens on every prompt."""
    case = cases["gemma3mm"]
    port = _free_port()
    env = _env(sim, PORT=str(port), VLLM_PLUGINS="neuron,nxdi_gemma")
    cmd = [str(_vllm_command()), "serve", str(case["ckpt"]), "--port", str(port), "--max-model-len",
           str(MAX_MODEL_LEN), *SIM_SETTINGS]
    with _serving(cmd, env, tmp_path) as base:
        got = _complete_all(base, case, str(case["ckpt"]))
        queries = _prefix_cache_queries(base)
    assert got == _want(case)
    assert queries >= sum(map(len, case["prompts"])), queries  # prefix caching on


def _public_config_dir(tmp_path: Path, name: str) -> Path:
    """A checkpoint directory with only the public `name`'s config.json (and the byte tokenizer): enough for vLLM to
    build its config, so a refusal before any weight is read or graph compiled can use real model sizes."""
    from nxdi_gemma.public_models import public_config
    from nxdi_gemma.tiny import byte_tokenizer_json

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(public_config(name)))
    (folder / "tokenizer.json").write_text(byte_tokenizer_json())
    return folder


def _hbm_refusal() -> list[str]:
    """What the "hbm" refusal must name: the planner's figures for Gemma 3 4B at TP 2 x 4096 x batch 256 (vLLM's
    default) in the block KV layout of prefix caching (block size 32, the plugin's default), on trn1.32xlarge."""
    from nxdi_gemma.planning import GIB, largest_fit, memory_plan
    from nxdi_gemma.public_models import public_plan

    plan = public_plan("gemma-3-4b")
    # vllm-neuron prefills one sequence per context-encoding call (ctx_batch_size 1)
    need = memory_plan(plan, "trn1.32xlarge", 2, 256, 4096, "bfloat16", 32, prefill_batch=1)
    _, fitting = largest_fit(plan, "trn1.32xlarge", 2, "bfloat16", 4096, 32, prefill_batch=1)
    assert not need.fits and fitting
    return [f"{need.total_per_core / GIB:.1f} GiB per NeuronCore", "block KV layout: 32768 blocks of 32",
            "of trn1.32xlarge's 16.0 GiB", f"pass --max-num-seqs {fitting} or less"]


SPECULATION = json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
# name -> (vllm serve arguments after the model, environment changes (None: unset), what the error line names)
REFUSALS = {
    # Gemma 3 4B (config.json only) at TP 2 x 4096 on trn1.32xlarge with vLLM's defaults (batch 256, prefix caching
    # on), in the checkpoint's own dtype (bfloat16)
    "hbm": (["--tensor-parallel-size", "2", "--max-model-len", "4096"], {"NXDI_GEMMA_INSTANCE": "trn1.32xlarge"},
            None),
    # no NXDI_GEMMA_INSTANCE and no EC2 DMI product name: which HBM to plan for is not guessed
    "instance": (["--max-model-len", str(MAX_MODEL_LEN), *SIM_SETTINGS], {"NXDI_GEMMA_INSTANCE": None},
                 ["NXDI_GEMMA_INSTANCE"]),
    # an unsupported neuron-config flag (GemmaNeuronConfig's UNSUPPORTED_FLAGS) in override_neuron_config
    "flag": (["--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--additional-config",
              json.dumps({"override_neuron_config": {"on_cpu": True, "flash_decoding_enabled": True}})], {},
             ["override_neuron_config sets flash_decoding_enabled"]),
    # vLLM speculation: vllm-neuron would set enable_fused_speculation
    "speculation": (["--max-model-len", str(MAX_MODEL_LEN), *SIM_SETTINGS, "--speculative-config", SPECULATION], {},
                    ["--speculative-config"]),
    # vllm-neuron keeps vLLM's chunked prefill with this variable: is_chunked_prefill
    "chunked_prefill": (["--max-model-len", str(MAX_MODEL_LEN), *SIM_SETTINGS],
                        {"DISABLE_NEURON_CUSTOM_SCHEDULER": "1"}, ["DISABLE_NEURON_CUSTOM_SCHEDULER"]),
    # LoRA on Neuron without vllm-neuron's lora_ckpt_json
    "lora_json": (["--max-model-len", str(MAX_MODEL_LEN), *SIM_SETTINGS, "--enable-lora"], {}, ["lora_ckpt_json"]),
    # LoRA on the Gemma 4 MoE checkpoint (not exact yet: test_lora.py's gemma4 case)
    "lora_moe": (["--max-model-len", str(MAX_MODEL_LEN), *SIM_SETTINGS, "--enable-lora"], {},
                 ["--enable-lora is not supported on Gemma 4 MoE"]),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name == "hbm" else [pytest.mark.slow])
                                  for name in REFUSALS])
def test_refused_before_compile(sim, tmp_path, cases, name):
    """A configuration our serving check refuses: `vllm serve` ends before anything is built, with one `error:` line
    from our code as its last line, exit 1, no traceback. (About a minute per vLLM start: only "hbm" runs in CI.)"""
    args, extra, wanted = REFUSALS[name]
    wanted = _hbm_refusal() if wanted is None else wanted
    model = (_public_config_dir(tmp_path, "gemma-3-4b") if name == "hbm" else
             cases["gemma4moe" if name == "lora_moe" else "gemma3"]["ckpt"])
    env = _env(sim, VLLM_PLUGINS="neuron,nxdi_gemma")
    for key, value in extra.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    started = time.monotonic()
    run = subprocess.run([str(_vllm_command()), "serve", str(model), *args], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=START_TIMEOUT)
    lines = run.stderr.strip().splitlines()
    # vLLM's API server prefixes what its process prints with "(APIServer pid=N) " (in color)
    last = re.sub(r"^(\x1b\[[0-9;]*m)?\(APIServer pid=\d+\)(\x1b\[[0-9;]*m)? ", "", lines[-1] if lines else "")
    print(f"{name}: exit {run.returncode} after {time.monotonic() - started:.0f} s: {last}")
    assert run.returncode == 1, f"{name}: exit {run.returncode}\n{run.stderr[-4000:]}"
    assert last.startswith("error: "), f"{name}: last line {last!r}\n{run.stderr[-4000:]}"
    for want in wanted:
        assert any(option in last for option in want.split("|")), f"{name}: {want!r} not in {last!r}"
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, f"{name}:\n{run.stderr[-4000:]}"
    assert ".compile(" not in run.stderr and ".load(" not in run.stderr  # no NxDI model was built


# adapter listed in lora_ckpt_json -> what the error line dropping it names
BAD_ADAPTERS = {"missing": "no adapter_config.json and *.safetensors", "r16": "rank 16, above --max-lora-rank 8",
                "head": "targets ['lm_head']"}


def _bad_adapters(tmp_path: Path, adapters: Path) -> dict[str, str]:
    """Adapters NxDI cannot serve next to a4 / a8 (BAD_ADAPTERS): a path with nothing there, a8 declaring rank 16,
    a4 also targeting lm_head. Returns their lora_ckpt_json paths."""
    for name, source, change in (("r16", "a8", {"r": 16}), ("head", "a4", {"target_modules": ["q_proj", "lm_head"]})):
        shutil.copytree(adapters / source, tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
    return {"missing": str(tmp_path / "nowhere"), "r16": str(tmp_path / "r16"), "head": str(tmp_path / "head")}


def _dropped_lines(log: str) -> dict[str, str]:
    """The serving check's error line for each adapter it dropped, by adapter name."""
    lines = re.findall(r"error: LoRA adapter '(\w+)' in \S+ is not served: ([^\n]*)", log)
    return {name: reason for name, reason in lines}


def _lora_case(sim, tmp_path: Path, kind: str = "gemma3") -> tuple[dict, dict]:
    """The LoRA golden of test_lora.py (Gemma 3, adapters a4 and a8 made by PEFT) as a vLLM case: every prompt with
    each adapter and with "base", a copy of a4 whose B matrices are zero (NxDI serves only requests with an adapter,
    and vllm-neuron 0.4.1 fails on a request without one: this is how the base model is served next to adapters).
    Returns the case (prompts, tokens, max_tokens, ckpt) and the driver's lora spec."""
    import torch
    from safetensors.torch import load_file, save_file
    from test_lora import _spec

    from nxdi_gemma.tiny import byte_tokenizer_json

    (case_dir,) = sim.goldens(_spec(kind)).values()
    golden = json.loads((case_dir / "golden.json").read_text())
    if not (case_dir / "ckpt" / "tokenizer.json").exists():
        (case_dir / "ckpt" / "tokenizer.json").write_text(byte_tokenizer_json())
    base = tmp_path / "base"
    shutil.copytree(case_dir / "adapters" / "a4", base)
    weights = load_file(str(base / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(base / "adapter_model.safetensors"))
    dirs = {"a4": case_dir / "adapters" / "a4", "a8": case_dir / "adapters" / "a8", "base": base}
    want = {"a4": golden["adapters"]["a4"]["tokens"], "a8": golden["adapters"]["a8"]["tokens"],
            "base": golden["tokens"]}
    order = [(name, i) for i in range(len(golden["prompts"])) for name in ("a4", "base", "a8")]
    ckpt_json = tmp_path / "lora.json"
    paths = {name: str(path) for name, path in dirs.items()}
    listed = {**paths, **_bad_adapters(tmp_path, case_dir / "adapters")}
    ckpt_json.write_text(json.dumps({"lora-ckpt-dir": str(tmp_path), "lora-ckpt-paths": listed,
                                     "lora-ckpt-paths-cpu": listed}))
    case = {"ckpt": case_dir / "ckpt", "prompts": [golden["prompts"][i] for _, i in order],
            "tokens": [want[name][i] for name, i in order], "max_tokens": [golden["new_tokens"]] * len(order),
            "transformers": golden["transformers"]}
    lora = {"max_loras": len(dirs), "max_lora_rank": 8, "ckpt_json": str(ckpt_json),
            "adapters": [[name, paths[name]] for name, _ in order]}
    return case, lora


@pytest.mark.parametrize("kind", ["gemma3", pytest.param("gemma4_dense", marks=pytest.mark.slow)])
def test_lora_adapters_and_base_in_one_batch(sim, tmp_path, kind):
    """`LLM(..., enable_lora=True, max_loras=3, max_lora_rank=8)` with vllm-neuron's lora_ckpt_json naming adapters
    a4 (rank 4), a8 (rank 8) and the zero adapter "base": six requests, 4 at a time, mixing them; each request's
    greedy tokens equal HF with its adapter merged by PEFT (base: plain HF). vllm-neuron turns on NxDI's dynamic
    multi-LoRA (max_cpu_loras defaults to max_loras), whose adapter swaps vllm_standins directs to the CPU model.
    lora_ckpt_json also lists three adapters NxDI cannot serve (BAD_ADAPTERS): each is dropped with one error line
    and the start goes on; vLLM's default prefix caching is asked for and turned off by the plugin."""
    case, lora = _lora_case(sim, tmp_path, kind)
    report = _drive(sim, tmp_path, case, f"lora_{kind}", lora=lora, enable_prefix_caching=True)
    assert any("dynamic multi-LoRA" in event for event in report["events"])
    # vLLM's default prefix caching, turned off by the plugin with LoRA (see vllm_plugin.serving_check)
    assert not report["neuron_config"]["is_prefix_caching"] and "prefix caching turned off" in report["stderr"]
    dropped = _dropped_lines(report["stderr"])
    assert set(dropped) == set(BAD_ADAPTERS), report["stderr"][-4000:]
    for name, reason in BAD_ADAPTERS.items():
        assert reason in dropped[name] and "serving the others (a4, a8, base)" in dropped[name]


@pytest.mark.slow  # CI time: LoRA through LLM() runs in CI; this adds a second vLLM start
def test_lora_over_http(sim, tmp_path):
    """`vllm serve DIR --max-model-len N --enable-lora --max-loras 3 --max-lora-rank 8 --lora-modules a4=.. a8=..
    base=..` (+ the simulation's settings, lora_ckpt_json): the six requests of the LoRA case sent at once to
    /v1/completions with `"model": <adapter name>`, each gives HF's tokens with its adapter merged by PEFT. The
    adapters lora_ckpt_json lists but NxDI cannot serve are dropped at start (one error line each); a request for
    one is vLLM's 404 and loading it at run time a 400 naming why, and the server keeps serving."""
    case, lora = _lora_case(sim, tmp_path)
    port = _free_port()
    modules = sorted({f"{name}={path}" for name, path in lora["adapters"]})
    extra = {"override_neuron_config": {"on_cpu": True, "lora_ckpt_json": lora["ckpt_json"]}}
    cmd = [str(_vllm_command()), "serve", str(case["ckpt"]), "--port", str(port), "--max-model-len",
           str(MAX_MODEL_LEN), "--dtype", "float32", "--additional-config", json.dumps(extra),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--enable-lora", "--max-loras", str(lora["max_loras"]),
           "--max-lora-rank", str(lora["max_lora_rank"]), "--lora-modules", *modules]
    env = _env(sim, PORT=str(port), VLLM_PLUGINS="neuron,nxdi_gemma", VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    with _serving(cmd, env, tmp_path) as base:
        # a dropped adapter: vLLM's API does not know it (404), and loading it at run time is refused naming why
        missing = _post_error(f"{base}/v1/completions", {"model": "r16", "prompt": [5, 6], "max_tokens": 2})
        refused = _post_error(f"{base}/v1/load_lora_adapter", {"lora_name": "r16", "lora_path": str(tmp_path / "r16")})

        def complete(i: int) -> list[int]:
            body = {"model": lora["adapters"][i][0], "prompt": case["prompts"][i], "temperature": 0,
                    "max_tokens": case["max_tokens"][i], "ignore_eos": True, "return_token_ids": True}
            return _post(f"{base}/v1/completions", body)["choices"][0]["token_ids"]

        with concurrent.futures.ThreadPoolExecutor(len(case["prompts"])) as pool:
            got = list(pool.map(complete, range(len(case["prompts"]))))
        queries = _prefix_cache_queries(base)
    assert got == _want(case)  # served after the refusals, by the same engine
    assert queries == 0  # the plugin turned vLLM's default prefix caching off (LoRA)
    assert missing[0] == 404 and "r16" in missing[1], missing
    assert refused[0] == 400 and "LoRA adapter 'r16' is not served: rank 16, above --max-lora-rank 8" in refused[1]
    assert set(_dropped_lines((tmp_path / "serve.log").read_text())) == set(BAD_ADAPTERS)


@pytest.mark.skipif(RELEASE != "sdk-2.29", reason="draft-model speculation needs vLLM 0.16 + vllm-neuron 0.5.0 "
                                                  "(NXDI_GEMMA_SIM_VLLM_RELEASE=sdk-2.29 in their venv); vLLM 0.13 "
                                                  "refuses it")
@pytest.mark.parametrize(("target", "draft"), [("gemma3", "self"), ("gemma4moe", "gemma3")])
def test_speculative_config_draft_model(sim, tmp_path, cases, sim_report, target, draft):
    """`speculative_config={"method": "draft_model", "model": DRAFT, "num_speculative_tokens": 4}`: vllm-neuron 0.5
    builds NxDI fused speculation with our class as target and draft (the draft's neuron config copied from the
    target's). HF's greedy tokens on every prompt; the target as its own draft, four sequences decoding together:
    <= 0.3 fused calls per generated token (1/(K+1) = 0.2 plus the step after each prefill). The other pair: a
    Gemma 3 draft for a Gemma 4 K=V + MoE + PLE + KV-sharing target, six prompts through four slots."""
    case = cases[target]
    if draft == "self":  # four prompts, all in the batch from the start, 16 new tokens each
        case = dict(case, prompts=case["prompts"][:4], tokens=case["tokens"][:4], max_tokens=[NEW_TOKENS] * 4)
    model = case["ckpt"] if draft == "self" else cases[draft]["ckpt"]
    report = _drive(sim, tmp_path, case, f"{target}-draft-{draft}",
                    speculative_config={"method": "draft_model", "model": str(model), "num_speculative_tokens": 4},
                    skip_tokenizer_init=True)
    fused = report["model_calls"].get("fused_speculation_model", 0)
    per_token = fused / max(case["max_tokens"])
    sim_report(f"vllm 0.16 speculation {target} draft={draft} K=4",
               f"model calls {report['model_calls']}, fused calls per generated token {per_token:.3f}")
    assert fused > 0, "no fused speculation step ran"
    if draft == "self":
        assert per_token <= 0.3, f"{fused} fused calls for {max(case['max_tokens'])} tokens per sequence"
