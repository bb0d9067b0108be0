"""The command line as a user meets it: import, list, show, run, rm; clear one-line failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def souverain(*args: str, home: Path, stdin: str | None = None, cwd: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SOUVERAIN_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "souverain", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300, check=False, cwd=cwd)


@pytest.fixture(scope="module")
def home(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    done = souverain("import", str(smollm2_path), "--name", "smollm2", home=home)
    assert done.returncode == 0, done.stderr
    return home


def test_list_and_show(home: Path) -> None:
    listing = souverain("list", home=home)
    assert "smollm2" in listing.stdout and "98.4 MB" in listing.stdout and "Q4_1" in listing.stdout
    shown = souverain("show", "smollm2", home=home)
    assert "Q4_1" in shown.stdout and "<|im_start|>" in shown.stdout and "8192" in shown.stdout


def test_run_with_a_prompt_answers(home: Path) -> None:
    done = souverain("run", "smollm2", "What is the capital of France?", "--temperature", "0", home=home)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_run_takes_a_file_by_relative_or_absolute_path(smollm2_path: Path, tmp_path: Path) -> None:
    """As the README says: `run` takes a .gguf file, here and given from the folder it is in; a missing
    file is named as a missing file, not as a bad model name."""
    (tmp_path / "model.gguf").symlink_to(smollm2_path)
    home = tmp_path / "home"
    for model in ("./model.gguf", str(tmp_path / "model.gguf")):
        done = souverain("run", model, "What is the capital of France?", "--temperature", "0", "--max-tokens", "12",
                         home=home, cwd=tmp_path)
        assert done.returncode == 0 and "Paris" in done.stdout, done.stderr
    for verb in ("run", "generate"):
        done = souverain(verb, "./nope.gguf", "hi", home=home, cwd=tmp_path)
        assert done.returncode == 1 and "./nope.gguf: no such file" in done.stderr.replace("\n", " ")
        assert "invalid model name" not in done.stderr and "Traceback" not in done.stderr


def test_run_interactive_keeps_history_and_clears(home: Path) -> None:
    script = "My name is Ada.\n/clear\nWhat is the capital of France?\n/bye\n"
    done = souverain("run", "smollm2", "--temperature", "0", "--max-tokens", "24", home=home, stdin=script)
    assert done.returncode == 0, done.stderr
    assert "conversation cleared" in done.stderr and "Paris" in done.stdout


def test_failures_are_one_clear_line(home: Path, tmp_path: Path) -> None:
    for args in (["show", "nope"], ["rm", "nope"], ["run", "nope", "hi"], ["import", str(tmp_path / "x.gguf")],
                 ["import", str(home), "--name", "../up"]):
        done = souverain(*args, home=home)
        assert done.returncode == 1, args
        assert done.stderr.startswith("error:") and "Traceback" not in done.stderr, (args, done.stderr)


def test_rm(home: Path, smollm2_path: Path) -> None:
    assert souverain("import", str(smollm2_path), "--name", "copy", home=home).returncode == 0
    assert souverain("rm", "copy", home=home).returncode == 0
    assert "copy" not in souverain("list", home=home).stdout


def test_serve_and_ps(home: Path) -> None:
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SOUVERAIN_HOME": str(home), "SOUVERAIN_API_KEY": "sk-cli", "COLUMNS": "200"}
    server = subprocess.Popen([sys.executable, "-m", "souverain", "serve", "--port", str(port), "--model", "smollm2",
                               "--kv-cache-memory", str(64 << 20)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                time.sleep(0.5)
        done = subprocess.run([sys.executable, "-m", "souverain", "ps", "--url", f"http://127.0.0.1:{port}"],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "smollm2" in done.stdout and "Q4_1" in done.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_says_a_port_in_use_before_anything_else(tmp_path: Path) -> None:
    """A port already taken is said in a second, before the database, the one-time owner credentials and
    the models (which take a minute to load)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = souverain("serve", "--port", str(port), "--model", "smollm2", home=tmp_path / "home")
    assert done.returncode == 1 and f"port {port} is in use" in done.stderr and f"--port {port + 1}" in done.stderr
    assert "loaded" not in done.stderr and "password" not in (done.stdout + done.stderr).lower()
    assert not (tmp_path / "home").exists()  # no database, no first-start credentials used up
