"""A pass can ship extra files in the package (ctx.add_file): written under <pass>/, checksummed,
verified like every other file; bad names are one-line errors."""
import json
import types

import pytest

from edgesparse import EdgesparseError, Pass, hookimpl
from edgesparse.pipeline import BuildRequest, build
from edgesparse.plugins import load_registry
from edgesparse.runtime import sha256


def _registry(file_name):
    class Shipper(Pass):
        name = "shipper"

        def rewrite_graph(self, model, ctx):
            ctx.add_file(file_name, b"second graph")

    plugin = types.ModuleType("shipper_plugin")
    plugin.register_passes = hookimpl(lambda register: register(Shipper))
    return load_registry(extra_modules=[plugin])


def test_pass_files_land_in_the_package_with_checksums(mlp_onnx, tmp_path):
    out = tmp_path / "pkg"
    manifest = build(BuildRequest(str(mlp_onnx), "x86", out, passes=[("shipper", {})], quiet=True), _registry("extra/decode.onnx"))
    path = out / "shipper" / "extra" / "decode.onnx"
    assert path.read_bytes() == b"second graph"
    assert manifest["files"]["shipper/extra/decode.onnx"] == sha256(path)
    assert json.loads((out / "manifest.json").read_text())["files"]["shipper/extra/decode.onnx"] == sha256(path)


@pytest.mark.parametrize("name", ["../escape.onnx", "/abs.onnx", "a//b", ""])
def test_bad_pass_file_names_are_refused(mlp_onnx, tmp_path, name):
    with pytest.raises(EdgesparseError, match="bad package file name"):
        build(BuildRequest(str(mlp_onnx), "x86", tmp_path / "o", passes=[("shipper", {})], quiet=True), _registry(name))
    assert not (tmp_path / "o").exists()
