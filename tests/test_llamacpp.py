"""benchmarks/llamacpp.py without building anything: its skip messages and its record of llama-bench's JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from benchmarks import llamacpp as llamacpp_module


@pytest.fixture
def llamacpp() -> ModuleType:
    """benchmarks.llamacpp, which the tests patch (monkeypatch undoes it after each)."""
    return llamacpp_module


def skip_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_no_compiler_skips_with_one_line(llamacpp: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(llamacpp, "find_cmake", lambda: "/usr/bin/cmake")
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    assert llamacpp.build(tmp_path) is None
    assert skip_line(capsys).startswith("llama.cpp skipped: no C++ compiler")
    assert not any(tmp_path.iterdir())  # nothing downloaded


def test_no_cmake_skips(llamacpp: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(llamacpp, "find_cmake", lambda: None)
    assert llamacpp.build(tmp_path) is None
    assert "pip install cmake" in skip_line(capsys)


def test_failed_download_skips(llamacpp: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(cmd: list[str], **kwargs: object) -> None:
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution found\n")

    monkeypatch.setattr(llamacpp, "missing_tool", lambda: None)
    monkeypatch.setattr(llamacpp.subprocess, "run", refuse)
    assert llamacpp.build(tmp_path) is None
    line = skip_line(capsys)
    assert line.startswith("llama.cpp skipped: cannot get the llama-cpp-python==")
    assert line.endswith("(ERROR: No matching distribution found)")


def test_run_record(llamacpp: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill from the pp test, decode from the tg test, in the fields benchmarks/report.py reads."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 1000)
    calls: list[list[str]] = []

    def fake(cmd: list[str]) -> tuple[str, float]:
        calls.append(cmd)
        pp = "-n" in cmd and cmd[cmd.index("-n") + 1] == "0"
        ns = [2.0e9, 2.0e9] if pp else [6.4e9, 9.6e9]  # 128 tokens in 2 s; 64 steps of 100 or 150 ms
        test = {"avg_ns": sum(ns) / 2, "samples_ns": ns, "model_type": "qwen2 1B Q8_0", "cpu_info": "cpu",
                "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "poll": 50, "build_commit": "x"}
        return json.dumps([test]), 500.0 if pp else 600.0

    monkeypatch.setattr(llamacpp, "run_tool", fake)
    r = llamacpp.run(gguf, 128, 64, 2, tmp_path)
    assert [c[c.index("-d") + 1] for c in calls] == ["0", "128"]  # decode sees the prompt in its cache
    assert all(c[c.index("-t") + 1] == "2" for c in calls)
    assert r["prefill_tokens_per_s"] == pytest.approx(64.0)
    assert r["decode_ms_per_token"] == pytest.approx(125.0)
    assert r["decode_ms_per_token_samples"] == pytest.approx([100.0, 150.0])
    assert r["generate_peak_rss_mb"] == 600.0
    assert r["files_mb"] == pytest.approx(0.001)
