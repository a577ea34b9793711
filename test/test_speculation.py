"""Greedy speculative decoding on the CPU runtime is token-identical to the target's own greedy output.

Reference: Hugging Face transformers running the target alone, a plain argmax loop over the whole sequence (no
cache, no generate() logic). Prompts run past the sliding window (8) and the four rows sit at different positions
and accept different numbers of proposals, so ring caches wrap inside a verification and rejected tokens are
rolled back out of them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_hf_model, make_prompt, report, save_hf

from nxdi_gemma import speculation
from nxdi_gemma.cpu import load_model
from nxdi_gemma.errors import InputError

NEW_TOKENS = 24
PROMPT_LENGTHS = (21, 6, 30, 13)
TARGETS = ("gemma2", "gemma3", "gemma4_all")

# (c) drafts: another family or feature set, a different window (5) and head dims (8 / 16) than the targets.
_OTHER_DRAFT = {
    "gemma2": ("gemma3_text", "gemma3"),
    "gemma3": ("gemma2", "gemma2"),
    "gemma4_all": ("gemma4_text", "gemma4_e"),
}


@torch.no_grad()
def hf_argmax_loop(hf, prompt: list[int], new_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(new_tokens):
        ids = torch.tensor([seq])
        seq.append(int(hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()))
    return seq[len(prompt):]


_REFS: dict = {}
_DRAFTS: dict = {}


def references(case) -> tuple[list[list[int]], list[list[int]]]:
    if case.name not in _REFS:
        prompts = [make_prompt(n, case.vocab, seed=100 + i) for i, n in enumerate(PROMPT_LENGTHS)]
        _REFS[case.name] = prompts, [hf_argmax_loop(case.hf, p, NEW_TOKENS) for p in prompts]
    return _REFS[case.name]


def draft_model(tiny_case, target_name: str, kind: str, tmp_path_factory):
    case = tiny_case(target_name)
    if kind == "self":
        return case.ours
    key = (target_name, kind)
    if key not in _DRAFTS and kind == "noisy":  # the target plus noise: rows accept some proposals, not all
        model = load_model(case.path, progress=False)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for t in model.parameters():
                t.add_(0.03 * t.std() * torch.randn(t.shape, generator=gen) if t.numel() > 1 else 0)
        _DRAFTS[key] = model
    if key not in _DRAFTS:
        if kind == "random":
            model_type, config = case.model_type, case.config
            seed = 1
        else:
            model_type, fixture = _OTHER_DRAFT[target_name]
            config = dict(tiny_case(fixture).config, sliding_window=5, head_dim=8, num_hidden_layers=3,
                          layer_types=["sliding_attention", "full_attention", "sliding_attention"])
            if model_type == "gemma4_text":
                config.update(global_head_dim=16, num_kv_shared_layers=1)
            if model_type == "gemma2":
                config.pop("layer_types")
            seed = 2
        hf = build_hf_model(model_type, config, seed=seed)
        path = save_hf(hf, tmp_path_factory.mktemp(f"draft_{target_name}_{kind}"))
        _DRAFTS[key] = load_model(path, progress=False)
    return _DRAFTS[key]


@pytest.mark.parametrize("k", [2, 4, 7])
@pytest.mark.parametrize("kind", ["self", "random", "other", "noisy"])
@pytest.mark.parametrize("target_name", TARGETS)
def test_speculative_equals_target_greedy(tiny_case, tmp_path_factory, target_name, kind, k):
    case = tiny_case(target_name)
    prompts, expected = references(case)
    draft = draft_model(tiny_case, target_name, kind, tmp_path_factory)
    if kind == "other":
        assert draft.plan.layers[0].window != case.ours.plan.layers[0].window
        assert draft.plan.layers[0].head_dim != case.ours.plan.layers[0].head_dim
    out = speculation.generate(case.ours, draft, prompts, NEW_TOKENS, k, stop_on_eos=False)
    assert out.tokens == expected
    calls = out.target_calls_per_token()
    report(f"speculation {target_name} draft={kind} K={k}",
           f"acceptance {out.acceptance_rate:.2f}, target calls/token {calls:.3f} (1/(K+1) = {1 / (k + 1):.3f})")
    if kind == "noisy":
        assert 0 < out.acceptance_rate < 1  # rows accept partly, so they drift to different positions
    if kind == "self":
        assert out.acceptance_rate == 1.0
        assert calls <= 1 / (k + 1) + 0.02


def test_greedy_accept():
    proposals = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 6, 7]])
    target = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [5, 6, 7, 8]])
    assert speculation.greedy_accept(proposals, target).tolist() == [3, 1, 0]


def test_bad_combinations(tiny_case):
    g2, g4 = tiny_case("gemma2").ours, tiny_case("gemma4_all").ours
    import dataclasses
    other_vocab = dataclasses.replace(g4.plan, vocab_size=g4.plan.vocab_size + 1)
    with pytest.raises(InputError, match="vocabulary"):
        speculation.check_draft(g2.plan, other_vocab, 2)
    with pytest.raises(InputError, match="at least 1"):
        speculation.check_draft(g2.plan, g2.plan, 0)
    with pytest.raises(InputError, match="lower --num-speculative-tokens"):
        speculation.generate(g2, g2, [[3] * 10], 20, g2.plan.max_position_embeddings, stop_on_eos=False)


def test_ring_rollback_needs_the_extra_entries(tiny_case, tmp_path_factory, monkeypatch):
    """Negative control: with rings of exactly the window, a verification's rejected tokens evict keys that later
    queries need, and the output leaves the target's greedy one (so the identity above is a real test)."""
    from nxdi_gemma import cpu

    case = tiny_case("gemma3")
    prompts, expected = references(case)
    allocate = cpu.RowKVCache.allocate.__func__
    monkeypatch.setattr(cpu.RowKVCache, "allocate",
                        classmethod(lambda cls, *a, ring_extra: allocate(cls, *a, ring_extra=0)))
    draft = draft_model(tiny_case, "gemma3", "random", tmp_path_factory)
    assert speculation.generate(case.ours, draft, prompts, NEW_TOKENS, 4, stop_on_eos=False).tokens != expected
