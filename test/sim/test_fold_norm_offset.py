"""`fold_norm_offset` is a field of our neuron config (issue 10 item 4): built from a dict the way vllm-neuron builds
it from `override_neuron_config` (`get_neuron_config_cls()(**neuron_config_dict)`, vllm_neuron/worker/
neuronx_distributed_model_loader.py in 0.4.1 and 0.5.0), it reaches the converted state dict and the built model, is
saved inside neuron_config.json and reloads from it; the default is the exact (unfolded) choice.

Gemma 3 fixture of the tier, NxDI CPU mode, TP 1. The driver (this file run as a script) prints one JSON record per
choice: what neuron_config.json holds, the reloaded value, the converted final-norm weight against the checkpoint's,
whether the built model's norms add 1 at run time, and bf16 logits of a short greedy run (the two choices must give
different bf16 logits: the option changes what runs, not only a flag).
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import RELEASES

CHOICES = ("default", False, True)


@pytest.mark.parametrize("release", RELEASES)
def test_fold_norm_offset_reaches_the_model_and_reloads(sim, goldens, release, tmp_path):
    out = tmp_path / "fold.json"
    sim.run([sys.executable, __file__, str(goldens["gemma3"] / "ckpt"), str(tmp_path), str(out)], release)
    records = {r["choice"]: r for r in json.loads(out.read_text())}
    for choice in CHOICES:
        r = records[str(choice)]
        fold = choice is True  # the default is unfolded
        assert r["json_neuron_config_value"] is fold, r
        assert not r["json_top_level"], "stored once, inside neuron_config"
        assert r["reloaded"] is fold and r["reloaded_model_config"] is fold, r
        # Converted weights: HF's offsets w (unfolded) or 1 + w in float32 (folded).
        assert r["final_norm_is_checkpoint_w"] is (not fold) and r["final_norm_is_1_plus_w"] is fold, r
        # Built model: unfolded norms add 1 at run time, folded ones read 1 + w.
        assert r["norms_add_one"] == [not fold], r
        assert not r["standins_called"], r
    assert records["default"]["logits"] == records["False"]["logits"]
    assert records["False"]["logits"] != records["True"]["logits"], "bf16 logits must differ between the choices"


def main(ckpt: str, work: str, out: str) -> None:
    import os
    import socket
    from pathlib import Path

    import standins  # installed by test/sim/standins/sitecustomize.py
    import torch
    from neuronx_distributed.parallel_layers import parallel_state
    from safetensors.torch import load_file

    from nxdi_gemma.neuron import runtime
    from nxdi_gemma.neuron.config import gemma_load_config
    from nxdi_gemma.neuron.modeling import NeuronGemmaForCausalLM as cls
    from nxdi_gemma.neuron.state_dict import neuron_name

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    w = load_file(str(Path(ckpt) / "model.safetensors"))["model.norm.weight"]
    records = []
    for choice in CHOICES:
        settings = {"tp_degree": 1, "batch_size": 1, "seq_len": 64, "max_context_length": 64,
                    "torch_dtype": torch.bfloat16, "on_cpu": True}
        if choice != "default":
            settings["fold_norm_offset"] = choice
        neuron_config = cls.get_neuron_config_cls()(**settings)  # as vllm-neuron builds it
        config = cls.get_config_cls()(neuron_config, load_config=gemma_load_config(ckpt))
        saved = Path(work) / f"compiled-{choice}"
        config.save(str(saved))
        doc = json.loads((saved / "neuron_config.json").read_text())
        reloaded = cls.get_config_cls().load(str(saved))
        state = cls.get_state_dict(ckpt, reloaded)
        norm = state[neuron_name("model.norm.weight")].float()
        model = cls(ckpt, reloaded)
        model.to_cpu()
        inner = model.models[0].model
        mark = standins.mark()
        cont = runtime.greedy(model, [[2, 17, 99, 140, 33, 250, 7, 61, 12, 90]], 6)[0]
        records.append({
            "choice": str(choice), "json_neuron_config_value": doc["neuron_config"].get("fold_norm_offset"),
            "json_top_level": "fold_norm_offset" in doc, "reloaded": reloaded.neuron_config.fold_norm_offset,
            "reloaded_model_config": reloaded.fold_norm_offset,
            "final_norm_is_checkpoint_w": torch.equal(norm, w.float()),
            "final_norm_is_1_plus_w": torch.equal(norm, 1.0 + w.float()),
            "norms_add_one": sorted({m.add_one for m in [inner.norm]}),
            "logits": cont.logits.tolist(), "standins_called": standins.calls(since=mark),
        })  # fmt: skip
        del model
        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    Path(out).write_text(json.dumps(records))


if __name__ == "__main__":
    main(*sys.argv[1:])
