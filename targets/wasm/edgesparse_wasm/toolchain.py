"""Compiling edgesparse's pure kernels to wasm32 with SIMD128 (Debian's clang, lld, wasi-libc).

Two kinds of module come out of the same sources:
- the *browser module* (`edgesparse_kernels.wasm`): the kernels plus es_wasm_api.cpp, a reactor
  with no imports at all, so any browser or node instantiates it with `{}`;
- *WASI commands* (test drivers): a `main` linked with the whole pure library, run by node:wasi.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgesparse import EdgesparseError
from edgesparse.kernels import Toolchain, build_kernel_archive
from edgesparse.kernels.build import CSRC, default_cache_dir

HERE = Path(__file__).parent
API_SOURCE = HERE / "csrc" / "es_wasm_api.cpp"
MODULE_NAME = "edgesparse_kernels.wasm"
SETUP_HINT = "sh targets/wasm/setup_env.sh"

# Flags the kernels need on wasm32: SIMD128 and C headers only (Debian has no libc++ for wasm32).
WASM_FLAGS = ("-msimd128", "-fno-exceptions", "-fno-rtti", "-nostdinc++", "-nostdlib++")
LINK_FLAGS = ("-msimd128", "-nostdlib++", "-Wl,--strip-all")


def sysroot() -> str:
    """The WASI sysroot (Debian's wasi-libc installs into /usr); EDGESPARSE_WASI_SYSROOT overrides."""
    return os.environ.get("EDGESPARSE_WASI_SYSROOT", "/usr")


def toolchain() -> Toolchain:
    return Toolchain("wasm32-wasi", ("clang++", "--target=wasm32-wasi", f"--sysroot={sysroot()}"), WASM_FLAGS, (), ".wasm")


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return next((line for line in lines if "error" in line), lines[0] if lines else "")


def check_tools(need_node: bool = True) -> None:
    """Raise EdgesparseError naming the Debian package of the first missing piece."""
    for exe, pkg in (("clang++", "clang"), ("wasm-ld", "lld"), ("llvm-ar", "llvm")):
        if shutil.which(exe) is None:
            raise EdgesparseError(f"the wasm target needs '{exe}' (Debian package {pkg}); run {SETUP_HINT} "
                                  f"or apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 llvm")
    libc = Path(sysroot()) / "lib" / "wasm32-wasi" / "libc.a"
    if not libc.is_file():
        raise EdgesparseError(f"the wasm target needs the WASI C library ({libc} is missing; Debian package "
                              f"wasi-libc); run {SETUP_HINT} or apt-get install wasi-libc")
    builtins = _builtins_path()
    if builtins is None or not builtins.is_file():
        raise EdgesparseError(f"the wasm target needs compiler-rt's wasm32 builtins ({builtins or 'not found'}; "
                              f"Debian package libclang-rt-dev-wasm32); run {SETUP_HINT}")
    if need_node:
        from .node import check_node

        check_node()


def _builtins_path() -> Path | None:
    try:
        out = subprocess.run(["clang++", "--target=wasm32-wasi", "-print-libgcc-file-name"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def compiler_version() -> str:
    try:
        out = subprocess.run(["clang++", "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()[0] if out.stdout else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgesparseError(f"{what} failed: {_first_line(proc.stderr or proc.stdout)}")


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in sorted(CSRC.iterdir()):
        if p.suffix in (".h", ".cpp"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    for part in parts:
        h.update(b"\0" + part)
    h.update(compiler_version().encode())
    h.update(repr((toolchain(), LINK_FLAGS)).encode())
    return h.hexdigest()[:20]


def _publish(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise


def _cached_build(kind: str, digest: str, name: str, build) -> Path:
    cache = default_cache_dir() / "wasm" / kind
    final = cache / digest
    out = final / name
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache))
    try:
        build(tmp, tmp / name)
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def pure_archive() -> Path:
    """The pure kernels as a wasm32 static archive, built by the core's kernel build."""
    return build_kernel_archive(toolchain())


def kernel_module() -> Path:
    """The browser module: kernels + es_wasm_api.cpp, no imports. Cached by content."""
    check_tools(need_node=False)
    archive = pure_archive()
    digest = _digest(API_SOURCE.read_bytes(), archive.read_bytes())

    def build(tmp: Path, out: Path) -> None:
        obj = tmp / "api.o"
        cxx = [*toolchain().cxx, "-O3", "-std=c++17", *WASM_FLAGS]
        _run([*cxx, f"-I{CSRC}", "-c", str(API_SOURCE), "-o", str(obj)], "compiling es_wasm_api.cpp for wasm32")
        _run([*toolchain().cxx, "-O3", *LINK_FLAGS, "-mexec-model=reactor", "-Wl,--no-entry",
              str(obj), str(archive), "-o", str(out)], "linking the wasm kernel module")
        obj.unlink()
        imports = wasm_imports(out.read_bytes())
        if imports:
            raise EdgesparseError(f"the wasm kernel module imports {imports[0]}: a browser cannot provide it")

    return _cached_build("module", digest, MODULE_NAME, build)


def wasi_command(source: Path, name: str) -> Path:
    """A WASI command (a test driver with a main) linked with the whole pure library."""
    check_tools(need_node=False)
    archive = pure_archive()
    digest = _digest(Path(source).read_bytes(), archive.read_bytes(), b"command")

    def build(tmp: Path, out: Path) -> None:
        obj = tmp / "driver.o"
        cxx = [*toolchain().cxx, "-O2", "-std=c++17", *WASM_FLAGS]
        _run([*cxx, f"-I{CSRC}", "-c", str(source), "-o", str(obj)], f"compiling {Path(source).name} for wasm32-wasi")
        _run([*toolchain().cxx, "-O2", *LINK_FLAGS, str(obj), str(archive), "-o", str(out)],
             f"linking {name}")
        obj.unlink()

    return _cached_build("commands", digest, name, build)


def wasm_imports(data: bytes) -> list[str]:
    """"module.name" of every import of a wasm binary (a minimal reader of the import section)."""
    if data[:4] != b"\0asm":
        raise EdgesparseError("not a wasm binary")

    def uleb(pos: int) -> tuple[int, int]:
        result = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result, pos

    def name(pos: int) -> tuple[str, int]:
        size, pos = uleb(pos)
        return data[pos:pos + size].decode("utf-8", "replace"), pos + size

    pos = 8
    while pos < len(data):
        section, pos = data[pos], pos + 1
        size, pos = uleb(pos)
        if section == 2:
            count, p = uleb(pos)
            found = []
            for _ in range(count):
                module, p = name(p)
                field, p = name(p)
                found.append(f"{module}.{field}")
                kind, p = data[p], p + 1
                if kind == 0:      # function: type index
                    _, p = uleb(p)
                elif kind == 1:    # table: reftype + limits
                    p += 1
                    flags, p = uleb(p)
                    _, p = uleb(p)
                    if flags & 1:
                        _, p = uleb(p)
                elif kind == 2:    # memory: limits
                    flags, p = uleb(p)
                    _, p = uleb(p)
                    if flags & 1:
                        _, p = uleb(p)
                else:              # global: valtype + mutability
                    p += 2
            return found
        pos += size
    return []
