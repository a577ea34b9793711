"""NxD Inference (Neuron) classes for Gemma. Only `modeling`, `config` and `runtime` import NxDI; `state_dict` and
`vllm_plugin.register_models` run anywhere. Everything here is untested on Trainium/Inferentia hardware until
someone runs it there; it is checked against HF in NxDI's own CPU mode."""
