"""A real TensorBoard server finds the monitor's scalar, histogram, text and layout data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from specopt.models import Llama, LlamaConfig
from specopt.spectral import ConditionNumberAlarm, SpectralMonitor

pytestmark = pytest.mark.slow  # starts a subprocess and waits for it

STARTUP_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> object | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


def _write_run(log_dir: str) -> list[str]:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=32))
    # A bound every layer exceeds, so an alarm text entry is written too.
    rules = [ConditionNumberAlarm(1.0001, metric="condition_number")]
    with SpectralMonitor(model, log_dir=log_dir, every=1, budget=None, alarms=rules) as mon:
        for step in (1, 2):
            mon.step(step)
        return mon.layers


def test_tensorboard_server_serves_monitor_tags(tmp_path) -> None:
    log_dir = str(tmp_path / "run1")
    layers = _write_run(log_dir)
    port = _free_port()
    # The venv's own tensorboard (same interpreter), Python data loader (no Rust server).
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host",
           "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        base = f"http://127.0.0.1:{port}/data/plugin"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        scalars = hists = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            scalars = _get_json(f"{base}/scalars/tags")
            hists = _get_json(f"{base}/histograms/tags")
            if scalars and hists and "run1" in scalars and "run1" in hists:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve run1 within {STARTUP_TIMEOUT_S:.0f} s "
                        f"(last answers: {scalars!r}, {hists!r})")
        for layer in layers:
            assert f"spectral/condition_number/{layer}" in scalars["run1"]
            assert f"spectral/sigma_max_pi/{layer}" in scalars["run1"]
            assert f"spectral_hist/log10_sigma/{layer}" in hists["run1"]
            assert f"spectral_hist/sigma_over_max/{layer}" in hists["run1"]
        assert "spectral/model/gmcn" in scalars["run1"]
        tag = f"spectral/condition_number/{layers[0]}"
        points = _get_json(f"{base}/scalars/scalars?run=run1&tag={urllib.parse.quote(tag)}")
        assert [p[1] for p in points] == [1, 2]  # (wall_time, step, value) rows
        text = _get_json(f"{base}/text/tags")
        assert text and "alarms/text_summary" in text.get("run1", [])  # add_text's suffix
        layout = _get_json(f"{base}/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert "spectral: condition number" in titles
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()
