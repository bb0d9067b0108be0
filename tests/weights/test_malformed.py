"""Each damaged file fails fast, with bounded memory, and a message naming the file and problem."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from souverain.weights import WeightsError, load_model, open_checkpoint
from tests.weights.malformed import CASES, materialise


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_file_errors_clearly(name: str, tmp_path: Path) -> None:
    path = materialise(tmp_path, name)
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        open_checkpoint(path)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    file_name = CASES[name][0]
    assert file_name in message, message
    for words in CASES[name][2]:
        assert words in message, message


def test_malformed_files_use_bounded_memory(tmp_path: Path) -> None:
    # In a fresh process: the peak RSS after all cases must stay near the peak after the imports.
    script = f"""
import resource, sys
from pathlib import Path
sys.path.insert(0, {str(Path.cwd())!r})
from souverain.weights import WeightsError, open_checkpoint
from tests.weights.malformed import CASES, materialise
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
root = Path({str(tmp_path)!r})
for i, name in enumerate(CASES):
    folder = root / str(i)
    folder.mkdir()
    try:
        open_checkpoint(materialise(folder, name))
    except WeightsError:
        pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    grown_kib = int(done.stdout.strip())
    assert grown_kib < 64 * 1024, f"peak memory grew by {grown_kib} KiB"


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_pickle_file_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(WeightsError, match="pickle checkpoint refused: loading a pickle can run arbitrary code"):
        load_model(path)


def test_pickle_folder_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 1, '
                                          '"num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 4}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin: pickle checkpoint refused"):
        load_model(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file"):
        load_model(tmp_path / "nope")
