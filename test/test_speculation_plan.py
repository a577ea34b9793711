"""Planner: expected tokens/s with a draft at a given acceptance rate (batch-1 decode roofline)."""

import pytest

from nxdi_gemma.cli import main
from nxdi_gemma.errors import InputError
from nxdi_gemma.planning import expected_tokens_per_step, memory_plan, speculation_plan
from nxdi_gemma.public_models import public_plan


def test_expected_tokens_per_step_by_hand():
    assert expected_tokens_per_step(0.0, 4) == 1.0  # only the target's own token
    assert expected_tokens_per_step(1.0, 4) == 5.0  # every proposal plus the bonus token
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_self_draft_with_full_acceptance_breaks_even():
    """Drafting with the target itself, all accepted: K + 1 tokens for K + 1 target reads, plain speed."""
    target = public_plan("gemma-3-4b")
    spec = speculation_plan(target, target, "trn2.3xlarge", 1.0, k=4, seq_len=4096)
    assert spec.speculative_tokens_per_s == pytest.approx(spec.target_tokens_per_s)


def test_small_draft_speeds_up_and_matches_the_rooflines():
    target, draft = public_plan("gemma-3-27b"), public_plan("gemma-3-1b")
    spec = speculation_plan(target, draft, "trn2.3xlarge", 0.7, k=4, seq_len=4096)
    t = 1 / memory_plan(target, "trn2.3xlarge", 4, 1, 4096).decode_tokens_per_s
    d = 1 / memory_plan(draft, "trn2.3xlarge", 4, 1, 4096).decode_tokens_per_s
    assert spec.speculative_tokens_per_s == pytest.approx(expected_tokens_per_step(0.7, 4) / (t + 4 * d))
    assert spec.speedup > 1.5 and spec.fits
    best = speculation_plan(target, draft, "trn2.3xlarge", 0.7, seq_len=4096)
    assert best.speculative_tokens_per_s >= spec.speculative_tokens_per_s


def test_refusals(capsys):
    with pytest.raises(InputError, match="must be in"):
        speculation_plan(public_plan("gemma-3-27b"), public_plan("gemma-3-1b"), "trn2.3xlarge", 1.5)
    code = main(["plan", "--model", "gemma-3-27b", "--instance", "trn2.3xlarge", "--draft", "gemma-2-2b",
                 "--acceptance", "0.7"])
    assert code == 2 and "vocabulary (256000 tokens) differs" in capsys.readouterr().err
    code = main(["plan", "--model", "gemma-3-27b", "--instance", "trn2.3xlarge", "--draft", "gemma-3-1b"])
    assert code == 2 and "--acceptance" in capsys.readouterr().err
    assert main(["plan", "--model", "gemma-3-27b", "--instance", "trn2.3xlarge", "--draft", "gemma-3-1b",
                 "--acceptance", "0.7", "--seq-len", "4096"]) == 0
    assert "tokens/s vs" in capsys.readouterr().out


def test_readme_draft_table_is_generated(capsys):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("speculation_table", root / "scripts" / "speculation_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    assert capsys.readouterr().out.strip() in (root / "README.md").read_text()
