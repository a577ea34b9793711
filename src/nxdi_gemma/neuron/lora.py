"""NxDI's LoRA serving manager for our model: requests and vLLM adapter loads naming an adapter NxDI does not serve
get one error naming the adapter and why, instead of a bare KeyError inside vllm-neuron's runner.

NxDI's `LoraModelManager` (modules/lora_serving/lora_model.py, 0.8 and 0.9) maps the adapter names of the
lora_ckpt_json to slots; vllm-neuron (0.4.1 and 0.5.0) calls `add_adapter(lora_request)` when vLLM registers an
adapter (`--lora-modules`, /v1/load_lora_adapter: NxDI accepts every name) and `convert_adapter_id_to_index(name)`
for each new request. The serving check (vllm_plugin.serve_lora_adapters) may have dropped adapters of the user's
lora_ckpt_json; the copy NxDI reads records why under vllm_plugin.DROPPED_KEY.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neuronx_distributed_inference.modules.lora_serving.lora_model import LoraModelManager

# vllm_plugin.DROPPED_KEY (not imported: vllm_plugin must stay importable without NxDI and vice versa)
DROPPED_KEY = "nxdi-gemma-dropped"


class GemmaLoraModelManager(LoraModelManager):
    """LoraModelManager that names what it does not serve. vLLM turns the ValueError of `add_adapter` into an error
    response (/v1/load_lora_adapter: 400) or, for `--lora-modules`, a start that stops naming the adapter, as it
    does for any adapter that does not load."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        ckpt_json = getattr(config, "lora_ckpt_json", None)
        content = json.loads(Path(ckpt_json).expanduser().read_text()) if ckpt_json else {}
        self.dropped: dict[str, str] = dict(content.get(DROPPED_KEY) or {})

    def not_served(self, name: str) -> str:
        served = ", ".join(sorted(self.lora_adapter_id_mapping))
        why = self.dropped.get(name, "it is not listed in lora_ckpt_json (NxDI loads adapters only at start)")
        return f"LoRA adapter {name!r} is not served: {why}; served adapters: {served}"

    def init_dynamic_multi_lora(self, cpu_weights: list[dict[str, Any]]) -> None:
        """NxDI's step of the load with dynamic multi-LoRA (what vllm-neuron turns on whenever max_cpu_loras > 0,
        i.e. always): every CPU-cached adapter gets its rows of the sharded CPU LoRA weights. NxDI 0.8's own is used.
        NxDI 0.9's (sdk-2.29, c63afe0) raises NameError on the first adapter (`AdapterCache.init_weights_on_cpu`
        reads an undefined `i`; `init_dynamic_multi_lora` assigns an undefined `model`), which would stop every
        vllm-neuron 0.5.0 start with --enable-lora, so here it is written out as 0.9 shards the weights
        (`LoraCheckpoint._shard_cpu_weights`: row i is the i-th adapter of lora-ckpt-paths-cpu, after the dummy
        base-model row when enable_base_model_only is set)."""
        cache = self.cpu_adapter_cache
        if not hasattr(cache, "enable_base_model_only"):  # NxDI 0.8 (its AdapterCache has no base-model row)
            super().init_dynamic_multi_lora(cpu_weights)
            return
        if not cpu_weights:
            return
        self.lora_modules.extend(name for name in cpu_weights[0]
                                 if self.lora_checkpoint.is_lora_module(name) and "weight_active" not in name)
        first = int(bool(cache.enable_base_model_only))
        for row, adapter_id in enumerate(cache.get_adapter_ids(), start=first):
            entry = cache.map[adapter_id]
            entry.init_weights_on_cpu(len(cpu_weights))
            for rank, weights in enumerate(cpu_weights):
                for module in self.lora_modules:
                    entry.update_weights(rank, module, weights[module][row])

    def add_adapter(self, lora_request: Any) -> bool:
        name = getattr(lora_request, "lora_name", None)
        if name not in self.lora_adapter_id_mapping:
            raise ValueError(self.not_served(name))
        return super().add_adapter(lora_request)

    def convert_adapter_id_to_index(self, adapter_ids: Any) -> Any:
        if adapter_ids not in self.lora_adapter_id_mapping:
            raise KeyError(self.not_served(adapter_ids))
        return super().convert_adapter_id_to_index(adapter_ids)
