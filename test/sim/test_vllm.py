"""Serving through the real vLLM and the real vllm-neuron with the project's `nxdi_gemma` plugin: greedy tokens equal
Hugging Face's on every Gemma family and config form, offline (`LLM()`), after a restart from saved artifacts, and
over HTTP through scripts/serve_vllm.sh.

Runs in the simulation tier's environment (vLLM 0.13.0 + vllm-neuron 0.4.1 for SDK 2.28, transformers 4.57, NxD and
NxDI sources; see scripts/sim_env.sh). Each vLLM start is a subprocess (vllm_driver.py, or `vllm serve`) whose
processes start with vllm_site/sitecustomize.py: the tier's closed-source stand-ins plus vllm_standins.py (the
/dev/neuron probe says yes; NxDI compile() only saves neuron_config.json; load() is NxDI's CPU path to_cpu()). The
HF goldens come from the reference Python (NXDI_GEMMA_REFERENCE_PYTHON, transformers >= 5) through
vllm_fixtures.py. TP 1: vllm-neuron drives every core from one process, while NxDI CPU mode needs a process per rank.

Environment: NXDI_SOURCES (default ../shared/nxdi-src beside the repository) and NXDI_GEMMA_SIM_RELEASE (default
sdk-2.28) select the NxD / NxDI trees; NXDI_GEMMA_REFERENCE_PYTHON the HF reference; NXDI_GEMMA_SIM_VLLM_WORK
(optional) a folder to keep checkpoints and goldens between runs.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SITE = HERE / "vllm_site"
MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 4  # fewer than the 6 prompts: sequences join and leave the batch while others decode
START_TIMEOUT = 900


def _missing() -> str | None:
    """Why this tier's vLLM tests cannot run here, as one line; None when they can."""
    for package in ("vllm", "vllm-neuron"):
        try:
            version(package)
        except PackageNotFoundError:
            return f"{package} is not installed in this environment (build the tier's environment: scripts/sim_env.sh)"
    if not any(ep.name == "nxdi_gemma" for ep in entry_points(group="vllm.general_plugins")):
        return "the nxdi_gemma vLLM plugin is not installed here (pip install --no-deps -e . in the tier's environment)"
    if not _nxdi_src("neuronx-distributed-inference").is_dir():
        return (f"no NxDI source at {_nxdi_src('neuronx-distributed-inference')}: set NXDI_SOURCES to a folder laid out "
                "like ../shared/nxdi-src (<release>/neuronx-distributed[-inference]/src)")
    reference = os.environ.get("NXDI_GEMMA_REFERENCE_PYTHON")
    if not reference or not Path(reference).exists():
        return "set NXDI_GEMMA_REFERENCE_PYTHON to a Python with transformers >= 5 and the project (HF goldens)"
    return None


