"""Ours vs Hugging Face on the five spec 8.1 fixtures (HF-made checkpoints, perturbed per spec 8.1).

Each fixture: a 24-token prompt (3x the window W = 8, ids >= 3), 32 greedy tokens. Logits must agree within 1e-4
at every prefill position and every decode step (from generate and teacher-forced), tokens 100 %. The float32
fixtures sit far below that (HF fp32 itself is ~1e-6..1e-5 from fp64, reported in the summary).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FLOOR,
    TINY_FIXTURES,
    hf_fp64_logits,
    hf_greedy,
    hf_logits,
    load_hf,
    make_prompt,
    max_diff,
    ours_teacher_forced,
    principled_bound,
    report,
)

from nxdi_gemma.cpu import KVCache, generate, left_pad, load_model

NAMES = list(TINY_FIXTURES)
PROMPT_LEN = 24  # 3x the window (8)
NEW_TOKENS = 32


class Golden:
    """HF's greedy run on one fixture, computed once per module."""

    def __init__(self, case):
        self.case = case
        self.prompt = make_prompt(PROMPT_LEN, case.vocab, seed=1)
        tokens, step_logits = hf_greedy(case.hf, torch.tensor([self.prompt]), NEW_TOKENS)
        self.tokens = tokens[0].tolist()
        self.step_logits = step_logits[0]  # [32, V]: the logits HF chose each token from
        self.seq = self.prompt + self.tokens
        self.teacher_forced = hf_logits(case.hf, torch.tensor([self.seq]))[0]  # [56, V]


