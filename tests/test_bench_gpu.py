"""tools/bench_gpu.py: exits cleanly without CUDA; a tiny CPU run means what its rows say."""

from __future__ import annotations

import sys

import pytest
import torch


def test_without_cuda_it_says_so_and_times_nothing(load_tool, monkeypatch, capsys):
    bench = load_tool("bench_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) is None
    assert "no CUDA device here; nothing timed" in capsys.readouterr().out


def test_quick_cpu_run_rows(load_tool, monkeypatch, tmp_path):
    bench = load_tool("bench_gpu")
    monkeypatch.setitem(sys.modules, "weightwatcher", None)  # peer optional: skip it here
    out = tmp_path / "gpu.json"
    result = bench.main(["--device", "cpu", "--quick", "--json", str(out)])
    assert out.exists()
    rows = {(r["what"].split(",")[0], r["variant"]): r for r in result["rows"]}
    muon, peer = rows[("Muon step", "specopt")], rows.get(("Muon step", "torch"))
    if peer is not None:
        assert muon["vs_peer"] == pytest.approx(peer["ms"] / muon["ms"])
    pc = [r for r in result["rows"] if r["what"].startswith("PC layer")]
    assert {r["variant"] for r in pc} == {"plain Linear", "PC level 2", "PC level 4"}
    assert len(pc) == 6  # 2 shapes x (plain + 2 levels)
    for r in pc:
        if r["variant"] != "plain Linear":
            plain = next(p for p in pc if p["what"] == r["what"] and p["variant"] == "plain Linear")
            assert r["vs_peer"] == pytest.approx(plain["ms"] / r["ms"])
    assert "weightwatcher not installed" in rows[("monitor snapshot", "specopt")]["note"]
