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
    # Same family: one tokenizer, and the multimodal checkpoints only append tokens (Gemma 3 4B+: 262208 = Gemma 3
    # 1B's 262144 + 64 image tokens), so a draft may have fewer. Across families the sizes must be equal.
    same_family = draft.generation == target.generation and draft.vocab_size <= target.vocab_size
    if target.vocab_size != draft.vocab_size and not same_family:
        raise InputError(
            f"the draft's vocabulary ({draft.vocab_size} tokens) differs from the target's ({target.vocab_size}); "
            "speculation needs a draft with the same vocabulary (e.g. a smaller model of the same family)"
        )
    if num_speculative_tokens < 1:
        raise InputError(f"--num-speculative-tokens {num_speculative_tokens} must be at least 1")


def check_draft_dir(target: GemmaPlan, draft_dir: str, num_speculative_tokens: int) -> None:
    """A --draft directory: a Gemma checkpoint of the same vocabulary, or a Gemma 4 assistant for this target;
    checked from config.json and the safetensors headers (no weights read)."""
    from . import assistant
    from .checkpoint import check_checkpoint
    from .config import check_assistant_fits, is_assistant_config, read_config_json

    if is_assistant_config(read_config_json(draft_dir)):
        check_assistant_fits(target, assistant.check_checkpoint(draft_dir), f"--draft {draft_dir}")
        if num_speculative_tokens < 1:
            raise InputError(f"--num-speculative-tokens {num_speculative_tokens} must be at least 1")
        return
    check_draft(target, check_checkpoint(draft_dir), num_speculative_tokens)


def load_draft(draft_dir: str, target, dtype: torch.dtype):
    """The proposer for `generate`: a CPU model of the draft checkpoint, or an AssistantDraft on `target`."""
    from . import assistant
    from .config import is_assistant_config, read_config_json
    from .cpu import load_model

    if is_assistant_config(read_config_json(draft_dir)):
        return assistant.AssistantDraft(assistant.load_assistant(draft_dir, dtype), target)
    return load_model(draft_dir, dtype)


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
    rounds: list[list[list[int]]] | None = None  # per row, the proposals of each step it took part in

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def target_calls_per_token(self) -> float:
        """Verification calls per token of the longest row (batched rows share each call); the prefill, which every
        decoding needs once, is not counted."""
        return self.target_calls / max(1, max(len(t) for t in self.tokens))


class ModelDraft:
    """A separate draft model (any Gemma of the same vocabulary) with its own RowKVCache."""

    def __init__(self, model):
        self.model = model

    def ring_extra(self, k: int) -> int:
        return k

    def start(self, batch: int, needed: int, k: int, target_cache) -> None:
        from .cpu import RowKVCache

        # Per step the draft writes K + 1 positions from n - 2 and is rolled back to no less than n - 1.
        self.cache = RowKVCache.allocate(self.model.plan, batch, needed, self.model.dtype, ring_extra=k)

    def prefill(self, row: int, prompt: list[int], hidden: torch.Tensor) -> None:
        self.model.forward_rows(torch.tensor([prompt]), self.cache.rows(slice(row, row + 1)), last_only=True)

    def verified(self, forward_start: torch.Tensor, written: torch.Tensor, hidden: torch.Tensor) -> None:
        pass

    def propose(self, seqs: list[list[int]], k: int) -> torch.Tensor:
        self.cache.rollback(torch.tensor([len(s) for s in seqs]) - 2)
        token = self.model.forward_rows(torch.tensor([s[-2:] for s in seqs]), self.cache, last_only=True)[:, -1]
        out = [token.argmax(-1)]
        for _ in range(k - 1):
            out.append(self.model.forward_rows(out[-1][:, None], self.cache, last_only=True)[:, -1].argmax(-1))
        return torch.stack(out, dim=1)


