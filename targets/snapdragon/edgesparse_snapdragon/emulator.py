"""Running aarch64 Linux programs on this x86-64 machine: qemu-aarch64-static emulating a Cortex-A76,
with Debian's aarch64 sysroot as the library root.

ONNX Runtime's CPU detection (pytorch/cpuinfo) reads /proc/cpuinfo, which qemu-user (7.2) passes
through from the x86 host; ORT then crashes. So every run happens in a private mount namespace
(unshare -m) where a Cortex-A76 cpuinfo is bind-mounted over /proc/cpuinfo; the host never sees it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from edgesparse import EdgesparseError
from edgesparse.kernels.build import default_cache_dir

from .toolchains import DEBIAN_SYSROOT

QEMU = "qemu-aarch64-static"
CPU = "cortex-a76"  # qemu's model: Armv8.2-A + fp16 + dot product; newer instructions trap (SIGILL)

# What a Cortex-A76 reports (implementer Arm, part 0xd0b), one entry per emulated processor.
_CPUINFO_ENTRY = """processor\t: {i}
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

"""


def cpuinfo_file(cache: Path | None = None) -> Path:
    """An ARM /proc/cpuinfo with as many processors as this machine has (cpuinfo cross-checks the
    count with /sys/devices/system/cpu)."""
    count = os.cpu_count() or 1
    text = "".join(_CPUINFO_ENTRY.format(i=i) for i in range(count))
    path = (cache or default_cache_dir()) / "snapdragon" / f"cpuinfo-cortex-a76-{count}"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def qemu_command(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """qemu-aarch64-static running argv (an aarch64 program and its arguments). env is the guest's
    extra environment (qemu -E), which leaves the host tools' environment alone."""
    cmd = [QEMU, "-cpu", CPU, "-L", str(DEBIAN_SYSROOT)]
    for key, value in (env or {}).items():
        cmd += ["-E", f"{key}={value}"]
    return [*cmd, *map(str, argv)]


def namespaced(cmd: list[str], cache: Path | None = None) -> list[str]:
    """cmd inside a private mount namespace with the ARM cpuinfo over /proc/cpuinfo. As root this is
    `unshare -m`; otherwise `unshare -rm` (needs unprivileged user namespaces)."""
    user = [] if os.geteuid() == 0 else ["-r"]
    script = 'mount --bind "$0" /proc/cpuinfo && exec "$@"'
    return ["unshare", *user, "-m", "sh", "-c", script, str(cpuinfo_file(cache)), *cmd]


def check_namespace() -> None:
    """Raise when this machine cannot make the private mount namespace."""
    cmd = namespaced(["true"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise EdgesparseError(f"cannot run unshare for the ARM cpuinfo namespace: {exc}") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[-1]
        raise EdgesparseError(
            "the snapdragon target runs ONNX Runtime under qemu in a private mount namespace, and "
            f"'{' '.join(cmd[:3])}' failed here ({why}); run as root or enable unprivileged user namespaces")


def run(argv: list[str], *, env: dict[str, str] | None = None, cpuinfo: bool = True, cwd: Path | None = None,
        timeout: float = 900, what: str = "the aarch64 program") -> subprocess.CompletedProcess:
    """Run an aarch64 program under qemu; raise EdgesparseError with its last error line on failure."""
    cmd = qemu_command(argv, env)
    if cpuinfo:
        cmd = namespaced(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise EdgesparseError(f"{what} did not finish under {QEMU} within {timeout:.0f} s") from None
    except FileNotFoundError as exc:
        raise EdgesparseError(f"cannot run {what}: {exc.filename} not found (Debian: apt-get install "
                              "qemu-user-static util-linux)") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        if proc.returncode < 0 or proc.returncode >= 128:
            detail += f" (killed by signal {abs(proc.returncode) & 127})"
        raise EdgesparseError(f"{what} failed under {QEMU}: {detail}")
    return proc
