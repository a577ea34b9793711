"""The `nxdi-gemma` commands end to end on the embedded tiny checkpoints, against HF transformers."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from nxdi_gemma.cli import main
from nxdi_gemma.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "g4", "gemma4"))


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "gemma4", "gemma4_unified"])
def test_token_match_embedded_default_json(kind, tmp_path, capsys):
    out_json = tmp_path / "report.json"
    code, out, _ = run(["token-match", "--tiny", kind, "--max-new-tokens", "16", "--json", str(out_json),
                        "--min-match", "1.0"], capsys)
    assert code == 0
    report = json.loads(out_json.read_text())
    assert {"model", "backend", "dtype", "max_new_tokens", "mean_match_rate", "prompts"} <= set(report)
    assert report["backend"] == "cpu" and report["dtype"] == "float32" and report["max_new_tokens"] == 16
    assert report["mean_match_rate"] == 1.0
    for p in report["prompts"]:
        assert set(p) >= {"prompt", "match_rate", "first_divergence", "max_abs_logit_diff", "tokens",
                          "reference_tokens"}
        assert p["first_divergence"] is None and p["max_abs_logit_diff"] <= 1e-4
        assert p["tokens"] == p["reference_tokens"] and len(p["tokens"]) == 16
    distinct = {t for p in report["prompts"] for t in p["reference_tokens"]}
    assert len(distinct) > 5, "the tiny model's greedy output collapsed; the match would prove nothing"
    assert "mean match rate: 100.0%" in out


def test_token_match_bfloat16_reports_rate(tiny4, tmp_path, capsys):
    out_json = tmp_path / "bf16.json"
    code, _, _ = run(["token-match", "--model", tiny4, "--dtype", "bfloat16", "--max-new-tokens", "8",
                      "--json", str(out_json)], capsys)
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["dtype"] == "bfloat16" and 0.0 <= report["mean_match_rate"] <= 1.0


def test_token_id_prompts_and_golden_round_trip(tiny4, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[5, 17, 99, 42, 7, 8, 9, 10, 11, 12], "def add(a, b):"]))
    golden = tmp_path / "golden.json"
    code, _, _ = run(["reference", "--model", tiny4, "--prompts", str(prompts), "--out", str(golden),
                      "--max-new-tokens", "12"], capsys)
    assert code == 0
    live, via_golden = tmp_path / "live.json", tmp_path / "golden_report.json"
    assert run(["token-match", "--model", tiny4, "--prompts", str(prompts), "--max-new-tokens", "12",
                "--json", str(live)], capsys)[0] == 0
    assert run(["token-match", "--model", tiny4, "--reference", str(golden), "--json", str(via_golden),
                "--min-match", "1.0"], capsys)[0] == 0
    a, b = json.loads(live.read_text()), json.loads(via_golden.read_text())
    assert [p["reference_tokens"] for p in a["prompts"]] == [p["reference_tokens"] for p in b["prompts"]]
    assert all(p["max_abs_logit_diff"] <= 1e-4 for p in b["prompts"])

    # A reference that disagrees (every token shifted) must fail --min-match with exit status 1.
    doc = json.loads(golden.read_text())
    for item in doc["prompts"]:
        item["tokens"] = [(t + 1) % 264 for t in item["tokens"]]
    golden.write_text(json.dumps(doc))
    code, _, err = run(["token-match", "--model", tiny4, "--reference", str(golden), "--min-match", "0.5"], capsys)
    assert code == 1 and "below --min-match" in err


def test_generate_greedy_and_seeded_sampling(tiny4, capsys):
    base = ["generate", "--model", tiny4, "--prompt", "def f(x):", "--prompt", "SELECT", "--max-new-tokens", "6"]
    code, out, _ = run(base, capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 2 and all(len(r["tokens"]) <= 6 for r in rows)
    sampled = base + ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "3"]
    assert run(sampled, capsys)[1] == run(sampled, capsys)[1]  # seeded sampling is reproducible


@pytest.mark.parametrize(
    "argv_tail, needle",
    [
        (["--prompts", "PROMPTS_EMPTY"], "prompt 0 is empty"),
        (["--prompts", "PROMPTS_LONG"], "exceeds the maximum sequence length 512"),
        (["--prompts", "PROMPTS_BAD"], "must be a string or a list of token ids"),
        (["--backend", "neuron"], "--compiled"),
    ],
)
def test_token_match_bad_input_is_one_line(argv_tail, needle, tiny4, tmp_path, capsys):
    files = {"PROMPTS_EMPTY": [[]], "PROMPTS_LONG": [[5] * 600], "PROMPTS_BAD": [{"text": 1}]}
    argv = ["token-match", "--model", tiny4, "--max-new-tokens", "4"]
    for arg in argv_tail:
        if arg in files:
            path = tmp_path / f"{arg}.json"
            path.write_text(json.dumps(files[arg]))
            arg = str(path)
        argv.append(arg)
    code, _, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def test_text_prompt_without_tokenizer_is_refused(tiny4, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny4, bare)
    (bare / "tokenizer.json").unlink()
    code, _, err = run(["token-match", "--model", str(bare), "--max-new-tokens", "2"], capsys)
    assert code == 2 and "no tokenizer.json" in err


def _nxdi_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("neuronx_distributed_inference") is not None


@pytest.mark.skipif(_nxdi_importable(), reason="checks the message shown when the Neuron SDK is missing")
def test_neuron_commands_without_sdk_say_what_to_install(tiny4, tmp_path, capsys):
    config = "compile_configs/gemma-3-1b__inf2.xlarge.json"
    code, _, err = run(["compile", "--model", tiny4, "--config", config, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "needs the Neuron SDK" in err and "neuronx-distributed-inference" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
    code, _, err = run(["generate", "--model", tiny4, "--backend", "neuron", "--compiled", str(tmp_path), "--prompt",
                        "def"], capsys)
    assert code == 2 and "needs the Neuron SDK" in err


def test_compile_config_errors_are_one_line(tiny4, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "gemma-3-1b"}')
    for path, needle in ((tmp_path / "missing.json", "cannot read a compile config"), (bad, "'neuron_config'")):
        code, _, err = run(["compile", "--model", tiny4, "--config", str(path), "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["generate", "--model", tiny4, "--backend", "neuron", "--prompt", "x"], capsys)
    assert code == 2 and "--compiled" in err


def test_benchmark_cpu_writes_json_and_chart(tiny4, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out, _ = run(["benchmark", "--model", tiny4, "--prompt-len", "12", "--max-new-tokens", "4", "--runs", "2",
                        "--batch", "2", "--json", str(out_json), "--png", str(out_png)], capsys)
    assert code == 0
    doc = json.loads(out_json.read_text())
    assert doc["backend"] == "cpu" and doc["batch_size"] == 2 and doc["runs"] == 2
    assert len(doc["ttft_s"]) == 2 and len(doc["token_latency_s"]) == 2 * 3  # (new tokens - 1) decode steps a run
    latency = doc["token_latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    assert doc["throughput_tokens_per_s"] > 0 and doc["vs_hf"]["ratio"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(["benchmark", "--model", tiny4, "--backend", "neuron"], capsys)
    assert code == 2 and "--compiled" in err


# --------------------------------------------------------------------------------------------------------------
# Bad checkpoints: validated by our loader before Hugging Face or NxDI open the directory; nothing is unpickled.


class _PlantedPickle:
    """Unpickling this (as torch.load(weights_only=False) or pickle.load would) creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every way a loader could unpickle a file fails the test (the marker file catches the rest)."""
    import pickle

    import torch

    calls = []

    def tripwire(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: something tried to unpickle a checkpoint file")

        return refuse

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, tripwire(f"{module.__name__}.{name}"))
    return calls


def _edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def _bad_checkpoint(kind, tiny4, tmp_path):
    """(directory, file the error must name, words of the advice) for each kind of bad checkpoint."""
    import shutil

    bad = tmp_path / f"bad-{kind}"
    if kind == "missing directory":
        return bad, str(bad), "point --model at"
    shutil.copytree(tiny4, bad)
    weights = bad / "model.safetensors"
    if kind == "unsupported model_type":
        _edit_config(bad, lambda c: c.update(model_type="llama"))
        return bad, str(bad / "config.json"), "expected one of"
    if kind == "missing field":
        _edit_config(bad, lambda c: c.pop("hidden_size"))
        return bad, str(bad / "config.json"), "copy the checkpoint's full config.json"
    if kind == ".bin only":
        weights.unlink()
        (bad / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _PlantedPickle(tmp_path / "MARKER")}))
        return bad, "pytorch_model.bin", "convert them once"
    if kind == "truncated safetensors":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])  # an interrupted download: the header is intact
        return bad, str(weights), "re-download"
    if kind == "shape mismatch":
        _edit_config(bad, lambda c: c.update(intermediate_size=2 * c["intermediate_size"]))
        return bad, str(weights), "use the config.json they were saved with"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing directory", "unsupported model_type", "missing field", ".bin only",
                                  "truncated safetensors", "shape mismatch"])
def test_bad_checkpoint_through_token_match_is_one_line(kind, tiny4, tmp_path, capsys, no_unpickling):
    path, names, advice = _bad_checkpoint(kind, tiny4, tmp_path)
    code, out, err = run(["token-match", "--model", str(path), "--max-new-tokens", "2"], capsys)
    assert code == 2 and out == "", (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert names in err and advice in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "MARKER").exists() and not no_unpickling


@pytest.mark.parametrize("command", [
    ["token-match"], ["reference", "--out", "OUT"], ["generate", "--prompt", "def"], ["benchmark"],
    ["compile", "--config", "compile_configs/gemma-3-1b__inf2.xlarge.json", "--out", "OUT"],
])
def test_pickle_only_checkpoint_is_never_unpickled_by_any_command(command, tiny4, tmp_path, capsys, no_unpickling):
    """compile checks the checkpoint before the compile config and before importing NxDI: the checkpoint error
    comes first whether or not the Neuron SDK is installed."""
    path, _, _ = _bad_checkpoint(".bin only", tiny4, tmp_path)
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command]
    code, out, err = run([*argv, "--model", str(path)], capsys)
    assert code == 2 and out == "", (out, err)
    assert len(err.splitlines()) == 1 and "pytorch_model.bin" in err and "never unpickled" in err, err
    assert not (tmp_path / "MARKER").exists() and not no_unpickling
    assert not (tmp_path / "out").exists()


def test_planted_pickle_would_leave_the_marker(tmp_path):
    """The trap is real: unpickling the planted file does create the marker (so its absence above means something)."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps({"weight": _PlantedPickle(marker)}))
    assert marker.exists()


