"""Our device graphs use only the HLO ops NxDI's own shipped models use (issue 15): every (opcode, element type) in
the graphs of our classes appears in the graphs of NxDI's Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral and Gemma 3
traced by the same harness (`python -m xla --nxdi`, NxD's ModelBuilder with torch-xla 2.9), or is on ALLOWED below
with the reason. neuronx-cc compiles what NxDI ships every day; an op only we emit is one it may handle worse or
not at all (e.g. neuronx-cc 2.32 announces hard errors for integer scatter paths).

Tiny random configs (no weights: tracing needs none), one context-encoding and one token-generation bucket each,
float32, TP 1. Ours: the tier's four families (`conftest.FAMILIES`) with a prefill chunk shorter than the context,
so the graphs hold the chunked-prefill paths (cache reads, ring merges, spare-slot writes), two of them with
continuous batching and in the block KV layout of prefix caching (whose reference adds NxDI's Llama on NxDI's own
block-KV path), two as target of NxDI fused speculation (whose reference adds NxDI's Llama as its own fused draft).
The reference set is traced once per session (one process per release); its seconds are reported.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from conftest import FAMILIES

# NxDI 0.8 by default, as test_xla.py; NXDI_GEMMA_SIM_XLA_RELEASES=sdk-2.28,sdk-2.29 checks NxDI 0.9 too (~60 s each).
RELEASES = tuple(os.environ.get("NXDI_GEMMA_SIM_XLA_RELEASES", "sdk-2.28").split(","))
SEQ = ["--seq-len", "64", "--ctx-len", "32", "--mode", "trace"]
OURS = ["--neuron-config", json.dumps({"prefill_chunk_size": 8})]  # 32-token context in chunks of 8
CB_FAMILIES = ("gemma2", "gemma4_ple")  # sliding + full layers; KV sharing
CB = ["--batch", "2", "--neuron-config", json.dumps({"prefill_chunk_size": 8, "is_continuous_batching": True,
                                                     "ctx_batch_size": 1, "tkg_batch_size": 2})]
# The block KV layout of prefix caching (vllm-neuron with vLLM's default): ours with prefix_cache_driver.py's
# settings; the reference, NxDI's own block-KV path on its Llama (1024 tokens in blocks of 8: >= 128 blocks per
# sequence, below which NxDI tiles blocks in a way tiny shapes cannot trace).
BLOCK_FAMILIES = ("gemma2", "gemma4_ple")
BLOCK_REFERENCE = ["--seq-len", "1024", "--batch", "3", "--mode", "trace", "--neuron-config", json.dumps({
    "is_block_kv_layout": True, "is_prefix_caching": True, "pa_block_size": 8, "pa_num_blocks": 3 * 128,
    "is_continuous_batching": True, "ctx_batch_size": 1, "tkg_batch_size": 3, "enable_bucketing": True,
    "context_encoding_buckets": [16], "prefix_buckets": [1024], "token_generation_buckets": [1024]})]
# NxDI fused speculation (issue 17): ours with continuous batching as spec_driver.py builds it (target, draft, K + 1),
# a PLE + KV-sharing target with a K=V + MoE draft and Gemma 2 as its own draft; the reference adds NxDI's Llama as
# its own fused draft (as NxDI's inference_demo builds it).
SPEC_CASES = (("gemma4_ple", "gemma4_moe", 5), ("gemma2", "self", 3))
SPEC_REFERENCE = ["--draft", "self", "--speculation-length", "5"]
M = "neuronx_distributed_inference.models."
_DENSE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "pad_token_id": 0,
          "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
# NxDI's shipped causal LMs: class, HF config (transformers 4.57 reads it through NxDI's load_pretrained_config).
REFERENCES = {
    "llama": (M + "llama.modeling_llama:NeuronLlamaForCausalLM",
              dict(_DENSE, model_type="llama", architectures=["LlamaForCausalLM"])),
    "qwen2": (M + "qwen2.modeling_qwen2:NeuronQwen2ForCausalLM",
              dict(_DENSE, model_type="qwen2", architectures=["Qwen2ForCausalLM"])),
    "qwen3": (M + "qwen3.modeling_qwen3:NeuronQwen3ForCausalLM",
              dict(_DENSE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16)),
    "qwen3_moe": (M + "qwen3_moe.modeling_qwen3_moe:NeuronQwen3MoeForCausalLM",
                  dict(_DENSE, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], head_dim=16,
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[], rope_scaling=None)),
    "mixtral": (M + "mixtral.modeling_mixtral:NeuronMixtralForCausalLM",
                dict(_DENSE, model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                     num_experts_per_tok=2)),
    # NxDI's Gemma 3 fixes its vocabulary at 262208 and its RoPE constants; sliding + full layers.
    "gemma3": (M + "gemma3.modeling_gemma3:NeuronGemma3ForCausalLM",
               dict(_DENSE, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16,
                    sliding_window=8, hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)),
}
# (opcode, element type) our graphs may use although no reference graph does, with the reason. None today. Integer
# index arithmetic is int32 in ours: NxDI's contiguous-cache graphs do it in int64 (positions arrive as s64), its
# block-KV path and its fused speculation in int32 as ours (convert, multiply, remainder and subtract s32 are there;
# `subtract s32` was allowlisted until NxDI's fused speculation joined the references); neuronx-cc 2.32's notes
# announce hard errors for int64 on integer scatter paths, so ours narrows positions to int32 once.
ALLOWED: dict[str, str] = {}


def op_types(report: dict) -> dict[str, set[str]]:
    """Graph name -> its (opcode, element type) pairs, e.g. 'dynamic-update-slice f32'."""
    return {name: set(graph["op_types"]) for name, graph in report["graphs"].items()}


@pytest.fixture(scope="module", params=RELEASES)
def traced(request, sim, goldens, tmp_path_factory, sim_report) -> dict:
    """{"release", "reference": {model: {graph: ops}}, "ours": {family: {graph: ops}}}, one process per release."""
    release = request.param
    sim.need(release)
    tmp = tmp_path_factory.mktemp(f"op_set_{release}")
    jobs = []
    for name, (cls, config) in REFERENCES.items():
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(json.dumps(config))
        jobs.append(["--nxdi", cls, "--ckpt", str(tmp / name), *SEQ])
    jobs += [["--case", str(goldens[f]), *SEQ, *OURS] for f in FAMILIES]
    # Continuous batching (how vllm-neuron runs us): cache rows by seq_id, the context encoding a batch of one.
    jobs += [["--case", str(goldens[f]), *SEQ, *CB] for f in CB_FAMILIES]
    jobs += [["--case", str(goldens[f]), "--prefix-caching", "--mode", "trace"] for f in BLOCK_FAMILIES]
    jobs.append(["--nxdi", REFERENCES["llama"][0], "--ckpt", str(tmp / "llama"), *BLOCK_REFERENCE])
    jobs += [["--case", str(goldens[t]), "--draft", "self" if d == "self" else str(goldens[d] / "ckpt"),
              "--speculation-length", str(s), "--mode", "trace"] for t, d, s in SPEC_CASES]
    jobs.append(["--nxdi", REFERENCES["llama"][0], "--ckpt", str(tmp / "llama"), *SEQ, *SPEC_REFERENCE])
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    t0 = time.time()
    sim.run([sys.executable, "-m", "xla", "--jobs", str(tmp / "jobs.json"), "--json", str(tmp / "out.json")],
            release, mode="xla", timeout=1500)
    reports = json.loads((tmp / "out.json").read_text())
    seconds = time.time() - t0
    reference = {name: op_types(r) for name, r in zip(REFERENCES, reports, strict=False)}
    ours = {f: op_types(r) for f, r in zip(FAMILIES, reports[len(REFERENCES):], strict=False)}
    start = len(REFERENCES) + len(FAMILIES)
    for f, r in zip(CB_FAMILIES, reports[start:start + len(CB_FAMILIES)], strict=True):
        ours[f] = {**ours[f], **{f"{name} (continuous batching)": ops for name, ops in op_types(r).items()}}
    start += len(CB_FAMILIES)
    for f, r in zip(BLOCK_FAMILIES, reports[start:start + len(BLOCK_FAMILIES)], strict=True):
        ours[f] = {**ours[f], **{f"{name} (block KV)": ops for name, ops in op_types(r).items()}}
    start += len(BLOCK_FAMILIES)
    reference["llama (block KV)"] = op_types(reports[start])
    for (t, d, _s), r in zip(SPEC_CASES, reports[start + 1:start + 1 + len(SPEC_CASES)], strict=True):
        ours[t] = {**ours[t], **{f"{name} (fused speculation, {d} draft)": ops for name, ops in op_types(r).items()}}
    reference["llama (fused speculation)"] = op_types(reports[-1])
    sim_report(f"op set {release}", f"{len(REFERENCES)} NxDI models + {len(FAMILIES)} families traced in "
               f"{seconds:.0f} s (reference traces {sum(r['trace_seconds'] for r in reports[:len(REFERENCES)]):.0f} s)")
    return {"release": release, "reference": reference, "ours": ours}


def test_references_traced(traced):
    """Every NxDI model gave a context-encoding and a token-generation graph (else the reference set is thin)."""
    for name, graphs in traced["reference"].items():
        assert any(g.startswith("context_encoding") for g in graphs), f"{name}: no context-encoding graph"
        assert any(g.startswith(("token_generation", "fused_speculation")) for g in graphs), (
            f"{name}: no token-generation graph")


@pytest.mark.parametrize("family", FAMILIES)
def test_ops_within_nxdi_models(traced, family, sim_report):
    known = set().union(*(ops for graphs in traced["reference"].values() for ops in graphs.values()))
    extra = {}
    for graph, ops in traced["ours"][family].items():
        for op in sorted(ops - known - set(ALLOWED)):
            extra.setdefault(op, []).append(graph)
    used = sorted(set().union(*traced["ours"][family].values()) & set(ALLOWED))
    sim_report(f"op set {traced['release']} {family}", f"allowlisted ops used: {used or 'none'}")
    assert not extra, (f"{family}: (opcode, element type) in none of NxDI's shipped models' graphs "
                       f"({', '.join(REFERENCES)}) and not on ALLOWED: {extra}")


def test_allowlist_is_needed(traced):
    """Each allowlist entry is still used by one of our graphs and still absent from NxDI's (else remove it)."""
    known = set().union(*(ops for graphs in traced["reference"].values() for ops in graphs.values()))
    ours = set().union(*(ops for graphs in traced["ours"].values() for ops in graphs.values()))
    stale = {op: ("used by none of our graphs" if op not in ours else "in NxDI's graphs") for op in ALLOWED
             if op not in ours or op in known}
    assert not stale, f"ALLOWED entries to remove: {stale}"