def as_proposer(draft):
    """A cpu.GemmaForCausalLM draft, or an assistant.AssistantDraft as it is."""
    return draft if hasattr(draft, "propose") else ModelDraft(draft)


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
    """Greedy speculative decoding of a batch on the CPU runtime. target: `cpu.GemmaForCausalLM`; draft: another
    `cpu.GemmaForCausalLM` of the same vocabulary, or an `assistant.AssistantDraft` built on this target.

    A step proposes min(K, tokens still wanted - 1) tokens (the verification adds one more itself), as HF's
    assisted generation does."""
    from .cpu import RowKVCache, check_prompts, cut_after_eos

    plan, k = target.plan, num_speculative_tokens
    proposer = as_proposer(draft)
    draft_plan = proposer.model.plan if isinstance(proposer, ModelDraft) else None
    if draft_plan is not None:
        check_draft(plan, draft_plan, k)
    elif k < 1:
        raise InputError(f"--num-speculative-tokens {k} must be at least 1")
    check_prompts(prompts, plan.vocab_size)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1")
    limit = max_seq_len or min(plan.max_position_embeddings,
                               draft_plan.max_position_embeddings if draft_plan else plan.max_position_embeddings)
    longest = max(len(p) for p in prompts)
    # A verification may run past the last token kept: the caches need K + 1 positions beyond the output.
    needed = longest + max_new_tokens + k + 1
    if needed > limit:
        raise InputError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) + speculation ({k} + 1) = {needed} exceeds "
            f"the maximum sequence length {limit}; lower --num-speculative-tokens or --max-new-tokens"
        )
    batch = len(prompts)
    # Each verification writes K + 1 tokens and at most K of them are rolled back (see cpu.RowLayerCache).
    tcache = RowKVCache.allocate(plan, batch, needed, target.dtype, ring_extra=proposer.ring_extra(k))
    proposer.start(batch, needed, k, tcache)
    seqs = [list(p) for p in prompts]
    kept: list[list[torch.Tensor]] = [[] for _ in prompts]
    for r, p in enumerate(prompts):  # prefills, one row at a time (no padding in a RowKVCache)
        hidden = target.hidden_rows(torch.tensor([p]), tcache.rows(slice(r, r + 1)), last_only=True)
        first = target.logits(hidden)[0, -1]
        seqs[r].append(int(first.argmax()))
        kept[r].append(first[None].float())
        proposer.prefill(r, p, hidden)
    produced = torch.ones(batch, dtype=torch.long)
    eos = set(plan.eos_token_ids or ())
    done = [bool(stop_on_eos and seqs[r][-1] in eos) or max_new_tokens == 1 for r in range(batch)]
    result = SpeculativeGeneration([], 0, 0, 0, 0)
    result.rounds = [[] for _ in prompts]
    while not all(done):
        wanted = max(max_new_tokens - int(produced[r]) for r in range(batch) if not done[r])
        k_round = min(k, wanted - 1)
        proposals = proposer.propose(seqs, k_round) if k_round else torch.zeros(batch, 0, dtype=torch.long)
        result.draft_calls += k_round
        start = tcache.lengths.clone()
        verify = torch.cat([torch.tensor([[s[-1]] for s in seqs]), proposals], dim=1)
        hidden = target.hidden_rows(verify, tcache)
        target_logits = target.logits(hidden)
        target_tokens = target_logits.argmax(-1)
        result.target_calls += 1
        accepted = greedy_accept(proposals, target_tokens)
        for r in range(batch):
            if done[r]:
                continue
            a = int(accepted[r])
            result.proposed += k_round
            result.accepted += a
            if k_round:
                result.rounds[r].append(proposals[r].tolist())
            for i, t in enumerate(proposals[r, :a].tolist() + [int(target_tokens[r, a])]):
                seqs[r].append(t)
                if keep_logits:
                    kept[r].append(target_logits[r, i : i + 1].float())
                produced[r] += 1
                if produced[r] >= max_new_tokens or (stop_on_eos and t in eos):
                    done[r] = True
                    break
        proposer.verified(start, start + k_round, hidden[torch.arange(batch), accepted][:, None])
        tcache.rollback(torch.tensor([len(s) - 1 for s in seqs]))
    result.tokens = [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]
    if stop_on_eos:
        result.tokens = [cut_after_eos(row, plan.eos_token_ids) for row in result.tokens]
    if keep_logits:
        result.logits = [torch.cat(rows)[: len(t)] for rows, t in zip(kept, result.tokens, strict=True)]
    return result
