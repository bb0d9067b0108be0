"""`souverain serve` as an operator starts it (vLLM's flags, a --config file, HTTPS, a root path, CORS, the access
log), a Modelfile-created model answering through the API, and the client commands finding the server through
`souverain login`."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving import free_port

KEY = "sk-operator-static"
PIRATE = 'FROM smollm2\nSYSTEM """You are a pirate. Answer like a pirate."""\nPARAMETER temperature 0\n' \
         "PARAMETER num_predict 7\n"


def cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "souverain", *args], capture_output=True, text=True, env=env,
                          input=stdin, stdin=subprocess.DEVNULL if stdin is None else None, timeout=300, check=False)


@pytest.fixture(scope="module")
def site(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the HTTPS server")
    root = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "SOUVERAIN_HOME": str(root / "home"), "COLUMNS": "200",
           "SOUVERAIN_CLIENT_CONFIG": str(root / "config" / "client.json"), "SSL_CERT_FILE": str(root / "cert.pem")}
    env.pop("SOUVERAIN_API_KEY", None)
    env.pop("SOUVERAIN_URL", None)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(root / "key.pem"), "-out",
                    str(root / "cert.pem")], check=True, capture_output=True)
    assert cli("import", str(smollm2_path), "--name", "smollm2", env=env).returncode == 0
    (root / "Modelfile").write_text(PIRATE)
    made = cli("create", "pirate", "-f", str(root / "Modelfile"), env=env)
    assert made.returncode == 0, made.stderr
    (root / "Brief").write_text("FROM smollm2\nSYSTEM Answer in three words.\nPARAMETER num_predict 3\n")
    assert cli("create", "brief", "-f", str(root / "Brief"), env=env).returncode == 0  # served without --model
    write_adapter(smollm2_path, root / "lora")
    (root / "Tuned").write_text("FROM smollm2\nADAPTER ./lora\nPARAMETER temperature 0\nPARAMETER num_predict 8\n")
    made = cli("create", "tuned", "-f", str(root / "Tuned"), env=env)
    assert made.returncode == 0, made.stderr
    (root / "serve.yaml").write_text("max-model-len: 1024\nkv_cache_memory: 48MiB\n"
                                     "served-model-name: [pirate-chat, gpt-4o-mini]\nmax-num-seqs: 8\n")
    port = free_port()
    log = open(root / "stderr.txt", "w")  # noqa: SIM115 - read after the server stops
    server = subprocess.Popen(
        [sys.executable, "-m", "souverain", "serve", "--config", str(root / "serve.yaml"), "--port", str(port),
         "--model", "pirate", "--model", "smollm2", "--api-key", KEY, "--root-path", "/llm",
         "--allowed-origins", "https://app.example", "--ssl-keyfile", str(root / "key.pem"),
         "--ssl-certfile", str(root / "cert.pem")], env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(root / "cert.pem"))
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1, context=context)
                break
            except OSError:
                assert server.poll() is None, (root / "stderr.txt").read_text()
                time.sleep(0.25)
        yield {"url": url, "env": env, "context": context, "root": root, "server": server}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def write_adapter(base: Path, folder: Path) -> None:
    """A LoRA adapter for SmolLM2 in PEFT's layout, strong enough to change its greedy answers."""
    import torch
    from safetensors.torch import save_file

    from souverain.model.lora import LoraArgs, LoraWeights
    from souverain.weights.load import open_checkpoint

    torch.manual_seed(0)
    lora = LoraWeights(open_checkpoint(base).args, LoraArgs(rank=4, alpha=8.0, targets=("wq", "wv")))
    folder.mkdir(parents=True)
    tensors = {}
    for name, a in lora.tensors().items():  # layers.{i}.{target}.lora_A -> PEFT's names
        layer, target, kind = name.split(".")[1:]
        value = a if kind == "lora_A" else torch.randn_like(a) * 3.0
        tensors[f"base_model.model.model.layers.{layer}.self_attn.{target[1]}_proj.{kind}.weight"] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
                                                            "target_modules": ["q_proj", "v_proj"]}))


