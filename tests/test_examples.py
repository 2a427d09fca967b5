"""The example scripts run as shipped (in their --quick mode: a few steps on MiniLM and the offline demo data)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "script", ["train_sequence_classification.py", "train_token_classification.py"]
)
def test_example_runs(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # two steps gain nothing from threads that spin on a shared CPU
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "test_ece" in result.stdout
    assert "confidence" in result.stdout.splitlines()[-1]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
