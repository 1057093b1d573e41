"""Walk a GGUF file's header and check every count, length and offset against the file's size, before any GGUF
reader builds objects from it: a 113-byte file declaring an array of 2^40 elements, a string of 2^62 bytes or a
tensor whose data lies past the end is refused in one line, in time proportional to the file's size.

    check_gguf(path)   -> GGUFHeader(fields, tensors), or ModelFileError("PATH: ...")
                          fields: metadata key -> value (str, int, float, bool; arrays as numpy arrays or lists);
                          tensors: name -> (GGML type name, dims innermost first, offset in the data section)
The metadata is read here too, with plain struct reads: the `gguf` package's reader builds numpy objects per
vocabulary entry (~170 MB for SmolLM2's 49k-token vocabulary), which a process that needs only the config and
the tokenizer (`berry serve`'s HTTP process) should not pay for.

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; metadata
entries (key string, value type u32, value); tensor infos (name string, n_dims u32, dims u64 x n_dims, type u32,
offset u64); then the data section at the next multiple of `general.alignment` (default 32), each tensor's offset
relative to it. A string is a u64 length and its bytes; an array is an element type u32, a count u64, elements.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from berrylm.model.config import ModelFileError

FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # type -> struct
FIXED = {t: struct.calcsize("<" + f) for t, f in FMT.items()}  # value type -> bytes
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY = 1 << 16


class _Reader:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, why: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: malformed GGUF file ({why} at byte {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes, the file has {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.unpack("<Q", what + " length")
        if limit is not None and n > limit:
            raise self.fail(f"{what} of {n} bytes")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0):
        """The value (str, int, float, bool; an array of numbers as a numpy array, of strings as a list), read once
        its length is known to fit."""
        if vtype in FIXED:
            return self.unpack("<" + FMT[vtype], what)
        if vtype == STRING:
            return self.string(what).decode("utf-8", "replace")
        if vtype == ARRAY:
            if depth > 2:
                raise self.fail(f"{what}: arrays nested too deeply")
            etype, count = self.unpack("<I", what + " element type"), self.unpack("<Q", what + " count")
            if etype in FIXED:  # the count must fit the bytes left before anything is read
                if count > (self.size - self.pos) // FIXED[etype]:
                    raise self.fail(f"{what}: array of {count} elements")
                out = np.frombuffer(self.buf, "<" + FMT[etype], count, self.pos).copy()  # the file's size, no more
                self.pos += count * FIXED[etype]
                return out
            if etype not in (STRING, ARRAY):
                raise self.fail(f"{what}: unknown array element type {etype}")
            if count > (self.size - self.pos) // 8:  # every string or array takes at least 8 bytes
                raise self.fail(f"{what}: array of {count} elements")
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise self.fail(f"{what}: unknown value type {vtype}")


@dataclass
class GGUFHeader:
    fields: dict[str, object]
    tensors: dict[str, tuple[str, list[int], int]]
    data_start: int = 0  # the data section's file offset: a tensor's bytes start at data_start + its offset


def check_gguf(path: str | Path) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise ModelFileError(f"{path}: malformed GGUF file (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf, path)
            if r.unpack("<4s", "magic") != b"GGUF":
                raise ModelFileError(f"{path}: not a GGUF file (wrong magic)")
            version = r.unpack("<I", "version")
            if version not in (2, 3):
                raise ModelFileError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = r.unpack("<Q", "tensor count"), r.unpack("<Q", "metadata count")
            # a metadata entry takes at least 8 + 4 + 1 bytes, a tensor info at least 8 + 4 + 8 + 4 + 8
            if n_kv > size // 13 or n_tensors > size // 32:
                raise r.fail(f"{n_kv} metadata entries and {n_tensors} tensors declared in a {size}-byte file")
            alignment, fields = 32, {}
            for _ in range(n_kv):
                key = r.string("metadata key", MAX_KEY).decode("utf-8", "replace")
                vtype = r.unpack("<I", f"type of {key}")
                v = fields[key] = r.value(vtype, key)
                if key == "general.alignment":
                    if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v & (v - 1) or v > 1 << 16:
                        raise r.fail(f"general.alignment {v} is not a power of two")
                    alignment = v
            infos = []
            for _ in range(n_tensors):
                name = r.string("tensor name", MAX_KEY).decode("utf-8", "replace")
                n_dims = r.unpack("<I", f"dimensions of {name}")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise r.fail(f"tensor {name} has {n_dims} dimensions")
                dims = [r.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
                ttype, offset = r.unpack("<I", f"type of {name}"), r.unpack("<Q", f"offset of {name}")
                infos.append((name, dims, ttype, offset))
            data_start = -(-r.pos // alignment) * alignment
            for name, dims, ttype, offset in infos:
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    raise ModelFileError(f"{path}: tensor {name} has unknown type {ttype}") from None
                n = 1
                for d in dims:
                    if d == 0 or d > size * block:  # no tensor dimension can exceed the file's elements
                        raise ModelFileError(f"{path}: tensor {name} has shape {dims}, impossible in {size} bytes")
                    n *= d
                if dims[0] % block:
                    raise ModelFileError(f"{path}: tensor {name}: row of {dims[0]} is not a multiple of its "
                                         f"block size {block}")
                nbytes = n // block * type_size
                if data_start + offset + nbytes > size:
                    raise ModelFileError(f"{path}: tensor {name} ({nbytes} bytes at offset {offset}) lies past the "
                                         f"end of the {size}-byte file (truncated or malformed)")
            tensors = {name: (GGMLQuantizationType(ttype).name, dims, offset) for name, dims, ttype, offset in infos}
    return GGUFHeader(fields, tensors, data_start)