def _nxdi_src(repo: str) -> Path:
    sources = Path(os.environ.get("NXDI_SOURCES") or ROOT.parent / "shared" / "nxdi-src")
    return sources / os.environ.get("NXDI_GEMMA_SIM_RELEASE", "sdk-2.28") / repo / "src"


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _env(**extra: str) -> dict[str, str]:
    path = [str(SITE), str(_nxdi_src("neuronx-distributed")), str(_nxdi_src("neuronx-distributed-inference"))]
    env = dict(os.environ, NXDI_GEMMA_SIM_VLLM="1", NXDI_GEMMA_SIM_MODE="cpu", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(path + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for name in ("VLLM_PLUGINS", "NEURON_COMPILED_ARTIFACTS", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """Checkpoints and HF goldens, made once by the reference Python."""
    work = os.environ.get("NXDI_GEMMA_SIM_VLLM_WORK")
    out = Path(work) if work else tmp_path_factory.mktemp("vllm-fixtures")
    run = subprocess.run([os.environ["NXDI_GEMMA_REFERENCE_PYTHON"], str(HERE / "vllm_fixtures.py"), str(out)],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"vllm_fixtures.py failed:\n{run.stdout}\n{run.stderr[-4000:]}"
    return out


def _golden(fixtures: Path, name: str) -> dict:
    golden = json.loads((fixtures / f"{name}.golden.json").read_text())
    n_new = len(golden["tokens"][0])
    golden["max_tokens"] = [n_new if i % 2 == 0 else max(1, n_new - 5 * i) for i in range(len(golden["prompts"]))]
    return golden


def _drive(tmp_path: Path, fixtures: Path, name: str, artifacts: Path | None = None, **spec: object) -> dict:
    """One `LLM()` start on checkpoint `name` generating every golden prompt; returns the driver's report after
    asserting that vLLM's tokens equal HF's on every prompt and that no closed-source stand-in ran while generating."""
    golden = _golden(fixtures, name)
    spec = {"ckpt": str(fixtures / name), "prompts": golden["prompts"], "max_tokens": golden["max_tokens"],
            "max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS, "dtype": "float32", **spec}
    spec_path, out_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = _env(NEURON_COMPILED_ARTIFACTS=str(artifacts or tmp_path / f"{name}-artifacts"))
    run = subprocess.run([sys.executable, str(HERE / "vllm_driver.py"), str(spec_path), str(out_path)], env=env,
                         capture_output=True, text=True, timeout=START_TIMEOUT)
    assert run.returncode == 0 and out_path.exists(), f"vLLM run on {name} failed:\n{run.stderr[-6000:]}"
    report = json.loads(out_path.read_text())
    want = [tokens[:n] for tokens, n in zip(golden["tokens"], golden["max_tokens"], strict=True)]
    assert report["tokens"] == want, f"{name}: vLLM greedy tokens differ from HF {golden['transformers']}"
    assert report["closed_calls_while_generating"] == []
    assert set(report["model_types"].values()) == {"NeuronGemmaForCausalLM"}
    assert report["model_class"] == "nxdi_gemma.neuron.modeling.NeuronGemmaForCausalLM"
    return report


def _final_norm(fixtures: Path, name: str) -> list[float]:
    """HF's final-norm weight w of a checkpoint (Gemma 2/3 norms compute x * (1 + w))."""
    from safetensors import safe_open

    with safe_open(str(fixtures / name / "model.safetensors"), "pt") as weights:
        return weights.get_tensor("model.norm.weight").tolist()


def test_gemma2(tmp_path, fixtures):
    report = _drive(tmp_path, fixtures, "gemma2")
    assert report["versions"]["transformers"].startswith("4.")  # the tier runs what NxDI pins
    assert all(text for text in report["texts"])  # the byte tokenizer decoded every continuation
    assert report["neuron_config"]["fold_norm_offset"] is False  # default: HF's w kept, 1 added at run time
    assert report["final_norm_weight"] == _final_norm(fixtures, "gemma2")


@pytest.mark.parametrize("name", ["gemma3", "gemma3hub"])
def test_gemma3_transformers5_and_hub_configs(tmp_path, fixtures, name):
    """Same weights and RoPE: rope_parameters keyed by layer type (what transformers 5 saves, which vLLM >= 0.13
    rejects under transformers 4.57 unless the plugin rewrites it) and the Hub's rope_theta / rope_local_base_freq /
    rope_scaling fields."""
    report = _drive(tmp_path, fixtures, name)
    assert report["hf_config_class"] == "Gemma3TextRopeCompatConfig"


def test_gemma4_moe_with_tokenizer_then_restart_from_artifacts(tmp_path, fixtures):
    """`make-tiny --kind gemma4` (MoE, PLE, KV sharing, K=V), whose directory names no tokenizer class: the first
    start loads the tokenizer through the config class the plugin registered and "compiles" into the artifacts
    folder; the second start, without a tokenizer, goes through vllm-neuron's precompiled-load path."""
    artifacts = tmp_path / "artifacts"
    first = _drive(tmp_path, fixtures, "gemma4moe", artifacts=artifacts)
    assert first["hf_config_class"] == "Gemma4TextCompatConfig"
    assert all(text for text in first["texts"])
    assert any(".compile(" in event for event in first["events"])
    assert (artifacts / "neuron_config.json").is_file()
    second = _drive(tmp_path, fixtures, "gemma4moe", artifacts=artifacts, skip_tokenizer_init=True)
    assert not any(".compile(" in event for event in second["events"])  # loaded, not compiled again
    assert any(".load(" in event for event in second["events"])


@pytest.mark.parametrize("name", ["gemma4mm", "gemma3mm"])
def test_multimodal_checkpoints_with_hf_overrides(tmp_path, fixtures, name):
    """Gemma4ForConditionalGeneration (dense) and Gemma3ForConditionalGeneration (transformers-5 RoPE in
    text_config), served text-only with the plugin's hf_overrides, as scripts/serve_vllm.sh passes them."""
    report = _drive(tmp_path, fixtures, name, hf_overrides=True, limit_images=True)
    assert report["hf_config_class"] == {"gemma4mm": "Gemma4CompatConfig", "gemma3mm": "Gemma3RopeCompatConfig"}[name]


def test_override_neuron_config_reaches_the_built_model(tmp_path, fixtures):
    """`additional_config={"override_neuron_config": {"fold_norm_offset": true}}` (vllm-neuron's channel) builds the
    model with Gemma's +1 folded into the norm weights (test_gemma2 shows the default keeps HF's w); float32 gives
    the same tokens either way."""
    import torch

    report = _drive(tmp_path, fixtures, "gemma2", override_neuron_config={"fold_norm_offset": True})
    assert report["neuron_config"]["fold_norm_offset"] is True
    assert report["final_norm_weight"] == (torch.tensor(_final_norm(fixtures, "gemma2")) + 1.0).tolist()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def test_serve_script_over_http(tmp_path, fixtures):
    """scripts/serve_vllm.sh (`vllm serve` with the settings the README documents) on 127.0.0.1, the six prompts
    sent concurrently to /v1/completions as token ids: HF's greedy tokens on every one."""
    name = "gemma3"
    golden = _golden(fixtures, name)
    bash, vllm = shutil.which("bash"), Path(sys.executable).parent / "vllm"
    assert bash and vllm.exists(), "bash and the vllm command of this environment are needed"
    port = _free_port()
    env = _env(MODEL=str(fixtures / name), TP="1", MAX_MODEL_LEN=str(MAX_MODEL_LEN), MAX_NUM_SEQS=str(MAX_NUM_SEQS),
               DTYPE="float32", OVERRIDE_NEURON_CONFIG='{"on_cpu": true}', HOST="127.0.0.1", PORT=str(port),
               PYTHON=sys.executable, PATH=f"{vllm.parent}{os.pathsep}{os.environ['PATH']}")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([bash, str(ROOT / "scripts" / "serve_vllm.sh")], env=env, cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert server.poll() is None, f"serve_vllm.sh exited ({server.returncode}):\n" + \
                (tmp_path / "serve.log").read_text()[-6000:]
            try:
                urllib.request.urlopen(f"{base}/v1/models", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not answer in time"
                time.sleep(2)

        def complete(i: int) -> list[int]:
            body = {"model": str(fixtures / name), "prompt": golden["prompts"][i], "temperature": 0,
                    "max_tokens": golden["max_tokens"][i], "ignore_eos": True, "return_token_ids": True}
            return _post(f"{base}/v1/completions", body)["choices"][0]["token_ids"]

        with concurrent.futures.ThreadPoolExecutor(len(golden["prompts"])) as pool:
            got = list(pool.map(complete, range(len(golden["prompts"]))))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    want = [tokens[:n] for tokens, n in zip(golden["tokens"], golden["max_tokens"], strict=True)]
    assert got == want
    served_log = (tmp_path / "serve.log").read_text()
    assert "vllm_neuron._is_neuron_dev -> True" in served_log  # served by vllm-neuron's platform, stand-ins active
