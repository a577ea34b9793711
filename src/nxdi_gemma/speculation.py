"""Greedy speculative decoding: a draft proposes K tokens, the target verifies K + 1 positions in one forward.

The accept rule is plain greedy (`greedy_accept`): a row keeps the longest prefix of the draft's proposals that
equals the target's own argmax at each position, plus the target's token after it, so the output is token-identical
to the target's greedy decoding whatever the draft proposes. The CPU loop (`generate`) runs batched rows that
accept different numbers of tokens, each at its own position, on `cpu.RowKVCache`s (rejected tokens rolled back).

Invariants of `generate` per row, with n = tokens known (prompt + generated): the target's cache holds n - 1
positions (the last token is fed by the next verification); the draft's cache is rolled back to n - 2 at the start
of a step and fed the last two tokens, so rows that accepted everything (the draft never saw its own last
proposal) and rows that accepted less run the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GemmaPlan
from .errors import InputError


def check_draft(target: GemmaPlan, draft: GemmaPlan, num_speculative_tokens: int) -> None:
    """Refuse a draft/target pair or K that cannot give the target's greedy output, before any work."""
    if target.vocab_size != draft.vocab_size:
        raise InputError(
            f"the draft's vocabulary ({draft.vocab_size} tokens) differs from the target's ({target.vocab_size}); "
            "speculation needs a draft with the same vocabulary (e.g. a smaller model of the same family)"
        )
    if num_speculative_tokens < 1:
        raise InputError(f"--num-speculative-tokens {num_speculative_tokens} must be at least 1")


def greedy_accept(proposals: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """Accepted proposals per row [B]: proposals [B, K] (the draft's), target_tokens [B, K + 1] (the target's argmax
    after the last known token and after each proposal). Row r then emits proposals[r, :a] and target_tokens[r, a].
    Static shapes only (cumprod over the match mask), so the same code serves traced graphs."""
    match = (proposals == target_tokens[:, :-1]).to(torch.int32)
    return torch.cumprod(match, dim=1).sum(dim=1)


@dataclass
class SpeculativeGeneration:
    tokens: list[list[int]]  # per row, the new tokens (cut after EOS when stopping on EOS)
    target_calls: int  # target forwards after the prefill (one verification each)
    draft_calls: int  # draft forwards after its prefill
    proposed: int  # draft tokens proposed to rows still generating
    accepted: int  # of those, accepted
    logits: list[torch.Tensor] | None = None  # per row, float32 [tokens, V]: the target logits each token came from

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def target_calls_per_token(self) -> float:
        """Verification calls per token of the longest row (batched rows share each call); the prefill, which every
        decoding needs once, is not counted."""
        return self.target_calls / max(1, max(len(t) for t in self.tokens))


@torch.inference_mode()
def generate(
    target,
    draft,
    prompts: list[list[int]],
    max_new_tokens: int,
    num_speculative_tokens: int,
    stop_on_eos: bool = True,
    max_seq_len: int | None = None,
    keep_logits: bool = False,
) -> SpeculativeGeneration:
    """Greedy speculative decoding of a batch on the CPU runtime (target and draft: `cpu.GemmaForCausalLM`)."""
    from .cpu import RowKVCache, check_prompts, cut_after_eos

    plan, k = target.plan, num_speculative_tokens
    check_draft(plan, draft.plan, k)
    check_prompts(prompts, plan.vocab_size)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1")
    limit = max_seq_len or min(plan.max_position_embeddings, draft.plan.max_position_embeddings)
    longest = max(len(p) for p in prompts)
    # A verification may run past the last token kept: the caches need K + 1 positions beyond the output.
    needed = longest + max_new_tokens + k + 1
    if needed > limit:
        raise InputError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) + speculation ({k} + 1) = {needed} exceeds "
            f"the maximum sequence length {limit}; lower --num-speculative-tokens or --max-new-tokens"
        )
    batch = len(prompts)
    # Each forward writes at most K + 1 tokens (verification) and at most K of them are rolled back.
    tcache = RowKVCache.allocate(plan, batch, needed, target.dtype, ring_extra=k)
    dcache = RowKVCache.allocate(draft.plan, batch, needed, draft.dtype, ring_extra=k)
    seqs = [list(p) for p in prompts]
    kept: list[list[torch.Tensor]] = [[] for _ in prompts]
    for r, p in enumerate(prompts):  # prefills, one row at a time (no padding in a RowKVCache)
        ids = torch.tensor([p])
        first = target.forward_rows(ids, tcache.rows(slice(r, r + 1)), last_only=True)[0, -1]
        seqs[r].append(int(first.argmax()))
        kept[r].append(first[None].float())
        draft.forward_rows(ids, dcache.rows(slice(r, r + 1)), last_only=True)
    produced = torch.ones(batch, dtype=torch.long)
    eos = set(plan.eos_token_ids or ())
    done = [bool(stop_on_eos and seqs[r][-1] in eos) or max_new_tokens == 1 for r in range(batch)]
    result = SpeculativeGeneration([], 0, 0, 0, 0)
    while not all(done):
        lengths = torch.tensor([len(s) for s in seqs])
        dcache.rollback(lengths - 2)
        logits = draft.forward_rows(torch.tensor([s[-2:] for s in seqs]), dcache, last_only=True)[:, -1]
        proposals = [logits.argmax(-1)]
        for _ in range(k - 1):
            proposals.append(draft.forward_rows(proposals[-1][:, None], dcache, last_only=True)[:, -1].argmax(-1))
        result.draft_calls += k
        proposals = torch.stack(proposals, dim=1)
        verify = torch.cat([torch.tensor([[s[-1]] for s in seqs]), proposals], dim=1)
        target_logits = target.forward_rows(verify, tcache)
        target_tokens = target_logits.argmax(-1)
        result.target_calls += 1
        accepted = greedy_accept(proposals, target_tokens)
        for r in range(batch):
            if done[r]:
                continue
            a = int(accepted[r])
            result.proposed += k
            result.accepted += a
            for i, t in enumerate(proposals[r, :a].tolist() + [int(target_tokens[r, a])]):
                seqs[r].append(t)
                if keep_logits:
                    kept[r].append(target_logits[r, i : i + 1].float())
                produced[r] += 1
                if produced[r] >= max_new_tokens or (stop_on_eos and t in eos):
                    done[r] = True
                    break
        tcache.rollback(torch.tensor([len(s) - 1 for s in seqs]))
    result.tokens = [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]
    if stop_on_eos:
        result.tokens = [cut_after_eos(row, plan.eos_token_ids) for row in result.tokens]
    if keep_logits:
        result.logits = [torch.cat(rows)[: len(t)] for rows, t in zip(kept, result.tokens, strict=True)]
    return result
