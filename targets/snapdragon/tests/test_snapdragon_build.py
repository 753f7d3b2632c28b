"""The whole build for the snapdragon target, verified under qemu-aarch64 with ORT's aarch64 build."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from snapdragon_helpers import cli, manifest

from edgesparse import EdgesparseError, runtime
from edgesparse_snapdragon import Snapdragon, ort_aarch64, runner


def test_build_verifies_under_qemu_with_every_sparse_node_on_a_kernel(snapdragon_package):
    m = manifest(snapdragon_package)
    assert m["target"]["name"] == "snapdragon" and m["target"]["machine"] == "aarch64"
    assert m["target"]["cflags"] == ["-march=armv8.2-a+fp16+dotprod", "-mtune=cortex-a76"]
    assert [layer["op"] for layer in m["layers"]] == ["BlockSparseMatMul", "BlockSparseMatMul"]
    assert all(abs(layer["sparsity"] - 0.75) < 0.01 for layer in m["layers"])
    v = m["verification"]
    assert v["passed"] and v["max_abs_error"] <= 1e-4
    assert v["measured"] is True  # counted from ORT's profile inside qemu, not assumed
    assert v["sparse_nodes"] == 2 and v["fraction_on_sparse_kernels"] == 1.0
    libs = [snapdragon_package / p for p in m["runtime"]["custom_op_libraries"]]
    assert libs and all(ort_aarch64.is_aarch64_elf(p) for p in libs)
    assert "aarch64-linux-gnu-g++" in m["runtime"]["compiler"]


def test_run_package_matches_the_recorded_reference(snapdragon_package):
    data = np.load(snapdragon_package / "verification.npz")
    inputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
    want = data["output:y"]
    result = Snapdragon().run_package(snapdragon_package, inputs, threads=2)
    assert result.kernel_nodes == {"BlockSparseMatMul": 2}
    assert result.outputs[0].shape == want.shape
    assert np.abs(result.outputs[0] - want).max() <= 1e-4


def test_without_the_library_the_profile_shows_no_sparse_kernel(snapdragon_package):
    """The measurement can fail: with the library left out, ORT runs the ONNX function bodies,
    the outputs still match, and no node is counted on a custom kernel."""
    package = runtime.load(snapdragon_package, check_target=False)
    x = np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)
    with_lib, events = runner.run_model(package.model_path, {"x": x}, package.libraries, profile=True)
    without, events_without = runner.run_model(package.model_path, {"x": x}, [], profile=True)
    ops, domains = set(package.manifest["runtime"]["custom_ops"]), {"com.edgesparse"}
    assert runner.kernel_nodes(events, ops, domains) == {"BlockSparseMatMul": 2}
    assert runner.kernel_nodes(events_without, ops, domains) == {}
    # and both agree with x86 ORT running the same file through the function bodies
    reference = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(with_lib[0] - reference).max() <= 1e-4
    assert np.abs(without[0] - reference).max() <= 1e-4


def test_x86_runtime_refuses_a_snapdragon_package(snapdragon_package):
    with pytest.raises(EdgesparseError, match=r"built for target 'snapdragon' \(aarch64\); this machine is x86_64"):
        runtime.load(snapdragon_package)
    result = cli("bench", snapdragon_package, check=False)  # benchmarks run natively: refused
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: package was built for target 'snapdragon' (aarch64); this machine is x86_64"]


def test_verify_command_reruns_the_package_under_qemu(snapdragon_package):
    result = cli("verify", snapdragon_package)
    assert "target snapdragon" in result.stdout and "max abs error" in result.stdout


def test_inspect_shows_the_target(snapdragon_package):
    result = cli("inspect", snapdragon_package, "--json")
    assert '"snapdragon"' in result.stdout


def test_cli_lists_the_target():
    result = cli("targets", "--json")
    assert "snapdragon" in result.stdout and "aarch64" in result.stdout
