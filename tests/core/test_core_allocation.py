"""edgesparse.allocation (sparsity=auto's search) and the dispatch table's predicted speedups, without
a build: the pieces the magnitude and sparsebytenn tests exercise end to end."""
import pytest

from edgesparse import EdgesparseError, Option, allocation, in_range
from edgesparse.kernels import dispatch


def _table(points, break_even=0.3):
    entry = {"op": "BlockSparseMatMul", "isa": "avx512", "threads": 1, "block": 16, "size": 256 * 1024,
             "tokens": 8, "points": points, "break_even": break_even}
    return {"entries": [entry]}


def test_predicted_speedup_interpolates_the_measured_points():
    table = _table([[0.3, 1.2], [0.5, 1.8], [0.9, 5.0]])
    shape = {"K": 256, "N": 1024, "M": 8}
    p = lambda s: dispatch.predicted_speedup("matmul", shape, s, 16, isa="avx512", table=table)
    assert p(0.3) == pytest.approx(1.2) and p(0.4) == pytest.approx(1.5) and p(0.7) == pytest.approx(3.4)
    assert p(0.95) == pytest.approx(5.0)  # no extrapolation upwards
    assert p(0.2) is None  # below what was measured
    assert dispatch.predicted_speedup("matmul", shape, 0.5, 8, isa="avx512", table=table) is None  # block not measured
    assert dispatch.break_even("matmul", shape, 16, "avx512", table=table) == 0.3


def test_the_shipped_table_predicts_more_speed_at_higher_sparsity():
    shape = {"K": 384, "N": 1536, "M": 16}
    values = [dispatch.predicted_speedup("matmul", shape, s, 16, isa="avx512") for s in (0.5, 0.7, 0.9)]
    assert all(v is not None for v in values) and values == sorted(values)


def _layers():
    a = allocation.Layer("a", "matmul", {}, 16, weights=100, macs=100.0, levels={0.5: 2.0, 0.9: 5.0},
                         loss={0.0: 0.0, 0.5: 0.01, 0.9: 0.5})
    b = allocation.Layer("b", "matmul", {}, 16, weights=100, macs=100.0, levels={0.5: 2.0, 0.9: 5.0},
                         loss={0.0: 0.0, 0.5: 0.001, 0.9: 0.02})
    return [a, b]


def test_the_path_takes_the_cheapest_time_first():
    points = allocation.path(_layers())
    # b to 50 %: 50 of 100 saved for 0.001; then a to 50 % (50 for 0.01), b to 90 % (30 for 0.019), a to 90 %
    assert points == [{"a": 0.0, "b": 0.5}, {"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.9}, {"a": 0.9, "b": 0.9}]
    speed = [allocation.describe(_layers(), p)["predicted_speedup"] for p in points]
    assert speed == sorted(speed)


class _Ctx:
    target = type("T", (), {"name": "stub"})()
    threads = 1

    def __init__(self, budget):
        self.quality_budget = budget
        self.reports, self.logged = {"p": {}}, []

    def report(self, key, value):
        self.reports["p"][key] = value

    def log(self, message):
        self.logged.append(message)


def test_search_bisects_to_the_furthest_point_within_the_budget():
    layers = _layers()
    checked = []

    def check(alloc):  # quality: 1 - the sum of the layers' losses
        checked.append(dict(alloc))
        cos = 1 - sum(l.loss[alloc[l.name]] for l in layers)
        ok = cos >= 0.965
        return {"summary": {"cosine": cos}, "metrics": {}, "passed": ok, "missed": None if ok else f"cosine {cos:.3f} < 0.965"}

    ctx = _Ctx({"cosine": 0.965})
    chosen = allocation.search(layers, check, "p", ctx)
    assert chosen == {"a": 0.5, "b": 0.9}
    report = ctx.reports["p"]["auto"]
    assert report["chosen"]["mean_sparsity"] == 0.7 and len(report["tried"]) == len(checked) == 3  # of 4 points
    assert {"mean_sparsity", "predicted_speedup", "quality", "passed"} <= set(report["tried"][0])


def test_search_with_nothing_within_the_budget_is_one_line():
    def check(alloc):
        return {"summary": {"cosine": 0.5}, "metrics": {}, "passed": False, "missed": "cosine 0.5 < 0.99"}

    with pytest.raises(EdgesparseError) as err:
        allocation.search(_layers(), check, "p", _Ctx({"cosine": 0.99}))
    assert "no allocation meets the quality budget" in str(err.value) and "\n" not in str(err.value)


def test_require_budget():
    with pytest.raises(EdgesparseError, match="needs a quality budget.*--min-quality"):
        allocation.require_budget(_Ctx({}), "p")


def test_option_words():
    o = Option("sparsity", float, 0.5, "", check=in_range(0.0, 1.0, hi_open=True), words=("auto",))
    assert o.parse("auto", "p") == "auto" and o.parse("0.25", "p") == 0.25 and o.parse(0.5, "p") == 0.5
    with pytest.raises(EdgesparseError, match="expects float or 'auto'"):
        o.parse("fast", "p")
    with pytest.raises(EdgesparseError, match=r"must be in \[0.0, 1.0\)"):
        o.parse("1.5", "p")
