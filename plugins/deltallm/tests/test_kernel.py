"""The C++ DeltaAttention kernel against the PyTorch reference, its MAC counts, its state."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deltallm_testing import op_model, session, smooth_qkv
from edgesparse_deltallm import reference as R

CASES = [  # window, sinks, theta_q, theta_v
    (8, 2, 0.0, 0.0),
    (16, 4, 0.5, 1e-3),
    (32, 0, 1.0, 1e-2),
    (12, 3, "per-dim", 3e-3),
]


def close_enough(got, want):
    """Equal up to float rounding, except where a quantity lands within rounding of a threshold
    and the two implementations decide differently (a key or dim refreshed one row apart): such
    rows may differ a little, and must stay rare."""
    err = np.abs(got - want)
    assert err.max() < 2e-3
    assert (err < 2e-5).mean() > 0.995


def _thresholds(kind, heads, d, rng):
    if kind == "per-dim":
        return (rng.uniform(0.1, 1.0, (heads, d))).astype(np.float32)
    return np.full(heads, kind, np.float32)


@pytest.mark.parametrize("window,sinks,tq,tv", CASES)
def test_kernel_matches_reference(library, window, sinks, tq, tv):
    q, k, v = smooth_qkv(1)
    rng = np.random.default_rng(2)
    thq, thv = _thresholds(tq, 9, 64, rng), np.full(9, tv, np.float32)
    thv[3] *= 4  # per-head value thresholds
    scale = 64 ** -0.5
    ref, _, stats = R.delta_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), scale=scale, window=window,
                                      sinks=sinks, theta_q=torch.tensor(thq), theta_v=torch.tensor(thv))
    y, _, macs = session(op_model(scale, window, sinks), library).run(
        None, {"q": q, "k": k, "v": v, "tq": thq, "tv": thv})
    close_enough(y, ref.numpy())
    assert macs[..., 0].sum() == stats.dense_macs
    assert macs[..., 1].sum() == pytest.approx(stats.qk_macs, rel=1e-3)
    assert macs[..., 2].sum() == pytest.approx(stats.pv_macs, rel=1e-3)
    if tq or tv:
        assert stats.sparsity > 0.2  # the smooth queries leave plenty to skip


def test_large_window_is_exact_attention(library):
    q, k, v = smooth_qkv(3, n=70)
    exact = R.exact_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), scale=0.125).numpy()
    y, _, macs = session(op_model(0.125, 1000, 0), library).run(
        None, {"q": q, "k": k, "v": v, "tq": np.full(1, 5.0, np.float32), "tv": np.full(1, 0.5, np.float32)})
    np.testing.assert_allclose(y, exact, atol=1e-5)
    assert (macs[..., 1] + macs[..., 2] == macs[..., 0]).all()  # nothing skipped


@pytest.mark.parametrize("d,heads,kv_heads", [(32, 4, 2), (128, 2, 1), (80, 3, 3)])
def test_other_head_dims(library, d, heads, kv_heads):
    q, k, v = smooth_qkv(4, heads=heads, kv_heads=kv_heads, n=60, d=d)
    scale = d ** -0.5
    ref, _, _ = R.delta_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), scale=scale, window=10,
                                  sinks=1, theta_q=0.4, theta_v=5e-3)
    y = session(op_model(scale, 10, 1, outputs=1), library).run(
        None, {"q": q, "k": k, "v": v, "tq": np.full(1, 0.4, np.float32), "tv": np.full(1, 5e-3, np.float32)})[0]
    close_enough(y, ref.numpy())


def test_score_jumps_rebase_the_softmax_reference(library):
    """All scores of a row jump by 22.5 (more than the kernel's rebase margin of 20) and back:
    the softmax is unchanged by a common shift, so the result stays well conditioned while the
    kernel rescales its running sums twice."""
    q, k, v = smooth_qkv(5, n=80)
    k[..., 0] = 3.0
    q[..., 0] = 0.0
    q[:, :, 40:60, 0] = 60.0  # + 60 * 3 * 0.125 = 22.5 on every score
    ref, _, _ = R.delta_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), scale=0.125, window=8,
                                  sinks=2, theta_q=0.3, theta_v=1e-3)
    y = session(op_model(0.125, 8, 2, outputs=1), library).run(
        None, {"q": q, "k": k, "v": v, "tq": np.full(1, 0.3, np.float32), "tv": np.full(1, 1e-3, np.float32)})[0]
    # the row where every held weight is e^22.5 too large is the one float32 resolves least well
    np.testing.assert_allclose(y, ref.numpy(), atol=1e-3)
    np.testing.assert_allclose(np.delete(y, 60, axis=2), np.delete(ref.numpy(), 60, axis=2), atol=2e-5)


def test_extreme_score_collapse_stays_finite(library):
    """Scores x12 then x0.05: float32 cannot follow the reference exactly there, but nothing may
    overflow into inf or NaN."""
    q, k, v = smooth_qkv(5, n=80)
    q[:, :, 40:] *= 12.0
    q[:, :, 60:] *= 0.05
    y = session(op_model(0.125, 8, 2, outputs=1), library).run(
        None, {"q": q, "k": k, "v": v, "tq": np.full(1, 0.3, np.float32), "tv": np.full(1, 1e-3, np.float32)})[0]
    assert np.isfinite(y).all()
    assert np.abs(y).max() <= np.abs(v).max() + 1e-4  # still a convex combination of values


@pytest.mark.parametrize("carry, split", [(0, 50), (1, 50), (1, 10)])
def test_prefill_then_decode_equals_one_call(library, carry, split):
    # split 10: decode outgrows the room the carried transposed keys were allocated with
    q, k, v = smooth_qkv(6, n=90)
    th = {"tq": np.full(1, 0.5, np.float32), "tv": np.full(1, 3e-3, np.float32)}
    whole = session(op_model(0.125, 16, 2), library).run(None, {"q": q, "k": k, "v": v, **th})[0]
    s = session(op_model(0.125, 16, 2, carry=carry, state=not carry), library)
    part = lambda a, b: {"q": q[:, :, a:b], "k": k[:, :, :b], "v": v[:, :, :b], **th}  # noqa: E731
    feed = part(0, split)
    if not carry:
        feed["s"] = np.zeros((1, 9, 0), np.float32)
    ys, state = [], None
    y, state, _ = s.run(None, feed)
    ys.append(y)
    for t in range(split, 90):
        feed = part(t, t + 1)
        if not carry:
            feed["s"] = state
        y, state, _ = s.run(None, feed)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, axis=2), whole, atol=1e-6)


def test_carry_restarts_on_another_sequence(library):
    q, k, v = smooth_qkv(7, n=40)
    th = {"tq": np.full(1, 0.5, np.float32), "tv": np.full(1, 3e-3, np.float32)}
    s = session(op_model(0.125, 8, 0, carry=1), library)
    s.run(None, {"q": q, "k": k, "v": v, **th})
    q2, k2, v2 = smooth_qkv(8, n=41)  # a different sequence whose cache has the old length
    got = s.run(None, {"q": q2[:, :, 40:], "k": k2, "v": v2, **th})[0]
    fresh = session(op_model(0.125, 8, 0, carry=1), library).run(None, {"q": q2[:, :, 40:], "k": k2, "v": v2, **th})[0]
    np.testing.assert_array_equal(got, fresh)


def test_bad_inputs_name_the_problem(library):
    import onnxruntime as ort

    q, k, v = smooth_qkv(9, n=20)
    th = {"tq": np.full(1, 0.5, np.float32), "tv": np.full(1, 3e-3, np.float32)}
    s = session(op_model(0.125, 8, 0, state=True), library)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="feed back the state output"):
        s.run(None, {"q": q[:, :, 10:], "k": k, "v": v, **th, "s": np.zeros((1, 9, 7), np.float32)})
    s = session(op_model(0.125, 8, 0), library)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="theta_q"):
        s.run(None, {"q": q, "k": k, "v": v, "tq": np.ones(5, np.float32), "tv": th["tv"]})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="do not match"):
        s.run(None, {"q": q, "k": k[:, :2], "v": v[:, :2], **th})


def test_generic_isa_gives_the_same_result(library, tmp_path):
    """The 16-byte copy (ARM NEON, wasm-less fallback) computes what the widest copy computes."""
    q, k, v = smooth_qkv(10, n=64)
    np.savez(tmp_path / "qkv.npz", q=q, k=k, v=v)
    script = f"""
import sys, numpy as np
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from deltallm_testing import op_model, session
d = np.load({str(tmp_path / 'qkv.npz')!r})
y = session(op_model(0.125, 8, 2, outputs=1), {library!r}).run(None, {{"q": d["q"], "k": d["k"], "v": d["v"],
    "tq": np.full(1, 0.5, np.float32), "tv": np.full(1, 3e-3, np.float32)}})[0]
np.save({str(tmp_path / 'y.npy')!r}, y)
"""
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "DELTALLM_ISA": "generic"})
    wide = session(op_model(0.125, 8, 2, outputs=1), library).run(
        None, {"q": q, "k": k, "v": v, "tq": np.full(1, 0.5, np.float32), "tv": np.full(1, 3e-3, np.float32)})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), wide, atol=2e-5)