def test_hf_is_asked_for_safetensors_only(tiny4, tmp_path, no_unpickling):
    """Defence in depth behind our validation: HF itself is told to read safetensors only, so even called on a
    pickle-only directory it refuses instead of unpickling."""
    from nxdi_gemma.reference import load_hf_model

    path, _, _ = _bad_checkpoint(".bin only", tiny4, tmp_path)
    with pytest.raises(OSError, match="model.safetensors"):
        load_hf_model(path, torch.float32)
    assert not (tmp_path / "MARKER").exists() and not no_unpickling


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nxdi_gemma.cli", *argv], capture_output=True, text=True,
                          timeout=600, check=False)


def test_main_job_output_is_free_of_warnings():
    """`nxdi-gemma token-match` on the embedded default, as a user runs it: stderr holds only our notice (no
    transformers deprecation warnings, e.g. for `past_key_values`)."""
    result = _cli("token-match", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["no --model given: using the embedded random tiny gemma3 checkpoint"]
    assert "mean match rate: 100.0%" in result.stdout


def test_truncated_checkpoint_through_the_real_entry_point(tiny4, tmp_path):
    path, _, _ = _bad_checkpoint("truncated safetensors", tiny4, tmp_path)
    result = _cli("token-match", "--model", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "truncated" in result.stderr, result.stderr


@pytest.mark.parametrize("name, text", [("tokenizer.json", '{"model": '), ("tokenizer.json", "{}"),
                                        ("tokenizer_config.json", '{"bos_token": 3')])
def test_unreadable_tokenizer_files_are_one_line(name, text, tiny4, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad-tokenizer"
    shutil.copytree(tiny4, bad)
    (bad / name).write_text(text)
    code, out, err = run(["token-match", "--model", str(bad), "--max-new-tokens", "2"], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and str(bad / name) in err and "re-download" in err


def _unified_bad(tmp_path, form: str):
    """A multimodal `gemma4_unified` checkpoint (the tiny 12B-like weights under model.language_model.) whose config's
    text part is `form`: missing, incomplete, of another family, or inconsistent with the 12B block."""
    from nxdi_gemma.tiny import TINY_CONFIGS

    text = {k: v for k, v in TINY_CONFIGS["gemma4_unified"].items() if k != "architectures"}
    bad = tmp_path / form.replace(" ", "_")
    write_tiny_checkpoint(bad, "gemma4_unified")
    config = {"model_type": "gemma4_unified", "architectures": ["Gemma4UnifiedForConditionalGeneration"],
              "tie_word_embeddings": True, "text_config": text}
    if form == "no text_config":
        del config["text_config"]
    elif form == "no hidden_size":
        del text["hidden_size"]
    elif form == "gemma4_text decoder":
        text["model_type"] = "gemma4_text"
    elif form == "with MoE":
        text["enable_moe_block"] = True
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("form, needle", [("no text_config", "text_config"), ("no hidden_size", "hidden_size"),
                                          ("gemma4_text decoder", "gemma4_text"), ("with MoE", "enable_moe_block")])
@pytest.mark.parametrize("command", ["plan", "token-match"])
def test_bad_gemma4_unified_config_is_one_line(form, needle, command, tmp_path, capsys, no_unpickling):
    bad = _unified_bad(tmp_path, form)
    argv = {"plan": ["plan", "--model", str(bad), "--instance", "trn1.2xlarge"],
            "token-match": ["token-match", "--model", str(bad), "--max-new-tokens", "2"]}[command]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "", (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err and str(bad / "config.json") in err, err
    assert "Traceback" not in err and not no_unpickling
