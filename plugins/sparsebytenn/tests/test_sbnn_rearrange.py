"""Whole-network rearrangement: exact function, consistent spaces, fallbacks reported."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sbnn_testing import clone, run_torch_stage

from edgesparse_sparsebytenn import patterns, permute
from edgesparse_sparsebytenn.allocate import to_args


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.2, generator=g)
    return model.eval()


class Branchy(nn.Module):
    """Residual adds, a channel concatenation, squeeze-excite (broadcast mul), depthwise convs,
    BatchNorm, LayerNorm-free Linear head: every kind of tie the tracer models."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(64)
        self.a = nn.Conv2d(64, 64, 1)
        self.bn_a = nn.BatchNorm2d(64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.b = nn.Conv2d(64, 64, 1)
        self.c = nn.Conv2d(64, 32, 1)
        self.se_reduce = nn.Conv2d(96, 16, 1)
        self.se_expand = nn.Conv2d(16, 96, 1)
        self.mix = nn.Conv2d(96, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu6(self.bn_a(self.a(x)))
        y = self.b(F.silu(self.dw(y)))
        x = x + y                                   # residual: stem, b share one space
        z = torch.cat([x, self.c(x)], 1)            # concat: consumers see two segments
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(z, 1)))))
        z = z * s                                   # SE: se_expand's space joins the concat's
        h = F.relu(self.mix(z))
        return self.fc(h.mean((2, 3)))


def test_trace_builds_the_expected_spaces():
    model = _randomize(Branchy())
    x = torch.randn(2, 3, 8, 8)
    gm = permute.trace(model, (x,))
    spaces, _ = permute.build_spaces(gm, {})
    producers = {}
    for i in range(len(spaces.parent)):
        info = spaces.root_info(i)
        for name, _ in info.producers:
            producers[name] = spaces.find(i)
    assert producers["stem"] == producers["b"]          # residual add
    assert producers["a"] != producers["stem"]
    # z * s joins segments [stem 64 | c 32] with se_expand's single 96-channel space: not
    # representable as one permutation per space, so all three are fixed (no rearrangement)
    for name in ("se_expand", "stem", "c"):
        assert any("channel layout" in r for r in spaces.info[producers[name]].fixed), name
    assert not spaces.info[producers["a"]].fixed
    assert spaces.info[producers["fc"]].fixed == ["model output"]


def _no_pruning(monkeypatch):
    """Keep the pass's rearrangement but skip the zeroing: the module it returns is then the
    permuted dense network, which must compute what the original did."""
    from edgesparse_sparsebytenn import SparseByteNN

    monkeypatch.setattr(SparseByteNN, "_weight_mask", lambda self, info, s: np.ones(tuple(info.module.weight.shape), np.float32))


def test_rearrangement_keeps_the_function_and_concentrates_mass(monkeypatch):
    torch.manual_seed(0)
    model = _randomize(Branchy())
    reference = clone(model)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}]
    _no_pruning(monkeypatch)
    p, ctx, out = run_torch_stage(model, calib, sparsity=0.6, dispatch="off", min_channels=16)
    report = ctx.reports["sparsebytenn"]["rearrangement"]
    permuted = {tuple(s["producers"]) for s in report["spaces_permuted"]}
    assert ("a",) in permuted and ("mix",) in permuted
    fixed = {tuple(s["producers"]) for s in report["spaces_fixed"]}
    assert ("b",) in fixed and ("c",) in fixed  # tied to the concat x SE product (see the trace test)
    assert report["max_abs_error"] <= report["tolerance"]
    assert report["retained_mass_after"] > report["retained_mass_before"]
    assert not torch.equal(out.a.weight, reference.a.weight)
    x = torch.randn(3, 3, 8, 8)  # not the calibration batch
    with torch.no_grad():
        assert torch.allclose(out(x), reference(x), atol=1e-4)


def test_permutation_of_a_free_space_is_exact_and_applied_everywhere():
    model = _randomize(Branchy(), seed=3)
    reference = clone(model)
    x = torch.randn(2, 3, 8, 8)
    spaces, _ = permute.build_spaces(permute.trace(model, (x,)), {})
    free = [spaces.find(i) for i in range(len(spaces.parent))
            if spaces.root_info(i).producers and not spaces.root_info(i).fixed]
    free = sorted(set(free))
    assert free
    rng = np.random.default_rng(0)
    perms = {r: rng.permutation(spaces.info[r].size) for r in free}
    permute.apply(spaces, perms)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-4)
    assert not torch.equal(model.a.weight, reference.a.weight)


