"""Gemma 4 assistant drafters (transformers `gemma4_assistant`) in NxDI fused speculation: the assistant proposes K
tokens from the target's own KV cache, read in place (no draft cache), and the target verifies K + 1 in the same
graph.

The math is the CPU runtime's (`nxdi_gemma.assistant`: which target K/V it sees, pre/post projection,
centroid-sparse LM head); its module (`AssistantForCausalLM`, parameter names equal HF's) is the draft's weights
here, unsharded (TP 1). What is NxDI-specific:

- `GemmaAssistantSpecModel` is NxDI's `NeuronFusedSpecModel` with its two graph bodies replaced
  (`_context_encoding_forward`, `_token_gen_forward`; the signatures and output layouts of NxDI 0.8 cd3abf3 and
  0.9 c63afe0, which are the same): NxDI's own post-processing (accepted tokens, next inputs and positions) and
  model wrappers run unchanged. `NeuronGemmaForCausalLM` picks it for an assistant draft (`enable_context_encoding`).
- The assistant keeps no KV cache, but it needs, per sequence, what HF's candidate generator keeps between steps:
  the target's final hidden state at the last accepted input, and which positions the target's last forward wrote
  (its first and last). That is the draft's `kv_mgr.past_key_values` ([hidden [B, 1, H], positions int32 [B, 2]]),
  so NxDI aliases it as state like any draft cache, and `NeuronGemmaForCausalLM._copy_past_key_values` updates it
  in CPU mode. Each graph writes it after the target's forward (prefill: the last prompt token; verification: the
  accepted count's position, computed in the graph as NxDI's post-processor does).
- The target's final hidden states come from its LM head's input (`SoftcapColumnParallelLinear.hidden_in`: the
  normed hidden states NxDI hands the head: the last prompt token in context encoding, all S in a verification).
- The target's caches must keep what the assistant reads: the sliding rings get spare slots for the assistant's
  window (`assistant_spare_slots`, applied by `config.check_speculation`).
"""

from __future__ import annotations

import torch
from neuronx_distributed_inference.models.model_base import NeuronFusedSpecModel
from torch import nn

from .. import ops
from ..assistant import AssistantForCausalLM, expected_shapes, load_plan
from ..checkpoint import load_state_dict
from ..config import AssistantPlan, GemmaPlan, target_kv_layers
from ..errors import ConfigError
from ..speculation import greedy_accept


def assistant_spare_slots(target: GemmaPlan, assistant: AssistantPlan, k: int) -> int:
    """Spare slots the target's caches need (`speculation_spare_slots`; a ring holds W + spare - 1 positions) so that
    every key the assistant may see is still there: it sees up to W_a + 1 positions ending at most K - 1 before the
    last one the target wrote (a verification of K + 1 that keeps fewer)."""
    windows = [layer.window for layer in assistant.text.layers if layer.window]
    sliding = target_kv_layers(target).get("sliding_attention")
    if not windows or sliding is None:
        return k
    return max(k, max(windows) + k + 1 - sliding.window)


def check_assistant_neuron_config(neuron_config) -> None:
    """What the fused assistant graph does not implement, refused in one line before anything is built."""
    if neuron_config.tp_degree != 1:
        raise ConfigError(f"a Gemma 4 assistant draft runs at tp_degree 1 in nxdi-gemma (asked: "
                          f"{neuron_config.tp_degree}); use tp_degree 1 or a Gemma draft model")
    if getattr(neuron_config, "kv_cache_quant", False):
        raise ConfigError("a Gemma 4 assistant draft reads the target's KV cache, which kv_cache_quant quantizes; "
                          "nxdi-gemma does not support the pair: turn kv_cache_quant off")
    if getattr(neuron_config, "output_logits", False) and neuron_config.on_device_sampling_config is None:
        raise ConfigError("a Gemma 4 assistant draft needs on-device sampling (greedy)")


