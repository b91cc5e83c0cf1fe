"""The operator's install has no torch: `pip install '.[operator]'` into a clean venv."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_the_operator_extra_installs_no_torch_and_runs(tmp_path):
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"{ROOT}[operator]"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    # From a folder of its own: the repository root on sys.path would shadow `operator`.
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True, cwd=tmp_path
                            ).stdout.lower()
    for heavy in ("torch==", "triton==", "transformers==", "fastapi=="):
        assert heavy not in listed, f"the operator extra pulled {heavy.rstrip('=')}"
    assert "kopf==" in listed and ("huggingface-hub==" in listed or "huggingface_hub==" in listed)
    brim = target / "bin" / "brim"
    for command in (["operator", "--help"], ["plan", "--help"], ["facts", "--help"], ["--help"]):
        result = subprocess.run([str(brim), *command], capture_output=True, text=True,
                                cwd=tmp_path, timeout=60)
        assert result.returncode == 0, result.stderr
    assert "--runtime-image" in subprocess.run([str(brim), "operator", "--help"],
                                               capture_output=True, text=True,
                                               cwd=tmp_path).stdout
