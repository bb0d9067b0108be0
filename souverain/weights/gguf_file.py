"""A bounds-checked GGUF (v2/v3) parser.

We parse the header ourselves rather than with gguf-py's GGUFReader because a hostile or damaged
file must fail fast with a clear message: every count and length is checked against the bytes that
remain before anything is allocated, and every tensor's extent against the file size. Tensor data
stays memory-mapped; dequantisation uses gguf-py's kernels.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from souverain.weights.errors import WeightsError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF value type -> (struct code, size); 8 = string, 9 = array.
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first); GGUF stores it innermost first
    type: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


class GGUFFile:
    """An opened, validated GGUF file: `metadata`, `tensors`, and `array(info)` for raw data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise WeightsError(self.path, f"too short to be GGUF ({size} bytes)")
                # Copy-on-write: tensors built on the map are writable without touching the file.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise WeightsError(self.path, f"cannot open ({e.strerror})") from None
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: list[TensorInfo] = []
        self._parse()

    # -- primitive reads, each checked against the end of the file ----------------------------
    def _fail(self, problem: str) -> WeightsError:
        return WeightsError(self.path, f"{problem} (at byte {self._pos})")

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._map):
            raise self._fail(f"truncated: needs {n} more bytes, {len(self._map) - self._pos} left")
        out = self._map[self._pos : self._pos + n]
        self._pos += n
        return out

    def _scalar(self, vtype: int) -> Any:
        code, size = _SCALARS[vtype]
        return struct.unpack(code, self._take(size))[0]

    def _count(self, what: str, min_item: int) -> int:
        n = self._scalar(10)
        left = len(self._map) - self._pos
        if n * min_item > left:
            raise self._fail(f"{what} of {n} cannot fit in the {left} bytes left")
        return n

    def _string(self) -> str:
        raw = self._take(self._count("string length", 1))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail("string is not valid UTF-8") from None

    def _value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self._scalar(vtype)
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY and depth == 0:
            item = self._scalar(4)
            if item in _SCALARS:
                size = _SCALARS[item][1]
                n = self._count("array", size)
                arr = np.frombuffer(self._take(n * size), dtype=_NUMPY[item])
                return arr.astype(bool) if item == 7 else arr
            if item == _STRING:
                n = self._count("string array", 8)
                return [self._string() for _ in range(n)]
            if item == _ARRAY:
                raise self._fail("nested arrays are not supported")
            raise self._fail(f"unknown array item type {item}")
        raise self._fail(f"unknown value type {vtype}")

    # -- structure ------------------------------------------------------------------------------
    def _parse(self) -> None:
        magic = self._take(4)
        if magic != MAGIC:
            raise WeightsError(self.path, f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        version = self._scalar(4)
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise WeightsError(self.path, f"unsupported GGUF version {version}{hint}")
        n_tensors = self._scalar(10)
        n_kv = self._scalar(10)
        left = len(self._map) - self._pos
        # The smallest KV is 13 bytes (key length, 1-byte key, type, 1-byte value); a tensor info 24+.
        if n_kv * 13 > left or n_tensors * 24 > left:
            raise self._fail(f"header claims {n_kv} keys and {n_tensors} tensors: more than the file holds")
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._fail(f"bad general.alignment {alignment!r}")
        data_start = -(-self._pos // alignment) * alignment
        seen: set[str] = set()
        for name, shape, qtype, rel, nbytes in infos:
            if name in seen:
                raise WeightsError(self.path, f"tensor {name!r} appears twice")
            seen.add(name)
            start = data_start + rel
            if rel % alignment or start + nbytes > len(self._map):
                raise WeightsError(self.path, f"tensor {name!r} ({nbytes} bytes at offset {rel}) lies "
                                              f"beyond the end of the file ({len(self._map)} bytes)")
            self.tensors.append(TensorInfo(name, shape, qtype, start, nbytes))

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]:
        name = self._string()
        n_dims = self._scalar(4)
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [self._scalar(10) for _ in range(n_dims)]
        raw_type = self._scalar(4)
        offset = self._scalar(10)
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self._fail(f"tensor {name!r} has unknown type {raw_type}") from None
        count = int(np.prod(dims, dtype=object))
        if count <= 0 or dims[0] % block:
            raise self._fail(f"tensor {name!r} has bad shape {dims} for {qtype.name}")
        return name, tuple(reversed(dims)), qtype, offset, count // block * type_size

    # -- data -----------------------------------------------------------------------------------
    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [rows..., row_bytes], zero-copy from the map."""
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], -1)

    def field(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)
