"""The hand-written TIR BlockSparseMatMul kernels: CPU results against numpy, CUDA source through
nvcc into cubins, and the fatbin packing of TVM's exported modules."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import tvm
from edgesparse import EdgesparseError
from edgesparse.kernels import block_sparse_matmul_reference, pack_block_sparse
from edgesparse_tvm import cuda, kernels
from edgesparse_tvm.testing import require_tools


def _weights(k, n, block, keep, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    mask = rng.random((k, -(-n // block))) < keep
    w *= np.repeat(mask, block, axis=1)[:, :n]
    return w, pack_block_sparse(w, block)


def _cpu(func):
    return tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=tvm.target.Target({"kind": "llvm"}))["k"]


@pytest.mark.parametrize("m, k, n, block, activation, keep", [
    (1, 96, 200, 16, "relu", 0.25),     # M=1 (decode), N not a multiple of the block
    (2, 80, 64, 16, "none", 0.5),       # M=2: blocks split over two accumulators
    (9, 64, 72, 8, "gelu", 0.4),        # two full token tiles + a partial one
    (None, 64, 36, 4, "silu", 0.3),     # symbolic tokens
    (3, 48, 32, 16, "none", 0.0),       # every block pruned: bias only
])
def test_cpu_kernel_matches_numpy(m, k, n, block, activation, keep):
    w, packed = _weights(k, n, block, keep, seed=k + n)
    rng = np.random.default_rng(1)
    bias = rng.standard_normal(n).astype(np.float32)
    fn = _cpu(kernels.cpu_kernel(m, k, n, block, activation))
    for tokens in ([m] if m else [1, 7, 13]):
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.full((tokens, n), np.nan, np.float32))
        fn(*[tvm.runtime.tensor(a) for a in (x, packed["values"], packed["k_index"], packed["row_ptr"], bias)], y)
        want = block_sparse_matmul_reference(x, packed, n, bias, activation)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4)
    if keep == 0.0:
        assert len(packed["k_index"]) == 0


def test_cpu_kernel_serves_any_weights_of_its_shape():
    """nnzb is symbolic: one compiled kernel, two different sparsity patterns."""
    fn = _cpu(kernels.cpu_kernel(2, 64, 64, 16, "none"))
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    for keep, seed in ((0.2, 0), (0.7, 1)):
        w, packed = _weights(64, 64, 16, keep, seed)
        y = tvm.runtime.tensor(np.zeros((2, 64), np.float32))
        fn(*[tvm.runtime.tensor(a) for a in (x, packed["values"], packed["k_index"], packed["row_ptr"],
                                             np.zeros(64, np.float32))], y)
        np.testing.assert_allclose(y.numpy(), x @ w, rtol=1e-4, atol=1e-4)


def test_bad_kernel_arguments():
    with pytest.raises(ValueError, match="block"):
        kernels.cpu_kernel(1, 64, 64, 12)
    with pytest.raises(ValueError, match="activation"):
        kernels.cuda_kernel(1, 64, 64, 16, "tanh")
    with pytest.raises(ValueError, match="threads"):
        kernels.cuda_kernel(1, 64, 64, 16, threads=100)
    with pytest.raises(ValueError, match="vec"):
        kernels.cuda_kernel(1, 64, 64, 16, vec=6)


def _cuda_source():
    funcs = {}
    for name, (m, k, n, dtype, extra) in {
            "a": (1, 4096, 11008, "float32", {}), "b": (8, 11008, 4096, "float32", {}),
            "c": (8, 4096, 11008, "float16", {}), "d": (None, 256, 200, "float32", {}),
            "e": (1, 4096, 11008, "float32", {"vec": 16, "threads": 128}),
            "f": (8, 4096, 11008, "float32", {"vec": 8, "token_tile": 4, "unroll": 8})}.items():
        funcs[name] = kernels.cuda_kernel(m, k, n, 16, "gelu", dtype, **extra).with_attr("global_symbol", name)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_87"}, host={"kind": "llvm"})
    executable = tvm.compile(tvm.IRModule(funcs), target=target)
    return executable, executable.mod.imports[0].inspect_source()


def test_cuda_kernels_compile_to_cubins_for_sm87_and_sm90():
    require_tools("nvcc")
    _, source = _cuda_source()
    assert "__shfl_xor_sync" in source and "__syncthreads" in source
    assert "float4" in source  # 16-byte weight loads
    fatbin = cuda.compile_fatbin(source, ("sm_87", "sm_90"), cuda.find_nvcc())
    cubins = cuda.cubins_in(fatbin)
    assert set(cubins) == {"sm_87", "sm_90"}
    assert all(size > 1000 for size in cubins.values())


def test_packed_cuda_module_is_rewritten_to_a_fatbin():
    require_tools("nvcc")
    executable, _ = _cuda_source()
    import tvm_ffi

    blob = bytes(memoryview(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod).numpy()))
    assert b"extern \"C\" __global__" in blob  # without a GPU here TVM packs CUDA source
    new, binaries = cuda.rewrite_cuda_imports(blob, lambda src: cuda.compile_fatbin(src, ("sm_90",), cuda.find_nvcc()))
    assert len(binaries) == 1 and set(cuda.cubins_in(binaries[0])) == {"sm_90"}
    assert struct.unpack_from("<Q", new)[0] == len(new) - 8
    assert b"\x06\x00\x00\x00\x00\x00\x00\x00fatbin" in new and b"extern \"C\" __global__" not in new
    again, _ = cuda.rewrite_cuda_imports(new, lambda src: pytest.fail("already compiled"))
    assert again == new
    with pytest.raises(EdgesparseError, match="unexpected layout"):
        cuda.rewrite_cuda_imports(blob[:-10], lambda src: b"")


def test_arch_checks():
    require_tools("nvcc")
    nvcc = cuda.find_nvcc()
    assert cuda.check_arches(["87", "SM_90", "sm_87"], nvcc) == ("sm_87", "sm_90")
    with pytest.raises(EdgesparseError, match="unknown GPU architecture 'sm_99'"):
        cuda.check_arches(["sm_99"], nvcc)
    with pytest.raises(EdgesparseError, match="expected the form"):
        cuda.check_arches(["ampere"], nvcc)
    with pytest.raises(EdgesparseError, match="nvcc not found"):
        cuda.find_nvcc("/nonexistent/nvcc")
