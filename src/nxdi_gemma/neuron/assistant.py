"""Gemma 4 assistant drafters (transformers `gemma4_assistant`) in NxDI fused speculation: the assistant proposes K
tokens from the target's own KV cache, read in place (no draft cache), and the target verifies K + 1 in the same
graph.

The math is the CPU runtime's (`nxdi_gemma.assistant`: which target K/V it sees, pre/post projection,
centroid-sparse LM head); its module (`AssistantForCausalLM`, parameter names equal HF's) is the draft's weights
here, replicated on every rank. What is NxDI-specific:

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
- Over TP, each rank holds some of the target's KV heads (NxDI's GQA layout, `cache_heads`): a rank computes the
  assistant's query heads whose KV head it holds first (`owner_tables`, constants of the graph) and the heads are
  summed over TP (one all-reduce per layer and step); layouts with padded heads are refused.
- The target's caches must keep what the assistant reads: the sliding rings get spare slots for the assistant's
  window (`assistant_spare_slots`, applied by `config.check_speculation`).
"""

from __future__ import annotations

import torch
from neuronx_distributed.parallel_layers.layers import ParallelEmbedding
from neuronx_distributed.parallel_layers.mappings import reduce_from_tensor_model_parallel_region
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


def cache_heads(tp: int, num_heads: int, num_kv_heads: int) -> torch.Tensor | None:
    """The target KV head each cache head holds, per rank: int [tp, cache heads per rank], as NxDI lays out a
    layer's K/V over TP (modules/attention/gqa.py, 0.8 and 0.9: `determine_sharding_strategy`,
    `get_shardable_head_counts`, KV heads repeated in place (`replicate_kv`: REPLICATE_TO_TP_DEGREE tp / KV times,
    CONVERT_TO_MHA query / KV times), then split evenly over the ranks). None for a layout with padded heads."""
    from neuronx_distributed_inference.modules.attention.gqa import (
        GQA,
        determine_sharding_strategy,
        get_shardable_head_counts,
    )

    strategy = determine_sharding_strategy(tp, num_kv_heads)
    padded_heads, cache_kv_heads = get_shardable_head_counts(tp, num_heads, num_kv_heads, strategy)
    heads = torch.arange(num_kv_heads)
    if cache_kv_heads != num_kv_heads:
        repeats = tp // num_kv_heads if strategy == GQA.REPLICATE_TO_TP_DEGREE else num_heads // num_kv_heads
        heads = heads.repeat_interleave(repeats)
    if padded_heads != num_heads or len(heads) != cache_kv_heads or cache_kv_heads % tp:
        return None
    return heads.view(tp, -1)


def owner_tables(plan: AssistantPlan, target: GemmaPlan, tp: int) -> dict[str, torch.Tensor]:
    """layer type -> float [tp, assistant heads, cache heads per rank]: 1 where that rank computes that assistant
    query head against that local cache head (the first rank, and its first cache head, holding the query head's
    KV head), else 0. Every query head has exactly one 1 over all ranks, so a sum over TP assembles the output."""
    out = {}
    sources = target_kv_layers(target)
    for layer in plan.text.layers:
        source = sources[layer.attention_type]
        held = cache_heads(tp, source.num_heads, source.num_kv_heads)
        if held is None:
            raise ConfigError(f"the assistant cannot read the target's layer {source.index} K/V at tp_degree {tp} "
                              f"({source.num_heads} query heads over {tp} ranks are padded); choose another TP")
        table = torch.zeros(tp, layer.num_heads, held.shape[1])
        for head in range(layer.num_heads):
            kv_head = head // (layer.num_heads // layer.num_kv_heads)
            rank, local = next((r, j) for r in range(tp) for j in range(held.shape[1]) if held[r, j] == kv_head)
            table[rank, head, local] = 1.0
        out[layer.attention_type] = table
    return out


def check_assistant_neuron_config(neuron_config) -> None:
    """What the fused assistant graph does not implement, refused in one line before anything is built."""
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
        self.tp = config.neuron_config.tp_degree
        # Constants of the graph (from the configs): which rank computes which query head on which cache head.
        self.owners = owner_tables(self.plan, self.target_plan, self.tp)

    def target_kv(self, target, batch: int, seq_ids: torch.Tensor, position: torch.Tensor,
                  forward_start: torch.Tensor, written: torch.Tensor) -> dict:
        """layer type -> the attention over the target cache slots the CPU runtime's AssistantDraft sees
        (`nxdi_gemma.assistant`), on our cache layout (full layers: position p at slot p; rings: slot p % R holds the
        latest position written there): a function of the rotated queries (AssistantAttention.forward). position:
        [B, 1] (n - 1); forward_start, written: [B, 1], the target's last forward. The caches are read in place
        when the batch is their rows in order (token generation pads the batch so), else their rows are gathered."""
        out = {}
        n = position + 1
        rank = target.rank_util.get_rank().reshape(-1)[:1].to(torch.long)
        for layer_type in {layer.attention_type for layer in self.plan.text.layers}:
            source = self.sources[layer_type]
            slot = target.kv_mgr.slot_of[source.index]
            k_cache, v_cache = target.kv_mgr.past_key_values[2 * slot], target.kv_mgr.past_key_values[2 * slot + 1]
            if k_cache.shape[0] != batch:
                rows = seq_ids.reshape(-1).to(torch.long)
                k_cache, v_cache = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
            ring = target.kv_mgr.rings[source.index]
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
            owners = self.owners[layer_type].to(k_cache.dtype).index_select(0, rank)[0]  # [heads, local]
            out[layer_type] = self._attention(k_cache, v_cache, visible[:, None, None, :], owners)
        return out

    def _attention(self, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, owners: torch.Tensor):
        """ops.attention_heads' order (scores in the model dtype, scale 1, softmax in float32, probabilities
        rounded), each query head against every local cache head, `owners` keeping the one this rank computes for
        it; summed over TP. Nothing of the cache is copied or regrouped."""
        def attend(q: torch.Tensor) -> torch.Tensor:
            scores = torch.einsum("bqsd,bhtd->bqhst", q, keys)
            scores = scores.masked_fill(~visible[:, :, None], torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            heads = torch.einsum("bqhst,bhtd->bqhsd", probs, values)
            heads = torch.einsum("bqhsd,qh->bqsd", heads, owners)
            if self.tp > 1:
                heads = reduce_from_tensor_model_parallel_region(heads)
            return heads.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

        return attend


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
        kv = draft.target_kv(target, batch, seq_ids, position, state_positions[:, :1], state_positions[:, 1:])
        hidden_size = draft.target_plan.hidden_size
        token, hidden, proposals, logits_list = input_ids[:, -1:], state_hidden, [], []
        for _ in range(spec - 1):
            # The target's embedding table (sharded over its hidden dim: NxD's lookup gathers it), scaled as ours.
            embedded = ParallelEmbedding.forward(target.embed_tokens, token)
            embedded = embedded * ops.embed_scale(hidden_size, embedded.dtype)
            x = torch.cat([embedded, hidden.to(embedded.dtype)], dim=-1)
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
