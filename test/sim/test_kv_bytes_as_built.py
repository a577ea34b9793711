"""The planner's KV bytes (`planning.kv_cache_bytes`, `planning.block_kv_cache_bytes`) equal what our classes
allocate in NxDI (kv_bytes_driver.py, CPU mode): the contiguous layout with and without prefill chunks (full
layers' spare slots) and the block layout of prefix caching (its spare block), on Gemma 3 and on Gemma 4 with KV
sharing (layers without a cache of their own). A few seconds."""

from __future__ import annotations

import json
import sys

import pytest

FAMILIES = ("gemma3", "gemma4_ple")


@pytest.mark.parametrize("release", ["sdk-2.28"])
def test_planned_kv_bytes_are_built_bytes(sim, goldens, release, tmp_path):
    out = tmp_path / "kv.json"
    sim.run([sys.executable, "kv_bytes_driver.py", "--out", str(out), *(str(goldens[f]) for f in FAMILIES)], release)
    records = json.loads(out.read_text())
    assert len(records) == 3 * len(FAMILIES)
    for r in records:
        assert r["built"] == r["planned"], r
    by = {(r["case"], r["settings"]): r for r in records}
    for family in FAMILIES:
        plain, chunked = by[(family, "contiguous")], by[(family, "contiguous, chunks of 8")]
        assert chunked["prefill_chunk_size"] == 8 and chunked["built"] > plain["built"], (plain, chunked)
    assert by[("gemma4_ple", "contiguous")]["producers"] < by[("gemma4_ple", "contiguous")]["layers"]
