"""nvcc at build time: find it, check GPU architectures against it, compile TVM's generated CUDA
source into one fatbin holding a cubin per architecture, and read back which cubins a fatbin
holds (the check that the package really carries code for every declared GPU)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from edgesparse import EdgesparseError

NVCC_ENV = "EDGESPARSE_NVCC"
EM_CUDA = 190
NVCC_TIMEOUT_S = 900


def find_nvcc(explicit: str | None = None) -> str:
    """$EDGESPARSE_NVCC, else nvcc on PATH, else /usr/local/cuda/bin/nvcc."""
    candidate = explicit or os.environ.get(NVCC_ENV)
    if candidate:
        path = shutil.which(candidate)
        if path is None:
            raise EdgesparseError(f"nvcc not found at '{candidate}' (set by {NVCC_ENV} or the target's nvcc option)")
        return path
    for c in ("nvcc", "/usr/local/cuda/bin/nvcc"):
        path = shutil.which(c)
        if path:
            return path
    raise EdgesparseError(
        "nvcc not found: GPU packages compile their kernels to cubins at build time; install the CUDA "
        f"toolkit (nvcc on PATH or /usr/local/cuda/bin/nvcc) or point {NVCC_ENV} at one")


@functools.lru_cache(maxsize=8)
def nvcc_info(nvcc: str) -> tuple[str, tuple[str, ...]]:
    """(release like '13.0', real architectures it compiles for like ('sm_75', ...))."""
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        arches = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgesparseError(f"cannot run {nvcc}: {exc}") from None
    release = re.search(r"release (\d+\.\d+)", version)
    sms = tuple(sorted({f"sm_{a}" for a in re.findall(r"compute_(\d+)", arches)}, key=arch_number))
    if not release or not sms:
        raise EdgesparseError(f"{nvcc} did not report its version and GPU architectures")
    return release.group(1), sms


def arch_number(arch: str) -> int:
    return int(re.fullmatch(r"sm_(\d+)[af]?", arch).group(1))


def check_arches(arches, nvcc: str) -> tuple[str, ...]:
    """Normalise and validate GPU architectures ('sm_87', '87' and 'SM_87' are accepted)."""
    release, supported = nvcc_info(nvcc)
    result = []
    for raw in arches:
        a = str(raw).strip().lower()
        a = f"sm_{a}" if a.isdigit() else a
        if not re.fullmatch(r"sm_\d+", a):
            raise EdgesparseError(f"unknown GPU architecture '{raw}': expected the form sm_87")
        if a not in supported:
            raise EdgesparseError(f"unknown GPU architecture '{raw}': nvcc {release} compiles for {', '.join(supported)}")
        if a not in result:
            result.append(a)
    if not result:
        raise EdgesparseError("no GPU architecture given")
    return tuple(result)


def compile_fatbin(source: str, arches, nvcc: str) -> bytes:
    """One fatbin with an uncompressed cubin per architecture (no PTX: Tegra GPUs get exact SASS)."""
    with tempfile.TemporaryDirectory(prefix="edgesparse-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = [nvcc, "--fatbin", "-O3", "--compress-mode=none", "-diag-suppress", "177,550",
               *[f"-gencode=arch=compute_{arch_number(a)},code={a}" for a in arches], "-o", str(out), str(src)]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise EdgesparseError(f"nvcc took longer than {NVCC_TIMEOUT_S} s") from None
        if result.returncode != 0:
            lines = [l for l in result.stderr.splitlines() if "error" in l.lower()] or result.stderr.splitlines() or ["?"]
            raise EdgesparseError(f"nvcc failed for {','.join(arches)}: {lines[0].strip()[:300]}")
        return out.read_bytes()


def cubins_in(blob: bytes) -> dict[str, int]:
    """{'sm_87': bytes, ...} for each CUDA ELF (cubin) inside a fatbin or cubin."""
    found: dict[str, int] = {}
    start = 0
    while (i := blob.find(b"\x7fELF", start)) >= 0:
        start = i + 4
        if len(blob) < i + 64 or blob[i + 4] != 2:  # ELFCLASS64
            continue
        (machine,) = struct.unpack_from("<H", blob, i + 18)
        if machine != EM_CUDA:
            continue
        (flags,) = struct.unpack_from("<I", blob, i + 48)
        abi_version = blob[i + 8]
        sm = (flags >> 8) & 0xFF if abi_version >= 8 else flags & 0xFF
        (shoff,) = struct.unpack_from("<Q", blob, i + 40)
        shentsize, shnum = struct.unpack_from("<HH", blob, i + 58)
        found[f"sm_{sm}"] = int(shoff + shentsize * shnum)
    return found


# --- the CUDA module inside TVM's packed-imports blob -------------------------------------------
# Layout (tvm-ffi library_module.cc): <nbytes u64> <indptr vec<u64>> <children vec<u64>> then per
# module <kind str> [<bytes str> unless kind == "_lib"]; a "cuda" module's bytes are
# <fmt str> <fmap> <code str> (TVM's cuda_module.cc). With no GPU on the build machine TVM leaves
# fmt == "cuda" (source, JIT-compiled at load by a Python callback); we replace it by a fatbin so
# the device needs no compiler.

class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def skip_fixed_vec(self, item: int) -> None:
        n = self.u64()
        self.pos += n * item


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _split_cuda_module(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(fmt, fmap bytes verbatim, code) of a serialized TVM CUDA module."""
    r = _Reader(data)
    fmt = r.raw()
    fmap_start = r.pos
    for _ in range(r.u64()):
        r.raw()                   # function name
        r.raw()                   # FunctionInfo.name
        r.skip_fixed_vec(4)       # arg_types: DLDataType
        for _ in range(r.u64()):  # launch_param_tags
            r.raw()
        r.skip_fixed_vec(4)       # arg_extra_tags: int32
    fmap = data[fmap_start:r.pos]
    code = r.raw()
    if r.pos != len(data):
        raise ValueError("trailing bytes")
    return fmt, fmap, code


def rewrite_cuda_imports(blob: bytes, compile_source) -> tuple[bytes, list[bytes]]:
    """Replace every CUDA-source module in a packed-imports blob by compile_source(source) (a
    fatbin). Returns the new blob and the device binaries it now holds."""
    try:
        r = _Reader(blob)
        nbytes = r.u64()
        if nbytes + 8 != len(blob):
            raise ValueError("size")
        indptr = [r.u64() for _ in range(r.u64())]
        children = [r.u64() for _ in range(r.u64())]
        head = struct.pack("<Q", len(indptr)) + b"".join(struct.pack("<Q", v) for v in indptr)
        head += struct.pack("<Q", len(children)) + b"".join(struct.pack("<Q", v) for v in children)
        body, binaries = [head], []
        for _ in range(len(indptr) - 1):
            kind = r.raw()
            body.append(_str(kind))
            if kind == b"_lib":
                continue
            data = r.raw()
            if kind == b"cuda":
                fmt, fmap, code = _split_cuda_module(data)
                if fmt == b"cuda":
                    fmt, code = b"fatbin", compile_source(code.decode())
                binaries.append(code)
                data = _str(fmt) + fmap + _str(code)
            body.append(_str(data))
        if r.pos != len(blob):
            raise ValueError("trailing bytes")
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise EdgesparseError(f"unexpected layout of TVM's packed modules ({exc}); this backend expects apache-tvm 0.27") from None
    payload = b"".join(body)
    return struct.pack("<Q", len(payload)) + payload, binaries
