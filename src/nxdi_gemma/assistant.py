"""Gemma 4 assistant drafters (transformers `gemma4_assistant`) on the CPU runtime.

An assistant keeps no KV cache: each of its layers attends to the target's K/V of the same layer type (the
target's last unshared layer of that type), and it drafts K tokens from one position, p = n - 1 (n = tokens
known), feeding cat(target's scaled embedding of the last token, a hidden state) through `pre_projection`: first
the target's final hidden state that predicted that token, then its own `post_projection` output.

Which target keys it sees follows transformers 5.25's `SinglePositionMultiTokenCandidateGenerator`, the reference
for its proposals: the K/V of the target's last forward (prefill or verification) as HF returns them, i.e. full
layers: positions 0 .. min(last written, n - 1); sliding layers: the forward's keys (its W - 1 cached predecessors
and its new tokens) cut to their first n entries, of which the last W_a + 1 (W_a: the assistant's window, HF's
inclusive bidirectional window). After a partly rejected verification both include K/V a rejected draft token left
at positions >= n - 1; they are still in our target cache (a rollback only relabels entries; a ring keeps W + K),
so we read the same values. The target's output does not depend on any of this: it only moves acceptance.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .checkpoint import load_state_dict, match_tensors
from .config import AssistantPlan, GemmaPlan, LayerPlan, assistant_plan_from_config, read_config_json, target_kv_layers
from .layers import AttentionWeights, GemmaBlock, make_norm


class AssistantAttention(AttentionWeights):
    """q_proj, q_norm, o_proj (HF names); keys and values are the target's."""

    def __init__(self, plan: GemmaPlan, layer: LayerPlan):
        super().__init__(plan, layer)
        self.layer = layer
        self.register_buffer("inv_freq", layer.rope.inv_freq(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv) -> torch.Tensor:
        """kv: (target keys, values [B, KV, T, D], visible [B, 1, S, T]), or a function of the rotated queries
        [B, heads, S, D] returning the attention output [B, S, heads * D] (the NxDI graph's sharded target caches,
        neuron/assistant.py)."""
        cos, sin = ops.rope_cos_sin(self.inv_freq, positions, x.dtype)
        q = self.q_norm(self.q_proj(x).view(*x.shape[:2], self.layer.num_heads, self.layer.head_dim))
        q = ops.apply_rope(q.transpose(1, 2), cos, sin)
        if callable(kv):
            return self.o_proj(kv(q))
        keys, values, visible = kv
        return self.o_proj(ops.attention(q, keys, values, visible, 1.0, None))  # Gemma 4: scale 1, no softcap


class _AssistantText(nn.Module):
    def __init__(self, plan: GemmaPlan):
        super().__init__()
        self.embed_tokens = nn.Embedding(plan.vocab_size, plan.hidden_size)  # the tied LM head; never an input
        self.layers = nn.ModuleList(GemmaBlock(plan, layer, AssistantAttention(plan, layer)) for layer in plan.layers)
        self.norm = make_norm(plan, plan.hidden_size)


class _MaskedEmbedder(nn.Module):
    def __init__(self, plan: AssistantPlan):
        super().__init__()
        self.centroids = nn.Linear(plan.text.hidden_size, plan.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(plan.text.vocab_size, dtype=torch.long))


class AssistantForCausalLM(nn.Module):
    """Parameter names equal HF's Gemma4AssistantForCausalLM."""

    def __init__(self, plan: AssistantPlan):
        super().__init__()
        text = plan.text
        self.plan = plan
        self.model = _AssistantText(text)
        self.lm_head = None if text.tie_word_embeddings else nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.pre_projection = nn.Linear(2 * plan.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, plan.backbone_hidden_size, bias=False)
        self.masked_embedding = _MaskedEmbedder(plan) if plan.ordered_embeddings else None

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_projection.weight.dtype

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, V] from the final hidden state h [B, H]. Ordered embeddings: only the tokens of the top-k centroids
        get a logit; every other token gets (the row's lowest selected logit - 1), so the argmax is over the selected
        ones as in HF (which takes the minimum over the whole batch; HF assisted generation runs batch 1)."""
        weight = self.head_weight()
        if self.masked_embedding is None:
            return nn.functional.linear(h, weight)
        plan, me = self.plan, self.masked_embedding
        top = torch.topk(me.centroids(h), plan.centroid_top_k, dim=-1).indices  # [B, k]
        clusters = me.token_ordering.view(plan.num_centroids, plan.text.vocab_size // plan.num_centroids)
        selected = clusters[top].reshape(h.shape[0], -1)  # [B, k * V/C] token ids
        scores = (h[:, None, :] @ weight[selected].transpose(-1, -2))[:, 0]  # [B, k * V/C]
        out = (scores.min(dim=-1, keepdim=True).values - 1.0).expand(-1, plan.text.vocab_size).clone()
        return out.scatter_(1, selected, scores)

    @torch.inference_mode()
    def step(self, x: torch.Tensor, positions: torch.Tensor, kv: dict[str, tuple[torch.Tensor, ...]]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft token: x [B, 1, 2 * backbone H] -> (logits [B, V], next hidden [B, 1, backbone H]).
        positions [B, 1]; kv: layer type -> (target keys, values [B, KV, T, D], visible [B, 1, 1, T])."""
        return self.draft_step(x, positions, kv)

    def draft_step(self, x: torch.Tensor, positions: torch.Tensor, kv: dict[str, tuple[torch.Tensor, ...]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` outside inference mode: the form a traced graph (neuron/assistant.py) calls."""
        h = self.pre_projection(x)
        for block in self.model.layers:
            attn = block.self_attn(block.attention_input(h), positions, kv[block.self_attn.layer.attention_type])
            h = block.after_attention(h, attn)
        h = self.model.norm(h)
        return self.logits(h[:, 0]), self.post_projection(h)


def expected_shapes(plan: AssistantPlan) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: t.shape for name, t in AssistantForCausalLM(plan).state_dict().items()}


def load_plan(model_dir) -> AssistantPlan:
    from pathlib import Path

    return assistant_plan_from_config(read_config_json(model_dir), str(Path(model_dir) / "config.json"))


def check_checkpoint(model_dir) -> AssistantPlan:
    """Plan and tensor names/shapes of an assistant checkpoint, from config.json and the safetensors headers."""
    plan = load_plan(model_dir)
    match_tensors(model_dir, plan.text, expected_shapes(plan))
    return plan


def load_assistant(model_dir, dtype: torch.dtype = torch.float32) -> AssistantForCausalLM:
    plan = load_plan(model_dir)
    with torch.device("meta"):
        model = AssistantForCausalLM(plan)
    state = load_state_dict(model_dir, plan.text, expected_shapes(plan), None, progress=False)
    # token_ordering stays integer (bf16 cannot hold ids above 256); every weight is cast to dtype.
    state = {n: t if n.endswith("token_ordering") else t.to(dtype) for n, t in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    for block, layer in zip(model.model.layers, plan.text.layers, strict=True):
        block.self_attn.inv_freq = layer.rope.inv_freq()
    return model.eval()


class AssistantDraft:
    """The assistant as a proposer for `speculation.generate`, reading the target's RowKVCache."""

    def __init__(self, assistant: AssistantForCausalLM, target):
        self.assistant, self.target = assistant, target
        self.plan = assistant.plan.text
        self.sources = target_kv_layers(target.plan)

    def ring_extra(self, k: int) -> int:
        """Target rings keep W + K entries (rollback) and at least the W_a + 1 keys the assistant reads."""
        windows = [layer.window for layer in self.plan.layers if layer.window]
        w_t = self.sources["sliding_attention"].window if "sliding_attention" in self.sources else 0
        return max([k] + [w + 1 - w_t for w in windows])

    def start(self, batch: int, needed: int, k: int, target_cache) -> None:
        self.cache = target_cache
        self.forward_start = torch.zeros(batch, dtype=torch.long)  # first position of the target's last forward
        self.written = torch.zeros(batch, dtype=torch.long)  # last position it wrote
        self.hidden = torch.zeros(batch, 1, self.target.plan.hidden_size, dtype=self.target.dtype)

    def prefill(self, row: int, prompt: list[int], hidden: torch.Tensor) -> None:
        self.forward_start[row], self.written[row], self.hidden[row] = 0, len(prompt) - 1, hidden[0, -1:]

    def verified(self, forward_start: torch.Tensor, written: torch.Tensor, hidden: torch.Tensor) -> None:
        """After a verification: its first and last positions per row, and the target's final hidden state at
        each row's last accepted input [B, 1, H]."""
        self.forward_start, self.written, self.hidden = forward_start, written, hidden

    def _target_kv(self, n: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        out = {}
        for layer_type in {layer.attention_type for layer in self.plan.layers}:
            source = self.sources[layer_type]
            cache = self.cache.layers[source.index]
            slot = torch.arange(cache.capacity)[None, :]
            hi = self.written[:, None]
            if source.window is None:
                held = slot.expand(len(n), -1)  # a full cache holds position i at slot i
                lo, top = torch.zeros_like(hi), torch.minimum(hi, n[:, None] - 1)
            else:  # a ring slot holds the latest position written there
                held = hi - (hi - slot) % cache.capacity
                first = (self.forward_start[:, None] - source.window + 1).clamp(min=0)
                top = torch.minimum(hi, first + n[:, None] - 1)
                window = next(layer.window for layer in self.plan.layers if layer.attention_type == layer_type)
                lo = torch.maximum(first, top - window)
            visible = (held >= lo) & (held <= top) & (held >= 0)
            out[layer_type] = (cache.k, cache.v, visible[:, None, None, :])
        return out

    @torch.inference_mode()
    def propose(self, seqs: list[list[int]], k: int) -> torch.Tensor:
        n = torch.tensor([len(s) for s in seqs])
        kv = self._target_kv(n)
        positions = (n - 1)[:, None]
        embed = self.target.model.embed_tokens.weight
        token = torch.tensor([[s[-1]] for s in seqs])
        hidden, out = self.hidden, []
        for _ in range(k):
            x = torch.cat([ops.scaled_embedding(embed, token, self.target.plan.hidden_size), hidden], dim=-1)
            logits, hidden = self.assistant.step(x, positions, kv)
            token = logits.argmax(-1)[:, None]
            out.append(token[:, 0])
        return torch.stack(out, dim=1)
