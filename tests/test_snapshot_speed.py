"""tools/bench_snapshot.py: the quick run produces rows that mean what they say (the speedup
is the ratio of its two medians; the snapshot's spectra match float64 SVD to 1e-6)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_snapshot_quick(tmp_path, load_tool, capsys) -> None:
    bench = load_tool("bench_snapshot")
    out = tmp_path / "snap.json"
    result = bench.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("CPU: ")  # machine.describe() first
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["dim"] for r in result["rows"]] == [64, 128]
    for row in result["rows"]:
        assert row["matrices"] == 2 * 7 + 2  # 7 per layer, embeddings, output head
        assert row["speedup"] == pytest.approx(row["weightwatcher_s"] / row["snapshot_s"])
        assert 0 <= row["max_rel_err"] <= 1e-6
