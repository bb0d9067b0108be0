"""The air-gapped install, as the README's section says: a model bundle carried into a network namespace with
no route out, imported, pulled again (nothing to fetch), served and asked; the model-loading tests pass there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

INSIDE = textwrap.dedent('''
    import json, os, socket, subprocess, sys, time, urllib.request

    def souverain(*args):
        done = subprocess.run([sys.executable, "-m", "souverain", *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        return {"rc": done.returncode, "out": done.stdout, "err": done.stderr}

    result = {}
    try:
        socket.create_connection(("1.1.1.1", 443), timeout=3).close()
        result["outside"] = "reachable"
    except OSError as e:
        result["outside"] = str(e)
    result["import"] = souverain("import", sys.argv[1])
    result["pull_installed"] = souverain("pull", "smollm2")
    result["pull_missing"] = souverain("pull", "minilm")
    server = subprocess.Popen([sys.executable, "-m", "souverain", "serve", "--model", "smollm2", "--port", "8000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.25)
        first = open(os.path.join(os.environ["SOUVERAIN_HOME"], "first-start.txt")).read()
        key = [w for w in first.split() if w.startswith("sk-")][0]
        body = {"model": "smollm2", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        request = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json", "Authorization": "Bearer " + key})
        result["answer"] = json.loads(urllib.request.urlopen(request, timeout=120).read())
    except Exception as e:  # reported, and the test says what failed
        result["serve_error"] = repr(e)
    finally:
        server.terminate()
        result["serve_stderr"] = server.communicate(timeout=30)[1][-3000:]
    print(json.dumps(result))
''')


def _namespace_refused() -> str | None:
    try:
        done = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare cannot run here: {e}"
    return None if done.returncode == 0 else f"this machine refuses a network namespace: {done.stderr.strip()}"


def test_bundle_round_trip_serves_inside_a_network_namespace(smollm2_path: Path, tmp_path: Path) -> None:
    refused = _namespace_refused()
    if refused:
        pytest.skip(refused)
    env = {**os.environ, "SOUVERAIN_HOME": str(tmp_path / "connected")}
    for args in (["import", str(smollm2_path), "--name", "smollm2"], ["export", "smollm2", str(tmp_path / "usb")]):
        done = subprocess.run([sys.executable, "-m", "souverain", *args], env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
    (tmp_path / "inside.py").write_text(INSIDE)
    offline = {**os.environ, "SOUVERAIN_HOME": str(tmp_path / "airgapped"), "SOUVERAIN_INDEX_URL": "",
               "PIP_INDEX_URL": "", "PYTHONPATH": str(ROOT)}
    script = f"ip link set lo up && exec {sys.executable} {tmp_path / 'inside.py'} {tmp_path / 'usb' / 'smollm2'}"
    done = subprocess.run(["unshare", "-rn", "sh", "-c", script], env=offline, capture_output=True, text=True,
                          timeout=600, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outside"] != "reachable"  # really no route out
    assert result["import"]["rc"] == 0 and "match their recorded sha256" in result["import"]["err"], result["import"]
    assert result["pull_installed"]["rc"] == 0 and "installed and intact" in result["pull_installed"]["err"]
    missing = result["pull_missing"]
    assert missing["rc"] == 1 and "SOUVERAIN_INDEX_URL" in missing["err"] and "souverain import" in missing["err"]
    assert "Traceback" not in missing["err"]
    assert "answer" in result, result
    assert "Paris" in result["answer"]["choices"][0]["message"]["content"]


def test_model_loading_tests_pass_inside_the_namespace(smollm2_path: Path) -> None:
    """The suite's model-loading tests with no network at all: the store already holds what they load."""
    refused = _namespace_refused()
    if refused:
        pytest.skip(refused)
    tests = ["tests/weights", "tests/test_smollm2.py::test_chat_answer_names_paris",
             "tests/test_smollm2.py::test_cli_generate_names_paris", "tests/hub/test_store.py"]
    script = f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider {' '.join(tests)}"
    done = subprocess.run(["unshare", "-rn", "sh", "-c", script], capture_output=True, text=True, timeout=900,
                          check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
