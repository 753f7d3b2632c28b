"""Dispatch rule: lookup semantics on a synthetic table, and the committed table's sanity."""

from __future__ import annotations

import json

import pytest

from edgesparse.kernels import dispatch


def _entry(tokens, k, n, be, threads=1, block=16, isa="avx512"):
    return {"op": "BlockSparseMatMul", "isa": isa, "threads": threads, "block": block, "shape": {"K": k, "N": n},
            "tokens": tokens, "size": k * n, "kind": [], "points": [], "break_even": be}  # fmt: skip


TABLE = {
    "entries": [
        _entry(1, 768, 3072, 0.3),
        _entry(8, 768, 3072, 0.5),
        _entry(64, 768, 3072, 0.4),
        _entry(1, 1024, 4096, 0.2),
        _entry(8, 1024, 4096, 0.6),
        _entry(64, 1024, 4096, None),
        {"op": "BlockSparseConv", "isa": "avx512", "threads": 1, "block": 16, "shape": {}, "tokens": 3136,
         "size": 64 * 64, "kind": [1, 1], "points": [], "break_even": 0.5},
    ]
}


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setattr(dispatch, "TABLE_PATH", path)
    monkeypatch.setattr(dispatch, "cache_dir", lambda: tmp_path / "no-tuned-tables")
    dispatch.load_table.cache_clear()
    yield
    dispatch.load_table.cache_clear()


def test_lookup(table):
    p = dispatch.prefers_sparse
    assert p("BlockSparseMatMul", {"K": 768, "N": 3072, "M": 1}, 0.35, 16, isa="avx512")
    assert not p("BlockSparseMatMul", {"K": 768, "N": 3072, "M": 1}, 0.25, 16, isa="avx512")
    # M unknown: the worst token count decides
    assert not p("matmul", {"K": 768, "N": 3072}, 0.45, 16, isa="avx512")
    assert p("matmul", {"K": 768, "N": 3072}, 0.5, 16, isa="avx512")
    # nearest token count in log scale: M=12 -> the M=8 entry
    assert not p("matmul", {"K": 768, "N": 3072, "M": 12}, 0.45, 16, isa="avx512")
    # between two sizes: the higher break-even of both neighbours; a neighbour that never wins -> dense
    assert not p("matmul", {"K": 1024, "N": 3072, "M": 8}, 0.55, 16, isa="avx512")
    assert p("matmul", {"K": 1024, "N": 3072, "M": 8}, 0.6, 16, isa="avx512")
    assert not p("matmul", {"K": 1024, "N": 4096, "M": 64}, 0.99, 16, isa="avx512")
    # far smaller than anything measured, unknown isa / block / op: dense
    assert not p("matmul", {"K": 64, "N": 64, "M": 1}, 0.99, 16, isa="avx512")
    assert not p("matmul", {"K": 768, "N": 3072, "M": 1}, 0.99, 16, isa="neon")
    assert not p("matmul", {"K": 768, "N": 3072, "M": 1}, 0.99, 8, isa="avx512")
    assert not p("Attention", {"K": 768, "N": 3072}, 0.99, 16, isa="avx512")
    # more threads than measured: the largest measured count below
    assert p("matmul", {"K": 768, "N": 3072, "M": 1}, 0.35, 16, isa="avx512", threads=4)
    # larger than everything measured: the largest entry decides
    assert p("matmul", {"K": 4096, "N": 16384, "M": 1}, 0.25, 16, isa="avx512")
    # conv: same kind only
    assert p("conv", {"C": 64, "O": 64, "kernel": 1, "stride": 1}, 0.5, 16, isa="avx512")
    assert not p("conv", {"C": 64, "O": 64, "kernel": 3, "stride": 1}, 0.9, 16, isa="avx512")
    assert not p("matmul", {"K": 768}, 0.99, 16, isa="avx512")  # malformed shape: dense


def test_committed_table_is_well_formed():
    dispatch.load_table.cache_clear()
    table = dispatch.load_table()
    assert table["entries"], "dispatch_table.json is missing or empty"
    for e in table["entries"]:
        assert e["op"] in ("BlockSparseMatMul", "BlockSparseConv")
        assert e["block"] in (4, 8, 16) and e["threads"] >= 1 and e["size"] > 0
        assert e["break_even"] is None or 0.0 <= e["break_even"] <= 1.0
    # on the machine it was measured on, 16x1 blocks at 90% on the FFN shapes go sparse
    isa = table["entries"][0]["isa"]
    assert dispatch.prefers_sparse("BlockSparseMatMul", {"K": 768, "N": 3072}, 0.9, 16, isa=isa)


def test_committed_table_covers_every_x86_isa_and_names_its_cpus():
    """Both ISAs the x86 library ships have entries for every op, block and thread count, so the
    rule never answers "dense" for a machine merely because nobody measured its ISA."""
    dispatch.load_table.cache_clear()
    entries = dispatch.load_table()["entries"]
    groups = {isa: {(e["op"], e["block"], e["threads"]) for e in entries if e["isa"] == isa} for isa in dispatch.X86_ISAS}
    assert groups["avx2"] and groups["avx2"] == groups["avx512"]
    assert all(e.get("cpu") and e.get("generated") for e in entries)


@pytest.mark.parametrize("isa", dispatch.X86_ISAS)
def test_every_isa_makes_the_ffn_layers_sparse_at_high_sparsity(isa, monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "cache_dir", lambda: tmp_path)  # the shipped table alone
    for k, n in ((384, 1536), (1536, 384), (768, 3072), (3072, 768)):
        assert dispatch.prefers_sparse("BlockSparseMatMul", {"K": k, "N": n}, 0.9, 16, isa=isa), (isa, k, n)


def test_conv_kernel_as_list_or_int_is_the_same_kind():
    from edgesparse.kernels import dispatch

    as_int = dispatch.break_even("BlockSparseConv", {"C": 64, "O": 128, "kernel": 1, "stride": 1}, 16, "avx512")
    as_list = dispatch.break_even("BlockSparseConv", {"C": 64, "O": 128, "kernel": [1, 1], "stride": [1, 1]}, 16, "avx512")
    assert as_int is not None and as_int == as_list


def test_committed_table_covers_mobilenet_pointwise_layers():
    """A MobileNet-style network runs 64-512-channel 1x1 convs at 7x7-28x28; without entries at
    each of those token counts the rule (conservatively) kept them dense, and the sample CNN's
    default build left 5 of its 11 pointwise convs dense at 70 %."""
    dispatch.load_table.cache_clear()
    for c, o, hw in ((64, 128, 28), (128, 64, 28), (128, 128, 14), (256, 128, 14), (256, 256, 7), (256, 512, 7),
                     (512, 256, 7)):
        shape = {"C": c, "O": o, "H": hw, "W": hw, "kernel": 1, "stride": 1}
        for threads in (1, 2):
            assert dispatch.break_even("BlockSparseConv", shape, 16, "avx512", threads) is not None, (shape, threads)
