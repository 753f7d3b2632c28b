"""BlockSparseMatMul: packing, numpy reference and ONNX node builder (numpy + onnx only).

Operator ``com.edgesparse::BlockSparseMatMul`` computes ``Y = act(X @ W + bias)``
with W [K, N] in MatMul layout (a Linear/Gemm with transB must be transposed by
the caller) stored as B x 1 blocks (B consecutive output features x 1 input
feature), B in {4, 8, 16}, NB = ceil(N / B) block rows:

- input 0 ``X`` float [..., K]
- input 1 ``values`` float [nnzb, B]: block p = W[k_index[p], j*B:(j+1)*B] for its
  block row j, zero padded past N
- input 2 ``k_index`` int32 [nnzb]: strictly ascending within each block row
- input 3 ``row_ptr`` int32 [NB + 1]: row_ptr[0] = 0, non-decreasing, row_ptr[NB] = nnzb
- input 4 ``bias`` float [N], optional
- attributes ``N`` (int, required), ``activation`` ("none" | "relu" | "gelu" | "silu")
- output 0 ``Y`` float [..., N]

A block is kept when any of its B weights is non-zero. Packing happens here, at
build time; the kernel never repacks.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "com.edgesparse"
BLOCK_SIZES = (4, 8, 16)
MATMUL_ACTIVATIONS = ("none", "relu", "gelu", "silu")


def _check_block(block: int) -> None:
    if block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {BLOCK_SIZES}, got {block}")


def pack_block_sparse(w: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """Dense W [K, N] (zeros where pruned) -> {"values", "k_index", "row_ptr"}."""
    _check_block(block)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [K, N], got shape {w.shape}")
    k, n = w.shape
    nb = -(-n // block)
    padded = np.zeros((k, nb * block), dtype=np.float32)
    padded[:, :n] = w
    blocks = padded.reshape(k, nb, block).transpose(1, 0, 2)  # [NB, K, B]
    keep = np.any(blocks != 0, axis=2)  # [NB, K]
    rows, ks = np.nonzero(keep)  # row-major: block rows in order, k ascending inside
    row_ptr = np.zeros(nb + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=row_ptr[1:])
    return {
        "values": np.ascontiguousarray(blocks[rows, ks], dtype=np.float32).reshape(-1, block),
        "k_index": ks.astype(np.int32),
        "row_ptr": row_ptr,
    }


def unpack_block_sparse(packed: dict[str, np.ndarray], n: int, k: int | None = None) -> np.ndarray:
    """Packed blocks -> dense W [K, N]. K defaults to the largest k_index + 1."""
    values = np.asarray(packed["values"], dtype=np.float32)
    k_index = np.asarray(packed["k_index"]).astype(np.int64)
    row_ptr = np.asarray(packed["row_ptr"]).astype(np.int64)
    block = values.shape[1]
    nb = len(row_ptr) - 1
    if k is None:
        k = int(k_index.max()) + 1 if len(k_index) else 0
    dense = np.zeros((k, nb, block), dtype=np.float32)
    row_of = np.repeat(np.arange(nb), np.diff(row_ptr))
    dense[k_index, row_of] = values
    return dense.reshape(k, nb * block)[:, :n]


def block_sparsity(packed: dict[str, np.ndarray], k: int) -> float:
    """Fraction of B x 1 blocks that are dropped."""
    nb = len(packed["row_ptr"]) - 1
    total = nb * k
    return 1.0 - len(packed["k_index"]) / total if total else 0.0


def block_sparse_matmul_reference(
    x: np.ndarray,
    packed: dict[str, np.ndarray],
    n: int,
    bias: np.ndarray | None = None,
    activation: str = "none",
) -> np.ndarray:
    """What BlockSparseMatMul computes, in numpy (float64 accumulation)."""
    from edgesparse.kernels.reference import apply_activation

    x = np.asarray(x, dtype=np.float32)
    w = unpack_block_sparse(packed, n, k=x.shape[-1]).astype(np.float64)
    y = x.astype(np.float64) @ w
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return apply_activation(y, activation)


def make_block_sparse_matmul(
    x: str,
    y: str,
    packed: dict[str, np.ndarray],
    n: int,
    *,
    name: str,
    bias: np.ndarray | None = None,
    activation: str = "none",
    prefix: str | None = None,
):
    """Node + initializers for one BlockSparseMatMul.

    Returns ``(node, initializers)``; initializer names are ``<prefix>.values``,
    ``.k_index``, ``.row_ptr`` and ``.bias`` (prefix defaults to ``name``). The
    model also needs ``function_protos`` (see onnx_functions) and an opset import
    for ``com.edgesparse`` version 1: ``attach_functions(model)`` does both.
    """
    import onnx
    from onnx import numpy_helper

    if activation not in MATMUL_ACTIVATIONS:
        raise ValueError(f"activation must be one of {MATMUL_ACTIVATIONS}, got {activation!r}")
    values = np.asarray(packed["values"], dtype=np.float32)
    _check_block(values.shape[1])
    nb = -(-n // values.shape[1])
    if len(packed["row_ptr"]) != nb + 1:
        raise ValueError(f"row_ptr has {len(packed['row_ptr'])} entries, expected ceil(N/B)+1 = {nb + 1}")
    prefix = prefix or name
    inits = [
        numpy_helper.from_array(values, f"{prefix}.values"),
        numpy_helper.from_array(np.asarray(packed["k_index"], dtype=np.int32), f"{prefix}.k_index"),
        numpy_helper.from_array(np.asarray(packed["row_ptr"], dtype=np.int32), f"{prefix}.row_ptr"),
    ]
    inputs = [x, *(t.name for t in inits)]
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if bias.shape != (n,):
            raise ValueError(f"bias must have N={n} elements, got {bias.shape}")
        inits.append(numpy_helper.from_array(bias, f"{prefix}.bias"))
        inputs.append(f"{prefix}.bias")
    node = onnx.helper.make_node(
        "BlockSparseMatMul", inputs, [y], name=name, domain=DOMAIN, N=int(n), activation=activation
    )
    return node, inits
