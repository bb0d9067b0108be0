"""Damaged and hostile checkpoint files, each with the words its error must contain."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

U32, U64, STR, ARR = 4, 10, 8, 9
HUGE = 1 << 63


def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", STR) + s(value)


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml_type, offset)


def gguf(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", *, version: int = 3,
         n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    pad = (-len(body)) % 32
    return body + b"\0" * pad + data


ARCH = kv_str("general.architecture", "llama")
ONE_TENSOR = [tensor_info("token_embd.weight", [4, 4])]
DATA = b"\0" * 64


def safetensors_file(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


GOOD_ST_HEADER = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}

# name -> (file name, bytes, words expected in the error)
CASES: dict[str, tuple[str, bytes, tuple[str, ...]]] = {
    "gguf_wrong_magic": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA, magic=b"GGUX"), ("not a GGUF",)),
    "gguf_too_short": ("m.gguf", b"GGUF\x03\0\0\0", ("too short",)),
    "gguf_truncated_header": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA)[:50], ("cannot fit",)),
    "gguf_truncated_value": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA)[:58], ("truncated",)),
    "gguf_truncated_data": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA)[:-8], ("beyond the end",)),
    "gguf_version_1": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA, version=1), ("version 1",)),
    "gguf_big_endian": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA, version=3 << 24), ("big-endian",)),
    "gguf_absurd_kv_count": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA, n_kv=HUGE), ("more than the file holds",)),
    "gguf_absurd_tensor_count": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA, n_tensors=HUGE),
                                 ("more than the file holds",)),
    "gguf_absurd_string": ("m.gguf", gguf([struct.pack("<Q", HUGE) + b"general.architecture"], [], DATA),
                           ("string length", "cannot fit")),
    "gguf_absurd_array": ("m.gguf", gguf([ARCH, s("tokenizer.ggml.scores") + struct.pack("<IIQ", ARR, 6, HUGE)],
                                         ONE_TENSOR, DATA), ("array of", "cannot fit")),
    "gguf_absurd_string_array": ("m.gguf", gguf([ARCH, s("tokenizer.ggml.tokens") + struct.pack(
        "<IIQ", ARR, STR, HUGE)], ONE_TENSOR, DATA), ("string array", "cannot fit")),
    "gguf_unknown_value_type": ("m.gguf", gguf([ARCH, s("x") + struct.pack("<I", 77) + b"\0" * 8], [], DATA),
                                ("unknown value type 77",)),
    "gguf_huge_tensor": ("m.gguf", gguf([ARCH], [tensor_info("token_embd.weight", [1 << 31, 1 << 31])], DATA),
                         ("beyond the end",)),
    "gguf_offset_beyond_file": ("m.gguf", gguf([ARCH], [tensor_info("token_embd.weight", [4, 4], 0, 1 << 40)], DATA),
                                ("beyond the end",)),
    "gguf_unknown_tensor_type": ("m.gguf", gguf([ARCH], [tensor_info("token_embd.weight", [4, 4], 999)], DATA),
                                 ("unknown type 999",)),
    "gguf_too_many_dims": ("m.gguf", gguf([ARCH], [tensor_info("token_embd.weight", [1] * 9)], DATA),
                           ("9 dimensions",)),
    "gguf_bad_block_shape": ("m.gguf", gguf([ARCH], [tensor_info("token_embd.weight", [5, 4], 8)], DATA),
                             ("bad shape",)),
    "gguf_missing_metadata": ("m.gguf", gguf([ARCH], ONE_TENSOR, DATA), ("metadata llama.", "is missing")),
    "gguf_wrong_architecture": ("m.gguf", gguf([kv_str("general.architecture", "bert")], ONE_TENSOR, DATA),
                                ("architecture 'bert' is not supported",)),
    "st_absurd_header_length": ("model.safetensors", safetensors_file(GOOD_ST_HEADER, b"\0" * 64, header_len=HUGE),
                                ("not a valid safetensors",)),
    "st_header_beyond_file": ("model.safetensors", safetensors_file(GOOD_ST_HEADER, b"", header_len=10_000),
                              ("not a valid safetensors",)),
    "st_truncated_data": ("model.safetensors", safetensors_file(GOOD_ST_HEADER, b"\0" * 10),
                          ("not a valid safetensors",)),
    "st_bad_json": ("model.safetensors", safetensors_file(b"{not json"), ("not a valid safetensors",)),
    "st_absurd_shape": ("model.safetensors", safetensors_file(
        {"w": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 64]}}, b"\0" * 64),
        ("not a valid safetensors",)),
}

TINY_CONFIG = {"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
               "intermediate_size": 8, "vocab_size": 4}


def materialise(tmp: Path, name: str) -> Path:
    """Write case `name`; GGUF cases are a file, safetensors ones a model folder."""
    file_name, content, _ = CASES[name]
    (tmp / file_name).write_bytes(content)
    if file_name.endswith(".safetensors"):
        (tmp / "config.json").write_text(json.dumps(TINY_CONFIG))
        return tmp
    return tmp / file_name


Opener = Callable[[Path], object]