@pytest.fixture(scope="module")
def golden(tiny_case):
    cache = {}

    def get(name: str) -> Golden:
        if name not in cache:
            cache[name] = Golden(tiny_case(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_hf_greedy_is_not_collapsed(golden, name):
    g = golden(name)
    assert len(set(g.tokens)) > 3, f"{name}: HF's 32 greedy tokens {g.tokens} are (nearly) one token"
    # min_new_tokens masks EOS: make sure it never changed HF's choice, so plain argmax is the reference
    assert g.step_logits.argmax(-1).tolist() == g.tokens


@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_all_positions(golden, name):
    g = golden(name)
    ours = g.case.ours
    cache = KVCache.allocate(ours.plan, 1, PROMPT_LEN, ours.dtype)
    logits = ours.forward_step(torch.tensor([g.prompt]), cache, torch.zeros(1, dtype=torch.long), last_only=False)
    diff = max_diff(logits[0], g.teacher_forced[:PROMPT_LEN])
    report(f"parity/{name}/prefill", f"max|ours - HF| = {diff:.2e} over {PROMPT_LEN} positions")
    assert diff <= FLOOR


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generate_matches_hf(golden, name):
    g = golden(name)
    out = generate(g.case.ours, [g.prompt], NEW_TOKENS, stop_on_eos=False, keep_logits=True)
    assert out.logits.shape == (1, NEW_TOKENS, g.case.vocab)
    step_diffs = (out.logits[0] - g.step_logits).abs().amax(dim=-1)
    report(
        f"parity/{name}/generate",
        f"max|ours - HF| per decode step <= {step_diffs.max().item():.2e}; tokens "
        f"{sum(a == b for a, b in zip(out.tokens[0], g.tokens, strict=True))}/{NEW_TOKENS}; distinct {len(set(g.tokens))}",
    )
    assert out.tokens[0] == g.tokens
    bad = [i for i, d in enumerate(step_diffs.tolist()) if d > FLOOR]
    assert not bad, f"decode steps {bad} differ by up to {step_diffs.max().item():.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_teacher_forced_logits_within_floor_and_principled_bound(golden, name):
    g = golden(name)
    ours = ours_teacher_forced(g.case.ours, g.seq, PROMPT_LEN)
    diff = max_diff(ours, g.teacher_forced)
    fp64 = hf_fp64_logits(g.case.path, g.case.model_type, g.seq)
    bound, dev = principled_bound(g.teacher_forced, fp64)
    report(
        f"parity/{name}/teacher-forced",
        f"max|ours - HF fp32| = {diff:.2e}; |HF fp32 - fp64| = {dev:.2e}; |ours - fp64| = "
        f"{max_diff(ours, fp64):.2e}; bound {bound:.1e}",
    )
    assert diff <= FLOOR
    assert diff <= bound


@pytest.mark.parametrize("name", NAMES)
def test_decode_far_past_the_window(tiny_case, name):
    """Prompt of 5 tokens, 40 new tokens with W = 8: the sliding ring wraps ~5 times."""
    case = tiny_case(name)
    prompt = make_prompt(5, case.vocab, seed=7)
    tokens, step_logits = hf_greedy(case.hf, torch.tensor([prompt]), 40)
    out = generate(case.ours, [prompt], 40, stop_on_eos=False, keep_logits=True)
    diff = max_diff(out.logits[0], step_logits[0])
    report(f"parity/{name}/5+40 decode", f"max|ours - HF| = {diff:.2e}; distinct {len(set(tokens[0].tolist()))}")
    assert out.tokens[0] == tokens[0].tolist()
    assert diff <= FLOOR


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch(tiny_case, name):
    """Three prompts of different lengths in one left-padded batch: each row generates what the prompt generates
    alone (ours), and what HF generates on the same padded batch with its attention mask."""
    case = tiny_case(name)
    prompts = [make_prompt(n, case.vocab, seed=10 + n) for n in (24, 17, 9)]
    batch = generate(case.ours, prompts, 16, stop_on_eos=False, keep_logits=True)
    for row, prompt in enumerate(prompts):
        alone = generate(case.ours, [prompt], 16, stop_on_eos=False, keep_logits=True)
        assert batch.tokens[row] == alone.tokens[0], f"row {row} differs from its unpadded run"
        assert max_diff(batch.logits[row], alone.logits[0]) <= FLOOR

    ids, pads = left_pad(prompts, case.config["pad_token_id"])
    mask = (torch.arange(ids.shape[1])[None, :] >= pads[:, None]).long()
    hf_tokens, hf_step_logits = hf_greedy(case.hf, ids, 16, attention_mask=mask)
    diff = max_diff(batch.logits, hf_step_logits)
    report(f"parity/{name}/padded batch", f"max|ours - HF| = {diff:.2e} (3 rows, lengths 24/17/9, 16 steps)")
    assert batch.tokens == hf_tokens.tolist()
    assert diff <= FLOOR


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_match_rate(tiny_case, name):
    """bf16: ours and HF (eager) both loaded in bfloat16. Only reported: bf16 rounding order differs between
    implementations, and a near-tie flips a greedy token (MoE routing flips amplify it)."""
    case = tiny_case(name)
    prompt = make_prompt(PROMPT_LEN, case.vocab, seed=1)
    hf = load_hf(case.path, case.model_type, torch.bfloat16)
    ours = load_model(case.path, torch.bfloat16, progress=False)
    assert ours.dtype == torch.bfloat16
    hf_tokens, hf_step_logits = hf_greedy(hf, torch.tensor([prompt]), NEW_TOKENS)
    hf_tokens = hf_tokens[0].tolist()
    out = generate(ours, [prompt], NEW_TOKENS, stop_on_eos=False, keep_logits=True)
    rate = sum(a == b for a, b in zip(out.tokens[0], hf_tokens, strict=True)) / NEW_TOKENS
    # teacher-forced on HF's bf16 sequence: argmax agreement at every decode position
    seq = prompt + hf_tokens
    ours_tf = ours_teacher_forced(ours, seq, PROMPT_LEN)[PROMPT_LEN - 1 : -1]
    hf_tf = hf_logits(hf, torch.tensor([seq]))[0, PROMPT_LEN - 1 : -1]
    tf_rate = (ours_tf.argmax(-1) == hf_tf.argmax(-1)).float().mean().item()
    report(
        f"parity/{name}/bf16",
        f"greedy token match {rate:.3f}; teacher-forced argmax match {tf_rate:.3f}; "
        f"max|ours - HF| teacher-forced {max_diff(ours_tf, hf_tf):.3f}",
    )
    assert isinstance(rate, float) and 0.0 <= rate <= 1.0
    assert 0.0 <= tf_rate <= 1.0




@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_decode_is_bit_exact_to_hf_eager(tiny_case, name):
    """Same dtype behaviour as HF (spec 6): in bf16, our decode logits equal HF eager's bit for bit, step by step
    on HF's own greedy sequence (teacher-forced through our KV cache)."""
    case = tiny_case(name)
    prompt = make_prompt(PROMPT_LEN, case.vocab, seed=1)
    hf = load_hf(case.path, case.model_type, torch.bfloat16)
    tokens, step_logits = hf_greedy(hf, torch.tensor([prompt]), 16)
    ours = load_model(case.path, torch.bfloat16, progress=False)
    seq = prompt + tokens[0].tolist()
    ours_steps = ours_teacher_forced(ours, seq, PROMPT_LEN)[PROMPT_LEN - 1 : -1]
    diffs = (ours_steps - step_logits[0]).abs().amax(dim=-1)
    report(f"parity/{name}/bf16 decode", f"max|ours - HF| per step {[round(d, 4) for d in diffs.tolist()[:6]]}...")
    assert diffs.max().item() == 0.0, f"first differing decode step {int((diffs > 0).nonzero()[0])}"


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_moe_experts_bfloat16_accumulate_as_hf(implementation):
    """Real top-k (8 of 16 experts), bf16: our CPU experts equal HF's experts module bit for bit under HF's default
    `grouped_mm` path (each slot's output rounded, weighted in float32, summed over slots in float32, rounded once).
    HF's eager path instead adds each expert's rounded product into a bf16 accumulator, expert by expert: with 8
    slots that rounds differently, so ours must differ from it (this is what tells the two orders apart)."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4TextRouter

    from nxdi_gemma.config import MoeSpec
    from nxdi_gemma.layers import MoeExperts

    hidden, num_experts, top_k, width, tokens = 256, 16, 8, 32, 4096  # the old expert-order sum: 44 differ
    config = Gemma4TextConfig(hidden_size=hidden, num_experts=num_experts, top_k_experts=top_k,
                              moe_intermediate_size=width, hidden_activation="gelu_pytorch_tanh")
    config._experts_implementation = implementation
    gen = torch.Generator().manual_seed(0)
    hf = Gemma4TextExperts(config).to(torch.bfloat16)
    router = Gemma4TextRouter(config)
    ours = MoeExperts(hidden, MoeSpec(num_experts, top_k, width)).to(torch.bfloat16)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            value = (torch.randn(getattr(hf, name).shape, generator=gen) * 0.3).to(torch.bfloat16)
            getattr(hf, name).copy_(value)
            getattr(ours, name).copy_(value)
        router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=gen))
        router.per_expert_scale.copy_(1.0 + 0.3 * torch.randn(num_experts, generator=gen))
        x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
        _, weights, experts = router(x.float())
        expected = hf(x, experts, weights)
        got = ours(x, weights, experts)
    assert got.dtype == expected.dtype == torch.bfloat16
    differing = (got != expected).sum().item()
    report(f"moe experts bf16 vs HF {implementation}", f"{differing} of {got.numel()} outputs differ")
    if implementation == "grouped_mm":
        assert differing == 0
    else:
        assert differing > 0
