"""The simulation tier: NxD / NxDI source trees on torch 2.9 + torch-xla 2.9 + vLLM 0.13 + transformers 4.57 (the
public half of Neuron SDK 2.28), with stand-ins for the closed-source packages (`standins/`). Run it in the venv
`scripts/sim_env.sh` builds (`.ci/run` does): `$SIMPY -m pytest test/sim -q`.

Environment:
- NXDI_SOURCES: folder with <release>/neuronx-distributed/src and <release>/neuronx-distributed-inference/src for the
  releases in RELEASES (default ../shared/nxdi-src beside the repo). Tests of a missing release skip.
- NXDI_GEMMA_REFERENCE_PYTHON: the main environment's interpreter (transformers >= 5, nxdi-gemma installed), which
  makes the checkpoints and HF goldens (make_goldens.py). Without it, tests needing goldens skip.
- NXDI_GEMMA_SIM_GOLDENS: optional persistent folder for the goldens (default: a fresh pytest temp folder); a case is
  remade only when its spec changed.
- PYTHONPATH, if set, goes in front of the project's src in every NxDI process: a modified copy of src can be tested
  that way (the goldens are always made from this checkout's src).

Helpers for the tier's tests (constants import as `from conftest import FAMILIES, SIM`; the rest are fixtures):
- `sim` (session fixture) -> `Sim`: `sim.releases` (available releases), `sim.env(release, mode)` (the environment of a
  process running NxDI of that release: PYTHONPATH = stand-ins, PYTHONPATH, project src, NxD, NxDI;
  NXDI_GEMMA_SIM_MODE = cpu | xla), `sim.run(cmd, release, mode, timeout, check=True)` (subprocess in that
  environment; a failure shows its output's tail; `sim.failure(proc)` formats it when check=False), `sim.torchrun(nproc)` (argv prefix), `sim.goldens(specs)` -> {name: case dir}
  (makes more golden cases, e.g. fixtures with more heads for TP 4/8: spec format in make_goldens.py).
- `goldens` (session fixture) -> {family: case dir} for FAMILIES; `sim_golden.load_golden(dir)` reads one (prompts,
  HF tokens, float32 logits per step, bound, checkpoint path); `sim_golden.compare` scores a run.
- FAMILIES / family_specs(): Gemma 2, Gemma 3, Gemma 4 with PLE + KV sharing (dense), Gemma 4 with K=V + MoE; sliding
  window 8, prompts of 30 (> 3x the window) and 5 tokens, 24 new tokens (decode past the window), float32.
  ALL_FAMILIES adds Gemma 4 12B-like (`gemma4_unified_text`: K=V global layers with one KV head of twice the head
  dim, no PLE / MoE / sharing); to keep the tier's time, only test_nxdi_cpu (also its multimodal layout,
  `multimodal_specs`), test_xla, test_hlo_budgets (its real geometry) and test_vllm run it.
- `int8_goldens`, `kv_goldens`, `hub_goldens` (session fixtures) -> {family_int8 / family_kvfp8 / family_fp8hub: case
  dir}: the references of quantized weights, the fp8 KV cache and FP8 Hub checkpoints (HUB_FAMILIES), shared by
  test_quantized.py (NxDI CPU mode) and test_xla_quantized.py (XLA replay).
- `sim_report` (fixture) -> report(key, text): a line in the "simulation tier measurements" summary at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SIM = Path(__file__).resolve().parent
REPO = SIM.parents[1]
STANDINS = SIM / "standins"
RELEASES = ("sdk-2.28", "sdk-2.29")  # NxDI 0.8 (Trn1/Inf2/Trn2), NxDI 0.9 (Trn2+)
FAMILIES = ("gemma2", "gemma3", "gemma4_ple", "gemma4_moe")
ALL_FAMILIES = (*FAMILIES, "gemma4_12b")
PROMPT_LENGTHS = [30, 5]
NEW_TOKENS = 24


def family_specs() -> dict[str, dict]:
    """Golden specs of FAMILIES, from the project's tiny configs (spec 8.1 fixtures, vocab 264, window 8)."""
    from nxdi_gemma.tiny import TINY_CONFIGS

    g4 = TINY_CONFIGS["gemma4"]  # every Gemma 4 feature: PLE, KV sharing, double-wide MLP, K=V, MoE
    configs = {
        "gemma2": TINY_CONFIGS["gemma2"],
        "gemma3": TINY_CONFIGS["gemma3"],
        # E2B-like: PLE, KV sharing and double-wide MLP; dense MLP, separate V.
        "gemma4_ple": dict(g4, attention_k_eq_v=False, num_global_key_value_heads=None, enable_moe_block=False,
                           num_experts=None, top_k_experts=None, moe_intermediate_size=None),
        # 26B-A4B-like: K=V global layers and MoE; no PLE, no KV sharing.
        "gemma4_moe": dict(g4, hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False),
        # 12B-like: Gemma4UnifiedForCausalLM (text-only save); the multimodal layout is test_vllm's gemma4unifiedmm.
        "gemma4_12b": TINY_CONFIGS["gemma4_unified"],
    }
    return {name: {"config": config, "seed": 0, "prompt_lengths": PROMPT_LENGTHS, "prompt_seed": 7,
                   "new_tokens": NEW_TOKENS} for name, config in configs.items()}