class Clustered(nn.Module):
    """A 1x1 conv whose output channels come in 4 interleaved families, each using its own
    quarter of the inputs: a good permutation puts each family into whole groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(64, 64, 1, bias=False)
        self.b = nn.Conv2d(64, 64, 1, bias=False)
        w = torch.randn(64, 64) * 0.01
        for o in range(64):
            fam = o % 4
            w[o, fam * 16:(fam + 1) * 16] = torch.randn(16) + 2.0
        self.a.weight.data = w[:, :, None, None]

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_clustering_recovers_hidden_families():
    torch.manual_seed(0)
    model = Clustered().eval()
    w = model.a.weight.detach().numpy()
    before = patterns.retained_mass(w, 16, 0.75)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 64, 4, 4)).astype(np.float32)}]
    p, ctx, out = run_torch_stage(model, calib, sparsity=0.75, dispatch="off", rearrange=True)
    rep = ctx.reports["sparsebytenn"]["rearrangement"]
    permuted = [s for s in rep["spaces_permuted"] if s["producers"] == ["a"]]
    assert permuted and permuted[0]["retained_after"] > 0.95 > before
    # after pruning at 75 %, each 16-row group of `a` reads exactly one 16-input family
    nz = patterns.weight_group_mask(out.a.weight.detach().numpy(), 16)
    assert (nz.sum(1) == 16).all()


class Sliced(nn.Module):
    """x[:, :32] slices channels: the tracer cannot permute that space consistently."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(64, 64, 1)
        self.b = nn.Conv2d(64, 64, 1)
        self.c = nn.Conv2d(32, 64, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(y[:, :32]) + self.b(y)


def test_inconsistent_space_falls_back_and_is_reported():
    torch.manual_seed(0)
    model = Sliced().eval()
    reference = clone(model)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 64, 4, 4)).astype(np.float32)}]
    p, ctx, out = run_torch_stage(model, calib, sparsity=0.5, dispatch="off")
    rep = ctx.reports["sparsebytenn"]["rearrangement"]
    fixed = {tuple(s["producers"]): s["reason"] for s in rep["spaces_fixed"]}
    assert ("a",) in fixed and "indexing" in fixed[("a",)]
    assert any("could not be permuted" in w for w in ctx.warnings)
    # `a` was still pruned, without rearrangement
    assert patterns.weight_group_mask(out.a.weight.detach().numpy(), 16).mean() == 0.5
    assert not torch.equal(out.a.weight, reference.a.weight)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(64, 64, 1)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace control flow on tensor values
            return self.a(x)
        return -self.a(x)


def test_untraceable_model_is_pruned_without_rearrangement():
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 64, 4, 4)).astype(np.float32)}]
    p, ctx, out = run_torch_stage(DataDependent().eval(), calib, sparsity=0.5, dispatch="off")
    rep = ctx.reports["sparsebytenn"]["rearrangement"]
    assert "torch.fx cannot trace" in rep["skipped"]
    assert any("no rearrangement" in w for w in ctx.warnings)
    assert patterns.weight_group_mask(out.a.weight.detach().numpy(), 16).mean() == 0.5


class Transformerish(nn.Module):
    """A pre-LN MLP block on [B, T, D]: LayerNorm + residual stream (D) and the FFN's hidden
    features are free spaces; the output is fixed."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.ln = nn.LayerNorm(64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.out = nn.Linear(64, 50)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(F.gelu(self.fc1(self.ln(h))))
        return self.out(h)


def test_transformer_block_rearranges_exactly(monkeypatch):
    torch.manual_seed(0)
    model = Transformerish().eval()
    model.ln.weight.data.uniform_(0.5, 1.5)
    reference = clone(model)
    rng = np.random.default_rng(0)
    calib = [{"ids": rng.integers(0, 50, (2, 12)).astype(np.int64)}]
    _no_pruning(monkeypatch)
    p, ctx, out = run_torch_stage(model, calib, sparsity=0.6, dispatch="off")
    rep = ctx.reports["sparsebytenn"]["rearrangement"]
    permuted = {tuple(s["producers"]) for s in rep["spaces_permuted"]}
    assert ("fc1",) in permuted  # the FFN's hidden features
    assert ("fc2",) in permuted  # the residual stream: embedding columns, LayerNorm and fc2 rows follow
    assert not torch.equal(out.ln.weight, reference.ln.weight)
    assert ("out",) in {tuple(s["producers"]) for s in rep["spaces_at_output"]}
    assert not rep["spaces_fixed"] and not any("could not be permuted" in w for w in ctx.warnings)
    ids = torch.from_numpy(rng.integers(0, 50, (3, 7)))
    with torch.no_grad():
        assert torch.allclose(out(ids), reference(ids), atol=1e-4)