def call(site: dict[str, Any], path: str, body: dict[str, Any] | None = None, key: str | None = KEY,
         method: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(site["url"] + path, json.dumps(body).encode() if body is not None else None,
                                     {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"}
                                                                              if key else {}), **(headers or {})},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=120, context=site["context"]) as r:
            return r.status, dict(r.headers), _json(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), _json(e.read())


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode()


def test_flags_and_config_file_shape_what_is_served(site: dict[str, Any]) -> None:
    status, _, models = call(site, "/v1/models")
    assert status == 200
    cards = {m["id"]: m for m in models["data"]}
    assert cards["pirate-chat"]["max_context_length"] == 1024  # --config's max-model-len
    assert cards["gpt-4o-mini"]["root"] == "pirate-chat"  # the second served name is an alias
    assert cards["smollm2"]["max_context_length"] == 1024
    status, _, schema = call(site, "/openapi.json")
    assert schema["servers"] == [{"url": "/llm"}]  # --root-path: the proxy's prefix, for docs and clients
    status, _, page = call(site, "/", key=None)
    assert '<meta name="root-path" content="/llm">' in page and '"/llm/static/app.js"' in page  # the chat app too


def test_models_created_from_a_served_model_are_served_on_its_engine(site: dict[str, Any]) -> None:
    _, _, models = call(site, "/v1/models")
    assert "brief" in {m["id"] for m in models["data"]}
    status, _, answer = call(site, "/v1/chat/completions", {"model": "brief", "temperature": 0,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and answer["usage"]["completion_tokens"] <= 3, answer


def test_a_created_model_answers_with_its_baked_system_prompt_and_parameters(site: dict[str, Any]) -> None:
    ask = [{"role": "user", "content": "Who are you?"}]
    status, _, baked = call(site, "/v1/chat/completions", {"model": "pirate-chat", "messages": ask})
    assert status == 200, baked
    system = [{"role": "system", "content": "You are a pirate. Answer like a pirate."}]
    _, _, explicit = call(site, "/v1/chat/completions", {"model": "smollm2", "messages": system + ask,
                                                         "temperature": 0, "max_tokens": 7})
    # The same prompt (the Modelfile's system message put in) and the same greedy 7 tokens (its parameters).
    assert baked["usage"] == explicit["usage"] and baked["usage"]["completion_tokens"] == 7
    assert baked["choices"][0]["message"]["content"] == explicit["choices"][0]["message"]["content"]
    _, _, plain = call(site, "/v1/chat/completions", {"model": "smollm2", "messages": ask, "temperature": 0,
                                                      "max_tokens": 7})
    assert plain["usage"]["prompt_tokens"] != baked["usage"]["prompt_tokens"]  # (SmolLM2 has its own default)
    _, _, alias = call(site, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": ask})
    assert alias["model"] == "gpt-4o-mini" and alias["choices"][0]["message"] == baked["choices"][0]["message"]
    _, _, own = call(site, "/v1/chat/completions", {"model": "pirate-chat", "max_tokens": 3, "messages": [
        {"role": "system", "content": "You are terse."}, *ask]})
    assert own["usage"]["completion_tokens"] <= 3 and own["usage"]["prompt_tokens"] != baked["usage"]["prompt_tokens"]


def test_a_modelfile_adapter_changes_the_answers_in_the_api_and_in_run(site: dict[str, Any]) -> None:
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    status, _, tuned = call(site, "/v1/chat/completions", {"model": "tuned", "messages": ask})
    assert status == 200, tuned
    _, _, plain = call(site, "/v1/chat/completions", {"model": "smollm2", "messages": ask, "temperature": 0,
                                                      "max_tokens": 8})
    answer = tuned["choices"][0]["message"]["content"]
    assert tuned["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert answer != plain["choices"][0]["message"]["content"]  # the adapter is applied
    done = cli("run", "tuned", "What is the capital of France?", env=site["env"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == answer.strip()  # `run` answers through it too, the same greedy tokens


def test_cors_is_for_the_allowed_origins_only(site: dict[str, Any]) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    status, headers, _ = call(site, "/v1/chat/completions", key=None, method="OPTIONS",
                              headers={"Origin": "https://app.example", **preflight})
    assert status == 200 and headers.get("access-control-allow-origin") == "https://app.example"
    assert "access-control-allow-credentials" not in {k.lower() for k in headers}  # keys, never the app's cookie
    status, headers, _ = call(site, "/v1/chat/completions", key=None, method="OPTIONS",
                              headers={"Origin": "https://evil.example", **preflight})
    assert status == 400 and "access-control-allow-origin" not in {k.lower() for k in headers}
    status, _, _ = call(site, "/v1/models", key=None, headers={"Origin": "https://app.example"})
    assert status == 401  # CORS opens no door the key does not


def test_only_the_operator_unloads_models(site: dict[str, Any]) -> None:
    """`stop` is the operator's: an organisation's key (even its owner's) cannot unload what others use."""
    first = (site["root"] / "home" / "first-start.txt").read_text()
    owner_key = next(w for w in first.split() if w.startswith("sk-") and w != KEY)
    status, _, body = call(site, "/v1/admin/models/pirate-chat/unload", {}, key=owner_key)
    assert status == 403, body
    status, _, models = call(site, "/v1/models")
    assert all(m["status"]["loaded"] for m in models["data"] if m.get("status"))


def test_client_commands_find_the_server_through_login(site: dict[str, Any]) -> None:
    env, config = site["env"], Path(site["env"]["SOUVERAIN_CLIENT_CONFIG"])
    refused = cli("login", site["url"], "--api-key", "sk-wrong", env=env)
    assert refused.returncode == 1 and "401" in refused.stderr and "key was refused" in refused.stderr
    assert not config.exists()
    done = cli("login", site["url"], env=env, stdin=KEY + "\n")  # the key from stdin, never in argv
    assert done.returncode == 0, done.stderr
    assert config.stat().st_mode & 0o777 == 0o600 and KEY in config.read_text()
    ps = cli("ps", env=env)
    assert ps.returncode == 0 and "pirate-chat" in ps.stdout, ps.stderr
    jobs = cli("jobs", "list", env=env)
    assert jobs.returncode == 0 and "JOB" in jobs.stdout, jobs.stderr
    pasted = cli("jobs", "cancel", "ftjob-1234…", env=env)  # an id cut by a narrow terminal, pasted
    assert pasted.returncode == 1 and "404" in pasted.stderr and "Traceback" not in pasted.stderr
    # The saved key goes to the saved server only; another --url gets none.
    elsewhere = cli("ps", "--url", f"http://127.0.0.1:{free_port()}", env=env)
    assert elsewhere.returncode == 1 and "cannot reach a server" in elsewhere.stderr
    assert "Traceback" not in elsewhere.stderr
    assert cli("logout", env=env).returncode == 0 and not config.exists()
    anonymous = cli("ps", "--url", site["url"], env=env)
    assert anonymous.returncode == 1 and "needs an API key" in anonymous.stderr


def test_the_access_log_and_the_start_up_messages(site: dict[str, Any]) -> None:
    call(site, "/v1/models")
    site["server"].terminate()
    site["server"].wait(timeout=30)
    text = (site["root"] / "stderr.txt").read_text()
    lines = [line for line in text.splitlines() if "souverain.access" in line]
    assert any(" POST /llm/v1/chat/completions 200 " in line and " rid=" in line for line in lines), text
    assert any(" GET /llm/v1/models 401 " in line for line in lines)
    assert KEY not in text and "sk-wrong" not in text and "Who are you" not in text  # never keys, never prompts
    # The credentials once the server is up (after "serving on"), into a file: the output is not a terminal.
    assert text.index("serving on https://127.0.0.1") < text.index("first start:")
    assert (site["root"] / "home" / "first-start.txt").stat().st_mode & 0o777 == 0o600