def gemma4_unified_multimodal(text: dict) -> dict:
    """A Gemma 4 12B-like checkpoint in its any-to-any layout (Gemma4UnifiedForConditionalGeneration: text weights
    under model.language_model., tiny vision/audio embedders HF initializes and the text decoder ignores) around the
    text config `text`."""
    return {
        "model_type": "gemma4_unified", "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "initializer_range": 0.2, "tie_word_embeddings": True,
        "text_config": {k: v for k, v in text.items() if k != "architectures"},
        "vision_config": {"model_type": "gemma4_unified_vision", "patch_size": 2, "pooling_kernel_size": 2,
                          "mm_posemb_size": 16, "mm_embed_dim": 64, "output_proj_dims": 64},
        "audio_config": {"model_type": "gemma4_unified_audio", "audio_embed_dim": 16},
    }  # fmt: skip


def multimodal_specs() -> dict[str, dict]:
    """Golden spec of the 12B-like family in its multimodal layout (`gemma4_12b_mm`, test_nxdi_cpu only), saved by
    HF's Gemma4UnifiedForConditionalGeneration: its vision and audio embedder tensors are in the checkpoint too."""
    from nxdi_gemma.tiny import TINY_CONFIGS

    return {"gemma4_12b_mm": {"config": gemma4_unified_multimodal(TINY_CONFIGS["gemma4_unified"]), "seed": 0,
                              "prompt_lengths": PROMPT_LENGTHS, "prompt_seed": 7, "new_tokens": NEW_TOKENS,
                              "hf_saved": True}}


