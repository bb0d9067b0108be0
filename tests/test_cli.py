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
                          input=stdin, stdin=subprocess.DEVNULL if stdin is None else None, timeout=300, check=False,
                          cwd=cwd)


def on_a_terminal(*args: str, home: Path, lines: list[str]) -> subprocess.CompletedProcess[str]:
    """The command with a terminal (a pty) as its input, as a user typing `lines`: the interactive mode."""
    import pty
    import threading

    env = {**os.environ, "SOUVERAIN_HOME": str(home), "COLUMNS": "200"}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "souverain", *args], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    os.close(slave)

    def drain() -> None:  # the terminal's echo, read so that it never fills
        try:
            while os.read(master, 4096):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    for line in lines:
        os.write(master, (line + "\n").encode())
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_until_up(server: subprocess.Popen[str], url: str) -> None:
    """Until `url/health` answers (the models take a while to load); the server's stderr if it died first."""
    import time
    import urllib.request

    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return
        except OSError:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up")


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


def test_run_interactive_commands_are_never_sent_to_the_model(home: Path) -> None:
    """On a terminal: /? help, /set parameter, /set system, /show, an unknown /command, /clear, /bye."""
    done = on_a_terminal("run", "smollm2", "--temperature", "0", home=home, lines=[
        "/?", "/set parameter num_predict 5", "/set parameter mirostat 1", "/show parameters", "/nonsense",
        "/set system You are a geographer.", "/show system", "My name is Ada.", "/clear", "/set system",
        "/set parameter num_predict 24", "What is the capital of France?", "/bye"])
    assert done.returncode == 0, done.stderr
    assert "/set parameter NAME VALUE" in done.stderr  # the help
    assert "PARAMETER mirostat is not supported" in done.stderr
    assert "max_tokens           5" in done.stdout and "You are a geographer." in done.stdout
    assert "unknown command '/nonsense'" in done.stderr and "nothing was sent" in done.stderr
    assert "conversation cleared" in done.stderr and "system message removed" in done.stderr
    assert "Paris" in done.stdout
    assert done.stderr.count(" tokens, ") == 2  # two answers: the commands made none
    assert "5 tokens, " in done.stderr  # num_predict 5 applied to the first