class AssistantState(nn.Module):
    """The draft's `kv_mgr`: per sequence (cache row), the target's final hidden state the next proposal starts from
    and the first and last positions of the target's last forward. Aliased as state like a KV cache."""

    def __init__(self, rows: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.past_key_values = nn.ParameterList([
            nn.Parameter(torch.zeros(rows, 1, hidden_size, dtype=dtype), requires_grad=False),
            nn.Parameter(torch.zeros(rows, 2, dtype=torch.int32), requires_grad=False),
        ])

    def write(self, seq_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None
              ) -> list[torch.Tensor]:
        """The state with rows seq_ids replaced (where `keep`, [B] bool, else unchanged): [hidden, positions]."""
        rows = seq_ids.reshape(-1).to(torch.long)
        old_hidden, old_positions = (p.index_select(0, rows) for p in self.past_key_values)
        if keep is not None:
            hidden = torch.where(keep[:, None, None], hidden.to(old_hidden.dtype), old_hidden)
            positions = torch.where(keep[:, None], positions, old_positions)
        return [self.past_key_values[0].index_copy(0, rows, hidden.to(old_hidden.dtype)),
                self.past_key_values[1].index_copy(0, rows, positions.to(torch.int32))]


class NeuronAssistantModel(nn.Module):
    """The draft submodel NxDI builds (`draft_model_cls._model_cls(draft_config)`): the assistant's weights and its
    state. `draft_config` is the target's config with `assistant_plan` (see runtime.draft_spec_config)."""

    def __init__(self, config):
        super().__init__()
        check_assistant_neuron_config(config.neuron_config)
        self.plan: AssistantPlan = config.assistant_plan
        self.target_plan: GemmaPlan = config.gemma_plan
        dtype = config.neuron_config.torch_dtype
        self.assistant = AssistantForCausalLM(self.plan).to(dtype)
        embedder = self.assistant.masked_embedding
        if embedder is not None:
            # The token ordering is checkpoint data: a (frozen) parameter, so that NxDI loads it as a weight on a
            # device too, where a buffer would be traced as the constant it held at build time.
            ordering = embedder._buffers.pop("token_ordering")
            embedder.token_ordering = nn.Parameter(ordering, requires_grad=False)
        rows = config.neuron_config.max_batch_size + config.neuron_config.kv_cache_padding_size
        self.kv_mgr = AssistantState(rows, self.plan.backbone_hidden_size, dtype)
        self.sources = target_kv_layers(self.target_plan)

    def target_kv(self, target_kv_mgr, batch: int, seq_ids: torch.Tensor, position: torch.Tensor,
                  forward_start: torch.Tensor, written: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        """layer type -> (target keys, values, visible [B, 1, 1, T]): the target cache slots the CPU runtime's
        AssistantDraft sees (`nxdi_gemma.assistant`), on our cache layout (full layers: position p at slot p;
        rings: slot p % R holds the latest position written there). position: [B, 1] (n - 1); forward_start,
        written: [B, 1], the target's last forward. The caches are read in place when the batch is their rows in
        order (token generation pads the batch so), else their rows are gathered."""
        out = {}
        n = position + 1
        for layer_type in {layer.attention_type for layer in self.plan.text.layers}:
            source = self.sources[layer_type]
            slot = target_kv_mgr.slot_of[source.index]
            k_cache, v_cache = target_kv_mgr.past_key_values[2 * slot], target_kv_mgr.past_key_values[2 * slot + 1]
            if k_cache.shape[0] != batch:
                rows = seq_ids.reshape(-1).to(torch.long)
                k_cache, v_cache = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
            # NxDI converts GQA to MHA when the TP degree is not a multiple of the KV heads (GQA.CONVERT_TO_MHA, even at
            # TP 1): the cache then holds each KV head r times in a row (the target's query heads read cache head i
            # for their KV head i // r). The assistant groups its own query heads: every r-th cache head.
            repeat = k_cache.shape[1] // source.num_kv_heads
            if repeat > 1:
                k_cache, v_cache = k_cache[:, ::repeat], v_cache[:, ::repeat]
            ring = target_kv_mgr.rings[source.index]
            slots = torch.arange(k_cache.shape[2], device=k_cache.device, dtype=torch.int32)[None, :]
            if ring is None:
                held = slots.expand(batch, -1)
                lo, top = torch.zeros_like(written), torch.minimum(written, n - 1)
            else:
                held = written - torch.fmod(written - slots + ring, ring)  # written >= 0 > slot - ring: a modulo
                first = (forward_start - source.window + 1).clamp(min=0)
                top = torch.minimum(written, first + n - 1)
                window = next(layer.window for layer in self.plan.text.layers if layer.attention_type == layer_type)
                lo = torch.maximum(first, top - window)
            visible = (held >= lo) & (held <= top) & (held >= 0)
            out[layer_type] = (k_cache, v_cache, visible[:, None, None, :])
        return out


class AssistantDraftModel:
    """What NxDI's FusedSpecNeuronConfig takes as `draft_model_cls`: the submodel class and the state-dict loader
    (NxDI's checkpoint loader sets `_FUSED_PREFIX` to "draft_model" before calling it)."""

    _model_cls = NeuronAssistantModel
    _FUSED_PREFIX = ""

    @classmethod
    def get_state_dict(cls, model_name_or_path: str, config) -> dict:
        """The assistant's safetensors (our loader: strict names and shapes, never unpickles), named as in
        NeuronAssistantModel; token_ordering stays integer."""
        plan = load_plan(model_name_or_path)
        state = load_state_dict(model_name_or_path, plan.text, expected_shapes(plan), None, progress=False)
        prefix = f"{cls._FUSED_PREFIX}.assistant." if cls._FUSED_PREFIX else "assistant."
        return {prefix + name: value for name, value in state.items()}


class GemmaAssistantSpecModel(NeuronFusedSpecModel):
    """NxDI fused speculation with a Gemma 4 assistant as the draft (see the module docstring)."""

    def _target(self, input_ids, attention_mask, position_ids, seq_ids, sampling_params, slot_mapping,
                active_block_table, num_queries, computed_context_lens):
        outputs = self.target_model(
            input_ids, attention_mask, position_ids, seq_ids, sampling_params,
            torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0),
            slot_mapping, active_block_table, num_queries, computed_context_lens,
        )
        return outputs, self.target_model.lm_head.hidden_in

    def _context_encoding_forward(self, input_ids, attention_mask, position_ids, seq_ids, sampling_params,
                                  slot_mapping=None, active_block_table=None, num_queries=None,
                                  computed_context_lens=None):
        """The target's prefill; the assistant's state for these rows: the last prompt token's hidden state, and
        positions 0 .. last (HF's prefill is one forward from 0; prompt chunks each write it, the last one's stays).
        A chunk without a real token of a row (its prompt ended in an earlier chunk) leaves that row's state."""
        self.target_model.n_positions = self.n_positions
        outputs, hidden = self._target(input_ids, attention_mask, position_ids, seq_ids, sampling_params,
                                       slot_mapping, active_block_table, num_queries, computed_context_lens)
        valid = self.target_model.state.valid  # [B, C] real tokens of the chunk (create_attn_mask)
        last = torch.where(valid, position_ids, 0).amax(dim=1, keepdim=True)
        positions = torch.cat([torch.zeros_like(last), last], dim=1)
        state = self.draft_model.kv_mgr.write(seq_ids, hidden[:, -1:], positions, valid.any(dim=1))
        count = 2 if self.neuron_config.output_logits else 1
        # NxDI's layout: [draft token, target token, (draft logits, target logits)], draft caches, target caches.
        # The assistant proposes nothing at a prefill: the target's outputs stand in for the draft's.
        head = [outputs[0], outputs[0]] + ([outputs[1], outputs[1]] if count == 2 else [])
        return head + state + list(outputs[count:])

    def _token_gen_forward(self, input_ids, attention_mask, position_ids, seq_ids, sampling_params,
                           slot_mapping=None, active_block_table=None, num_queries=None,
                           computed_context_lens=None):
        """K assistant steps from one position (the last known token's, n - 1) over the target's caches in place,
        then the target's verification of the last token and the K proposals (S = K + 1 positions). Outputs in
        NxDI's layout: candidates [B, S] (the K proposals, the last repeated: NxDI's post-processor compares the
        first K), the target's S tokens, (draft logits [B, S, V] likewise, target logits), the new assistant state,
        the target's caches."""
        spec = self.neuron_config.speculation_length
        batch = input_ids.shape[0]
        draft, target = self.draft_model, self.target_model
        position = position_ids[:, :1].to(torch.int32)
        rows = seq_ids.reshape(-1).to(torch.long)
        state_hidden, state_positions = (p.index_select(0, rows) for p in draft.kv_mgr.past_key_values)
        kv = draft.target_kv(target.kv_mgr, batch, seq_ids, position, state_positions[:, :1], state_positions[:, 1:])
        embed = target.embed_tokens.weight
        hidden_size = draft.target_plan.hidden_size
        token, hidden, proposals, logits_list = input_ids[:, -1:], state_hidden, [], []
        for _ in range(spec - 1):
            x = torch.cat([ops.scaled_embedding(embed, token, hidden_size), hidden.to(embed.dtype)], dim=-1)
            logits, hidden = draft.assistant.draft_step(x, position, kv)
            token = torch.argmax(logits, dim=-1, keepdim=True)
            proposals.append(token)
            logits_list.append(logits[:, None, :].float())
        proposed = torch.cat(proposals, dim=1)  # [B, K]
        verify = torch.cat([input_ids[:, -1:], proposed], dim=1).to(input_ids.dtype)
        steps = torch.arange(spec, device=position_ids.device, dtype=position_ids.dtype)[None, :]
        outputs, target_hidden = self._target(verify, attention_mask, position_ids[:, :1] + steps, seq_ids,
                                              sampling_params, slot_mapping, active_block_table, None,
                                              computed_context_lens)
        target_tokens = outputs[0]
        accepted = greedy_accept(proposed.to(target_tokens.dtype), target_tokens)  # [B]
        index = accepted.to(torch.long)[:, None, None].expand(batch, 1, target_hidden.shape[-1])
        kept_hidden = torch.gather(target_hidden, 1, index)
        written = torch.cat([position, position + (spec - 1)], dim=1)
        state = draft.kv_mgr.write(seq_ids, kept_hidden, written, None)
        candidates = torch.cat([proposed, proposed[:, -1:]], dim=1)
        count = 2 if self.neuron_config.output_logits else 1
        head = [candidates, target_tokens]
        if count == 2:
            head += [torch.cat(logits_list + logits_list[-1:], dim=1), outputs[1]]
        return head + state + list(outputs[count:])
