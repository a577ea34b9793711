"""`nxdi-gemma generate/benchmark/token-match --draft DIR`: greedy speculative decoding from the command line,
against HF transformers (token-match) and our own plain greedy decoding (generate); bad combinations are one line."""

import json

import pytest

from nxdi_gemma.cli import main
from nxdi_gemma.tiny import TINY_CONFIGS, byte_tokenizer_json, random_weights, save_checkpoint, write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_cli")
    other_vocab = dict(TINY_CONFIGS["gemma3"], vocab_size=300)
    return {
        "target": str(write_tiny_checkpoint(root / "g4", "gemma4")),
        "draft": str(write_tiny_checkpoint(root / "g3", "gemma3", seed=1)),  # another family (no PLE, KV sharing, MoE)
        "vocab300": str(save_checkpoint(root / "v300", other_vocab, random_weights(other_vocab, 0),
                                        {"tokenizer.json": byte_tokenizer_json()})),
    }


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("draft", ["target", "draft"])
def test_token_match_with_draft(ckpts, draft, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run(["token-match", "--model", ckpts["target"], "--draft", ckpts[draft],
                          "--num-speculative-tokens", "3", "--max-new-tokens", "12", "--json", str(out_json),
                          "--min-match", "1.0"], capsys)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["mean_match_rate"] == 1.0
    assert all(p["max_abs_logit_diff"] <= 1e-4 for p in report["prompts"])
    if draft == "target":
        assert "acceptance 100.0%" in err


def test_generate_with_draft_equals_plain_greedy(ckpts, capsys):
    base = ["generate", "--model", ckpts["target"], "--prompt", "def f(x):", "--prompt", "SELECT name FROM t",
            "--max-new-tokens", "10"]
    plain = run(base, capsys)
    spec = run(base + ["--draft", ckpts["draft"], "--num-speculative-tokens", "2"], capsys)
    assert plain[0] == spec[0] == 0 and plain[1] == spec[1]
    assert "speculation: K=2" in spec[2]


def test_benchmark_with_draft(ckpts, tmp_path, capsys):
    out_json = tmp_path / "b.json"
    code, _, err = run(["benchmark", "--model", ckpts["target"], "--draft", ckpts["target"], "--batch", "2",
                        "--prompt-len", "12", "--max-new-tokens", "9", "--runs", "1", "--json", str(out_json)], capsys)
    assert code == 0, err
    summary = json.loads(out_json.read_text())
    assert summary["acceptance_rate"] == 1.0 and summary["num_speculative_tokens"] == 4
    assert summary["speculative_tokens_per_s"] > 0 and summary["plain_tokens_per_s"] > 0


@pytest.mark.parametrize(
    "tail, needle",
    [
        (["--draft", "vocab300"], "vocabulary (300 tokens) differs"),
        (["--draft", "draft", "--num-speculative-tokens", "0"], "must be at least 1"),
        (["--draft", "draft", "--num-speculative-tokens", "600"], "lower --num-speculative-tokens"),
        (["--num-speculative-tokens", "2"], "needs --draft"),
        (["--draft", "draft", "--backend", "neuron"], "given at compile time"),
        (["--draft", "draft", "--temperature", "0.7"], "decodes greedily"),
    ],
)
def test_bad_draft_combinations_are_one_line(ckpts, tail, needle, capsys):
    argv = ["generate", "--model", ckpts["target"], "--prompt", "hi", "--max-new-tokens", "4"]
    argv += [ckpts.get(a, a) for a in tail]
    code, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and not out, err
