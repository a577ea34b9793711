"""Gemma 4 assistant drafters on the CPU runtime against transformers 5.25's own assisted generation.

A miniature random assistant (transformers `Gemma4AssistantForCausalLM`, ordered embeddings with a random token
ordering, its own window) and target are built and saved by transformers. HF's `generate(assistant_model=...)`
is run with its candidate generator's proposals recorded (a test-side wrapper); ours must propose the same tokens
at every step, and the output must equal the target's greedy output (a plain HF argmax loop).
"""

from __future__ import annotations

import pytest
import torch
from conftest import GEMMA4_TINY_ALL, GEMMA4_TINY_E, build_hf_model, make_prompt, report, save_hf
from test_speculation import hf_argmax_loop

from nxdi_gemma import speculation
from nxdi_gemma.assistant import AssistantDraft, check_checkpoint, load_assistant
from nxdi_gemma.config import ConfigError, check_assistant_fits
from nxdi_gemma.cpu import load_model
from nxdi_gemma.tiny import random_hf_assistant

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4AssistantForCausalLM"):
    pytest.skip("this transformers has no gemma4_assistant", allow_module_level=True)

NEW_TOKENS = 20
PROMPT_LENGTHS = (19, 5, 27)
TARGETS = {"gemma4_e": GEMMA4_TINY_E, "gemma4_all": GEMMA4_TINY_ALL}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = {}
    for name, config in TARGETS.items():
        root = tmp_path_factory.mktemp(f"assistant_{name}")
        target = build_hf_model("gemma4_text", config, seed=0)
        assistant = random_hf_assistant(config, seed=5)
        out[name] = (target, assistant, save_hf(target, root / "target"), save_hf(assistant, root / "assistant"))
    return out


@torch.no_grad()
def hf_assisted(target, assistant, prompt: list[int], new_tokens: int, k: int, monkeypatch):
    """HF's output tokens and its proposals per step (each: (sequence length before the step, proposed tokens))."""
    from transformers.generation import candidate_generator as cg

    rounds = []
    original = cg.SinglePositionMultiTokenCandidateGenerator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        candidate_ids, logits = original(self, input_ids, *args, **kwargs)
        if candidate_ids.shape[1] > input_ids.shape[1]:
            rounds.append((input_ids.shape[1], candidate_ids[0, input_ids.shape[1]:].tolist()))
        return candidate_ids, logits

    monkeypatch.setattr(cg.SinglePositionMultiTokenCandidateGenerator, "get_candidates", recording)
    assistant.generation_config.num_assistant_tokens = k
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    ids = torch.tensor([prompt])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=assistant, do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                          top_k=None, top_p=None)
    monkeypatch.undo()
    return out[0, len(prompt):].tolist(), rounds


def acceptance(rounds: list[tuple[int, list[int]]], seq: list[int]) -> tuple[int, int]:
    accepted = proposed = 0
    for start, tokens in rounds:
        proposed += len(tokens)
        for i, t in enumerate(tokens):
            if start + i >= len(seq) or seq[start + i] != t:
                break
            accepted += 1
    return accepted, proposed


# K in {2, 4, 7} spread over the two targets (each case runs HF's assisted generation on three prompts).
@pytest.mark.parametrize("name, k", [("gemma4_e", 2), ("gemma4_e", 7), ("gemma4_all", 4)])
def test_assistant_proposals_equal_hf(pairs, name, k, monkeypatch):
    target_hf, assistant_hf, target_path, assistant_path = pairs[name]
    target = load_model(target_path, progress=False)
    drafter = AssistantDraft(load_assistant(assistant_path), target)
    ours_acc = ours_prop = hf_acc = hf_prop = 0
    prompts = [make_prompt(n, 128, seed=200 + i) for i, n in enumerate(PROMPT_LENGTHS)]
    expected = [hf_argmax_loop(target_hf, p, NEW_TOKENS) for p in prompts]
    for prompt, greedy in zip(prompts, expected, strict=True):
        hf_tokens, hf_rounds = hf_assisted(target_hf, assistant_hf, prompt, NEW_TOKENS, k, monkeypatch)
        assert hf_tokens == greedy  # the reference itself keeps the target's greedy output
        out = speculation.generate(target, drafter, [prompt], NEW_TOKENS, k, stop_on_eos=False)
        assert out.tokens[0] == greedy
        assert out.rounds[0] == [tokens for _, tokens in hf_rounds]  # every step's proposals
        ours_acc, ours_prop = ours_acc + out.accepted, ours_prop + out.proposed
        a, p = acceptance(hf_rounds, prompt + greedy)
        hf_acc, hf_prop = hf_acc + a, hf_prop + p
    assert (ours_acc, ours_prop) == (hf_acc, hf_prop)
    report(f"assistant {name} K={k}", f"acceptance ours {ours_acc}/{ours_prop}, HF {hf_acc}/{hf_prop}")
    # Batched rows at different positions: still the target's greedy output.
    assert speculation.generate(target, drafter, prompts, NEW_TOKENS, k, stop_on_eos=False).tokens == expected


def test_assistant_that_does_not_fit_is_refused(pairs):
    _, _, target_path, assistant_path = pairs["gemma4_e"]
    plan = check_checkpoint(assistant_path)
    check_assistant_fits(load_model(target_path, progress=False).plan, plan)
    with pytest.raises(ConfigError, match="backbone_hidden_size=48 but the target's hidden_size is 64"):
        check_assistant_fits(load_model(pairs["gemma4_all"][2], progress=False).plan, plan)


def test_cli_with_assistant_draft(pairs, tmp_path, capsys):
    import json

    from nxdi_gemma.cli import main

    _, _, target_path, assistant_path = pairs["gemma4_e"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([make_prompt(17, 128, seed=300)]))
    argv = ["token-match", "--model", str(target_path), "--prompts", str(prompts), "--max-new-tokens", "8",
            "--num-speculative-tokens", "3", "--min-match", "1.0", "--draft"]
    assert main(argv + [str(assistant_path)]) == 0
    out, err = capsys.readouterr()
    assert "mean match rate: 100.0%" in out and "speculation: K=3" in err
    argv[2] = str(pairs["gemma4_all"][2])  # an assistant trained for another target
    assert main(argv + [str(assistant_path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "backbone_hidden_size=48" in lines[0]