class Sim:
    def __init__(self, golden_root: Path):
        self.sources = Path(os.environ.get("NXDI_SOURCES", REPO.parent / "shared" / "nxdi-src")).resolve()
        self.releases = [r for r in RELEASES if all(p.is_dir() for p in self.trees(r))]
        self.golden_root = golden_root
        self.reference_python = os.environ.get("NXDI_GEMMA_REFERENCE_PYTHON")

    def trees(self, release: str) -> tuple[Path, Path]:
        return (self.sources / release / "neuronx-distributed" / "src",
                self.sources / release / "neuronx-distributed-inference" / "src")

    def need(self, release: str) -> None:
        if release not in self.releases:
            pytest.skip(f"NxD/NxDI sources of {release} not found under NXDI_SOURCES={self.sources}")

    def env(self, release: str, mode: str = "cpu") -> dict[str, str]:
        self.need(release)
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        path = [str(STANDINS), *inherited, str(REPO / "src"), *map(str, self.trees(release))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), NXDI_GEMMA_SIM_MODE=mode,
                   # .pyc files of the shared trees and of src go to a cache, not into the sources
                   PYTHONPYCACHEPREFIX=str(Path.home() / ".cache" / "nxdi-gemma" / "pycache"),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return env

    def run(self, cmd: list[str], release: str, mode: str = "cpu", timeout: float = 1200,
            cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run cmd in the environment of `release`; a non-zero exit fails the test with the output's tail (with
        check=False the caller gets the process and `failure(proc)` describes it)."""
        proc = subprocess.run(cmd, env=self.env(release, mode), cwd=cwd or SIM, capture_output=True, text=True,
                              timeout=timeout)
        proc.release_mode = (release, mode)
        if check and proc.returncode != 0:
            pytest.fail(self.failure(proc), pytrace=False)
        return proc

    @staticmethod
    def failure(proc: subprocess.CompletedProcess) -> str:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        release, mode = proc.release_mode
        return f"{' '.join(map(str, proc.args[:4]))}... ({release}, {mode}) exited {proc.returncode}:\n{tail}"

    @staticmethod
    def torchrun(nproc: int) -> list[str]:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(port)]

    def goldens(self, specs: dict[str, dict]) -> dict[str, Path]:
        if not self.reference_python:
            pytest.skip("set NXDI_GEMMA_REFERENCE_PYTHON to the main environment's python (transformers >= 5) to "
                        "make the HF goldens")
        self.golden_root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(specs, sort_keys=True)
        spec_file = self.golden_root / f"spec-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        spec_file.write_text(text)
        # The goldens come from this checkout's src whatever PYTHONPATH the tier runs with.
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        proc = subprocess.run([self.reference_python, str(SIM / "make_goldens.py"), str(spec_file),
                               str(self.golden_root)], env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            pytest.fail(f"make_goldens.py ({self.reference_python}) exited {proc.returncode}:\n{tail}", pytrace=False)
        return {name: self.golden_root / name for name in specs}


@pytest.fixture(scope="session")
def sim(tmp_path_factory) -> Sim:
    root = os.environ.get("NXDI_GEMMA_SIM_GOLDENS")
    return Sim(Path(root) if root else tmp_path_factory.mktemp("sim_goldens"))


@pytest.fixture(scope="session")
def goldens(sim) -> dict[str, Path]:
    return sim.goldens(family_specs())


# FP8 Hub checkpoints: dense families (compressed-tensors quantizes Linear modules; our routed experts are 3-D
# parameters, which such checkpoints keep unquantized and our converter would quantize, away from HF's reference).
HUB_FAMILIES = [f for f in FAMILIES if f != "gemma4_moe"]


@pytest.fixture(scope="session")
def int8_goldens(sim) -> dict[str, Path]:
    """{family}_int8: HF run on an int8-rounded copy of the checkpoint (the reference of `quantized` int8 weights)."""
    return sim.goldens({f"{name}_int8": dict(spec, weights="int8_rounded") for name, spec in family_specs().items()})


@pytest.fixture(scope="session")
def kv_goldens(sim) -> dict[str, Path]:
    """{family}_kvfp8: HF whose cache rounds what it stores to fp8 (the reference of `kv_cache_quant`)."""
    return sim.goldens({f"{name}_kvfp8": dict(spec, kv_cache="f8e4m3") for name, spec in family_specs().items()})


@pytest.fixture(scope="session")
def hub_goldens(sim) -> dict[str, Path]:
    """{family}_fp8hub: an FP8 compressed-tensors checkpoint, HF run on its dequantized weights (HUB_FAMILIES)."""
    return sim.goldens({f"{name}_fp8hub": dict(spec, weights="fp8_compressed_tensors")
                        for name, spec in family_specs().items() if name in HUB_FAMILIES})


REPORT: list[tuple[str, str]] = []


def report(key: str, text: str) -> None:
    REPORT.append((key, text))


@pytest.fixture(scope="session")
def sim_report():
    """The `report(key, text)` function (tests cannot import conftest)."""
    return report


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    terminalreporter.section("simulation tier measurements")
    width = max(len(k) for k, _ in REPORT)
    for key, text in REPORT:
        terminalreporter.write_line(f"{key:<{width}}  {text}")