def test_run_reads_a_piped_prompt(home: Path) -> None:
    """As `ollama run`: piped input is the prompt, or is added after a PROMPT argument."""
    done = souverain("run", "smollm2", "--temperature", "0", "--max-tokens", "24", home=home,
                     stdin="What is the capital of France?\n")
    assert done.returncode == 0 and "Paris" in done.stdout, done.stderr
    done = souverain("run", "smollm2", "What is the capital of this country?", "--temperature", "0", "--max-tokens",
                     "24", home=home, stdin="France\n")
    assert done.returncode == 0 and "Paris" in done.stdout, done.stderr
    done = souverain("run", "smollm2", home=home, stdin="")
    assert done.returncode == 1 and "nothing to ask" in done.stderr


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

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SOUVERAIN_HOME": str(home), "SOUVERAIN_API_KEY": "sk-cli", "COLUMNS": "200"}
    server = subprocess.Popen([sys.executable, "-m", "souverain", "serve", "--port", str(port), "--model", "smollm2",
                               "--kv-cache-memory", str(64 << 20)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}")
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


def test_version_cp_and_list_ids(home: Path) -> None:
    assert souverain("--version", home=home).stdout.startswith("souverain ")
    assert souverain("cp", "smollm2", "smollm2-copy", home=home).returncode == 0
    again = souverain("cp", "smollm2", "smollm2-copy", home=home)
    assert again.returncode == 1 and "already installed" in again.stderr
    rows = {line.split()[0]: line.split() for line in souverain("ls", home=home).stdout.splitlines()[1:]}
    assert rows["smollm2"][1] == rows["smollm2-copy"][1] and len(rows["smollm2"][1]) == 12  # same files, same id
    modified = " ".join(rows["smollm2-copy"][4:])
    assert rows["smollm2-copy"][2:4] == ["98.4", "MB"] and ("ago" in modified or "just now" in modified)
    assert souverain("rm", "smollm2-copy", home=home).returncode == 0
    assert souverain("run", "smollm2", "Hi", "--max-tokens", "2", home=home).returncode == 0  # still whole
    shown = souverain("show", "smollm2", "--modelfile", home=home)
    assert shown.returncode == 0 and "FROM smollm2" in shown.stdout
    assert "apache" in souverain("show", "smollm2", "--license", home=home).stdout.lower()


def test_pull_of_an_installed_model_needs_no_network(home: Path, tmp_path: Path, smollm2_path: Path) -> None:
    """Installed and intact: nothing fetched (offline too). Damaged: fetched again, and offline that fails
    naming the three ways in."""
    env_index = {"SOUVERAIN_INDEX_URL": "http://127.0.0.1:9/simple"}  # nothing listens there
    os.environ.update(env_index)
    try:
        done = souverain("pull", "smollm2", home=home)
        assert done.returncode == 0 and "installed and intact" in done.stderr, done.stderr
        other = tmp_path / "home"
        assert souverain("import", str(smollm2_path), "--name", "smollm2", home=other).returncode == 0
        stored = next((other / "models" / "smollm2" / "files").glob("*.gguf"))
        with open(stored, "r+b") as f:
            f.seek(1000)
            f.write(b"damage")
        done = souverain("pull", "smollm2", home=other)
        assert done.returncode == 1 and "not as installed; fetching it again" in done.stderr
        for way in ("SOUVERAIN_INDEX_URL", "souverain export", "souverain import"):
            assert way in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    finally:
        for key in env_index:
            os.environ.pop(key)


def test_plans_set_refuses_an_unknown_plan(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = souverain("plans", "set", "proo", "--rps", "3", home=home)
    assert done.returncode == 1 and "no plan named 'proo'" in done.stderr
    assert "proo" not in souverain("plans", "list", home=home).stdout
    assert souverain("plans", "set", "team", "--rps", "3", "--create", home=home).returncode == 0
    assert "team" in souverain("plans", "list", home=home).stdout


def test_serve_refuses_an_unknown_kv_values_before_loading(tmp_path: Path) -> None:
    done = souverain("serve", "--kv-values", "fp8", "--port", "1", home=tmp_path / "home")
    assert done.returncode != 0 and "--kv-values must be auto, int8 or bf16, got 'fp8'" in done.stderr, done.stderr


def test_stop_keep_alive_and_the_loaded_models_cap(home: Path) -> None:
    """`ps` says what is in memory and until when; `stop` unloads; a request loads again (same greedy answer);
    --max-loaded-models 1 keeps one of two in memory; --keep-alive unloads an idle model."""
    import json
    import time
    import urllib.request

    from tests.serving import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SOUVERAIN_HOME": str(home), "SOUVERAIN_API_KEY": "sk-cli", "COLUMNS": "200"}
    server = subprocess.Popen([sys.executable, "-m", "souverain", "serve", "--port", str(port), "--model", "a=smollm2",
                               "--model", "b=smollm2", "--kv-cache-memory", "32MiB", "--max-loaded-models", "1",
                               "--keep-alive", "4s"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)

    def ps() -> dict[str, list[str]]:
        done = subprocess.run([sys.executable, "-m", "souverain", "ps", "--url", url], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}

    def ask(model: str) -> str:
        body = {"model": model, "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json", "Authorization": "Bearer sk-cli"})
        return str(json.loads(urllib.request.urlopen(request, timeout=120).read())["choices"][0]["message"]["content"])

    try:
        wait_until_up(server, url)
        rows = ps()
        assert rows["a"][1] == "loaded" and rows["b"][1] == "unloaded"  # the cap, from the start
        assert rows["a"][3] == "MB" and rows["a"][5:8] == ["s", "from", "now"], rows["a"]  # memory, until
        first = ask("b")  # loads b; a makes room
        rows = ps()
        assert rows["a"][1] == "unloaded" and rows["b"][1] == "loaded"
        stopped = subprocess.run([sys.executable, "-m", "souverain", "stop", "b", "--url", url], env=env,
                                 capture_output=True, text=True, timeout=60, check=False)
        assert stopped.returncode == 0 and "b unloaded" in stopped.stderr, stopped.stderr
        assert ps()["b"][1] == "unloaded"
        assert ask("b") == first  # loaded again on demand: the same greedy answer
        for _ in range(40):  # keep-alive: 4 s idle, then unloaded
            if ps()["b"][1] == "unloaded":
                break
            time.sleep(0.5)
        assert ps()["b"][1] == "unloaded"
        missing = subprocess.run([sys.executable, "-m", "souverain", "stop", "nope", "--url", url], env=env,
                                 capture_output=True, text=True, timeout=60, check=False)
        assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
