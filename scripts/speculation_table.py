"""Print the README's draft-per-target table: planner figures (batch-1 decode roofline, 4K context, bf16) of each
public target with its smallest same-vocabulary draft, at two per-token acceptance rates."""

from nxdi_gemma.planning import memory_plan, speculation_plan
from nxdi_gemma.public_models import public_plan

PAIRS = [  # (target, draft, instance)
    ("gemma-2-9b", "gemma-2-2b", "inf2.24xlarge"),
    ("gemma-2-27b", "gemma-2-2b", "trn2.3xlarge"),
    ("gemma-3-12b", "gemma-3-1b", "inf2.24xlarge"),
    ("gemma-3-27b", "gemma-3-1b", "trn2.3xlarge"),
    ("gemma-4-31b", "gemma-4-e2b", "trn2.3xlarge"),
    ("gemma-4-26b-a4b", "gemma-4-e2b", "trn2.3xlarge"),
]


def main() -> None:
    print("| target | draft | instance (TP) | plain tok/s | alpha 0.6: best K, tok/s | alpha 0.8: best K, tok/s |")
    print("|---|---|---|---|---|---|")
    for target, draft, instance in PAIRS:
        cells = []
        for alpha in (0.6, 0.8):
            p = speculation_plan(public_plan(target), public_plan(draft), instance, alpha, seq_len=4096)
            cells.append(f"K={p.num_speculative_tokens}, {p.speculative_tokens_per_s:.0f} ({p.speedup:.2f}x)")
        tp = memory_plan(public_plan(target), instance, seq_len=4096).tp
        print(f"| {target} | {draft} | {instance} (TP{tp}) | {p.target_tokens_per_s:.0f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
