"""The worked example of DESIGN.md: Adam on f(x) = x² from x0 = 5, lr = 1e-3."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quadratic.py"


def _load():
    spec = importlib.util.spec_from_file_location("quadratic_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_step_values():
    first = _load().trace(lr=1e-3, x0=5.0, steps=1)[0]
    assert first["g"] == pytest.approx(10.0, abs=1e-6)
    assert first["m"] == pytest.approx(1.0, abs=1e-6)
    assert first["v"] == pytest.approx(0.1, abs=1e-6)  # (1 - 0.999)·10², not 1
    assert first["m_hat"] == pytest.approx(10.0, abs=1e-5)
    assert first["v_hat"] == pytest.approx(100.0, abs=1e-4)
    assert first["x"] == pytest.approx(4.999, abs=1e-6)  # the first step moves by about lr


def test_converges_and_larger_lr_is_faster():
    module = _load()
    slow, fast = module.steps_to_reach(1e-2), module.steps_to_reach(1e-1)
    assert 0 < fast < slow


def test_script_runs_and_prints_the_table():
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "2", "--lrs", "0.1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "4.9" in out and "steps to |x| < 1e-2" in out
    help_text = subprocess.run(
        [sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--lrs" in help_text
