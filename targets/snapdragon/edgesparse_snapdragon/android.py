"""An Android app's view of a snapdragon package built with the NDK (ANDROID_NDK_HOME set):

    DEST/lib/arm64-v8a/libedgesparse.so   -> app/src/main/jniLibs/arm64-v8a/
    DEST/assets/model.onnx, manifest.json -> app/src/main/assets/<name>/

    python -m edgesparse_snapdragon.android PACKAGE DEST

The package itself keeps the core's layout (lib/libedgesparse_kernels.so): the ORT backend decides
where libraries go. The app registers the library with SessionOptions.registerCustomOpLibrary
(docs/snapdragon.md has the Kotlin lines)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from edgesparse import EdgesparseError, runtime

from .toolchains import ANDROID_ABI

LIBRARY_NAME = "libedgesparse.so"  # what System.loadLibrary("edgesparse") / nativeLibraryDir expect


def layout(manifest: dict) -> dict[str, str]:
    """Package path -> path in the Android layout, for every file an app needs."""
    rt = manifest["runtime"]
    files = {}
    for i, lib in enumerate(rt.get("custom_op_libraries", [])):
        name = LIBRARY_NAME if i == 0 else Path(lib).name
        files[lib] = f"lib/{ANDROID_ABI}/{name}"
    model = rt["model"]
    files[model] = f"assets/{Path(model).name}"
    data = model + ".data"
    if data in manifest.get("files", {}):
        files[data] = f"assets/{Path(data).name}"
    files[runtime.MANIFEST] = f"assets/{runtime.MANIFEST}"
    return files


def export(package_dir: Path, dest: Path) -> Path:
    """Copy an NDK-built snapdragon package into the Android layout at `dest` (must not exist)."""
    package = runtime.load(package_dir, check_target=False)
    target = package.manifest.get("target", {})
    if target.get("name") != "snapdragon":
        raise EdgesparseError(f"{package_dir} is a package for target '{target.get('name')}', not snapdragon")
    toolchain = target.get("toolchain", "")
    if "android" not in toolchain:
        raise EdgesparseError(f"{package_dir} was compiled for {toolchain or 'Linux'} (glibc), which Android cannot "
                              "load: set ANDROID_NDK_HOME and build again")
    dest = Path(dest)
    if dest.exists():
        raise EdgesparseError(f"{dest} already exists")
    for src, rel in layout(package.manifest).items():
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package.root / src, out)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m edgesparse_snapdragon.android PACKAGE DEST")
    try:
        print(export(Path(sys.argv[1]), Path(sys.argv[2])))
    except EdgesparseError as exc:
        sys.exit(f"error: {exc}")
