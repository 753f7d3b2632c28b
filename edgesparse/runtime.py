"""Load, check and run a package. Needs only numpy and onnxruntime, like an app.

    pkg = edgesparse.runtime.load("out/minilm")        # or "out/minilm.zip"
    outputs = pkg.run({"input_ids": ids, "attention_mask": mask})
"""
from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import EdgesparseError

FORMAT = "edgesparse-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Package:
    """A checked package on disk."""

    def __init__(self, root: Path, manifest: dict, keep_alive=None):
        self.root = root
        self.manifest = manifest
        self._keep_alive = keep_alive  # the temporary folder of an unpacked archive

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest["runtime"]["model"]

    @property
    def libraries(self) -> list[Path]:
        return [self.root / p for p in self.manifest["runtime"].get("custom_op_libraries", [])]

    def session(self, threads: int = 1, kernels: bool = True, profile: str | None = None, spin: bool = True):
        """An ONNX Runtime session. kernels=False leaves the kernel library out, so each sparse op
        runs its dense ONNX function instead (as in a runtime that cannot load custom ops).
        spin=False stops idle worker threads from spinning: needed when two sessions alternate."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = profile
        if kernels:
            for lib in self.libraries:
                options.register_custom_ops_library(str(lib))
        try:
            return ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EdgesparseError(f"ONNX Runtime cannot load {self.model_path}: {str(exc).splitlines()[0]}") from exc

    def run(self, inputs: dict[str, np.ndarray], threads: int = 1) -> list[np.ndarray]:
        return self.session(threads).run(None, inputs)


def load(path, check_target: bool = True) -> Package:
    """Open a package folder or .zip archive and check its format, checksums and target."""
    path = Path(path)
    keep_alive = None
    if path.is_file() and zipfile.is_zipfile(path):
        keep_alive = tempfile.TemporaryDirectory(prefix="edgesparse-pkg-")
        with zipfile.ZipFile(path) as archive:
            archive.extractall(keep_alive.name)
        roots = [p for p in Path(keep_alive.name).iterdir()]
        root = roots[0] if len(roots) == 1 and roots[0].is_dir() else Path(keep_alive.name)
    elif path.is_dir():
        root = path
    else:
        raise EdgesparseError(f"not a package folder or archive: {path}")
    manifest = read_manifest(root)
    check_files(root, manifest)
    if check_target:
        check_machine(manifest)
    return Package(root, manifest, keep_alive)


def read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise EdgesparseError(f"{root} is not a package: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgesparseError(f"{root / MANIFEST} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise EdgesparseError(f"{root} is not an edgesparse package (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EdgesparseError(
            f"package format version {version} is not supported by this runtime (supports {FORMAT_VERSION})"
        )
    return manifest


def check_files(root: Path, manifest: dict) -> None:
    """Every file listed must exist with its recorded sha256, and no listed path may escape root."""
    for rel, expected in manifest.get("files", {}).items():
        file = (root / rel).resolve()
        if root.resolve() not in file.parents:
            raise EdgesparseError(f"package lists a file outside itself: {rel}")
        if not file.is_file():
            raise EdgesparseError(f"package file missing: {rel}")
        if sha256(file) != expected:
            raise EdgesparseError(f"checksum mismatch for {rel}: the package was modified or truncated")


def check_machine(manifest: dict) -> None:
    target = manifest.get("target", {})
    machine = target.get("machine")
    here = platform.machine()
    if machine and machine != here:
        raise EdgesparseError(
            f"package was built for target '{target.get('name')}' ({machine}); this machine is {here}"
        )


def run_profiled(package: Package, inputs: dict[str, np.ndarray], threads: int = 1):
    """Run once with ORT's profiler on and count, by op type, the nodes that executed on a custom
    kernel: (outputs, {op_type: nodes}). A sparse node that ORT quietly replaced by its dense
    function body does not appear, which is exactly what this is for."""
    import onnxruntime  # noqa: F401  (fail early if missing)

    with tempfile.TemporaryDirectory() as tmp:
        session = package.session(threads=threads, profile=str(Path(tmp) / "profile"))
        outputs = session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    domains = set(package.manifest["runtime"].get("custom_domains", []))
    custom_ops = set(package.manifest["runtime"].get("custom_ops", []))
    seen: dict[str, set] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name")
        if op in custom_ops or any(op and op.startswith(d) for d in domains):
            seen.setdefault(op, set()).add(event["name"][: -len("_kernel_time")])
    return outputs, {op: len(nodes) for op, nodes in seen.items()}
