"""What the families add to the DeltaAttention op: logit soft-capping (Gemma 2) on the delta path
too, a sliding window (`span`), and the same meaning in the ONNX function that runs without the
library."""
import numpy as np
import pytest
from onnx import TensorProto, helper

from deltallm_testing import DOMAIN, session, smooth_qkv


def _model(scale, window, sinks, softcap=0.0, span=0, carry=0, functions=False):
    names = ["q", "k", "v", "tq", "tv"]
    attrs = {"scale": float(scale), "window": window, "sinks": sinks, "carry": carry}
    if softcap:
        attrs["softcap"] = float(softcap)
    if span:
        attrs["span"] = span
    outputs = ["y"] if functions else ["y", "", "macs"]  # the function (exact attention) has no counters
    node = helper.make_node("DeltaAttention", names, outputs, domain=DOMAIN, **attrs)
    infos = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("macs", TensorProto.INT64, None)][:len(outputs) - 1 or 1]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              infos)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    if functions:
        from edgesparse_deltallm.library import function_protos

        return helper.make_model(graph, opset_imports=opsets, functions=function_protos(opsets))
    return helper.make_model(graph, opset_imports=opsets)


def exact(q, k, v, scale, softcap=0.0, span=0):
    """Causal grouped-query attention in numpy, soft-capped and windowed as asked."""
    h, hkv, t, n = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kk, vv = np.repeat(k, h // hkv, 1), np.repeat(v, h // hkv, 1)
    s = (q.astype(np.float64) @ kk.transpose(0, 1, 3, 2)) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    pos, keys = np.arange(n - t, n)[:, None], np.arange(n)[None]
    hidden = (keys > pos) | ((keys <= pos - span) if span else False)
    s = np.where(hidden, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ vv).astype(np.float32)


def _feeds(q, k, v, tq=0.0, tv=0.0):
    return {"q": q, "k": k, "v": v, "tq": np.full(1, tq, np.float32), "tv": np.full(1, tv, np.float32)}


def test_softcap_on_the_delta_path_is_exact_with_zero_thresholds(library):
    q, k, v = smooth_qkv(5, n=90)
    q *= 4  # scores well past the cap, so capping changes the result
    scale, cap = 64 ** -0.5, 5.0
    want = exact(q, k, v, scale, softcap=cap)
    assert np.abs(want - exact(q, k, v, scale)).max() > 1e-2
    y, macs = session(_model(scale, 4, 2, softcap=cap), library).run(None, _feeds(q, k, v))
    np.testing.assert_allclose(y, want, atol=2e-5)   # far keys (window 4) go through the capped delta path
    # with thresholds it skips work and stays close (measured: 28% sparsity, 2.3% relative RMS
    # error; the same thresholds without the cap: 35%, 3.1%, the cap compressing score errors)
    y, macs = session(_model(scale, 8, 0, softcap=cap), library).run(None, _feeds(q, k, v, 0.2, 1e-3))
    assert 1 - macs[..., 1:].sum() / macs[..., 0].sum() > 0.2
    assert np.sqrt(((y - want) ** 2).mean() / (want ** 2).mean()) < 0.05


def test_softcap_prefill_equals_decode_through_the_kept_state(library):
    q, k, v = smooth_qkv(6, n=40)
    model = _model(64 ** -0.5, 6, 1, softcap=3.0, carry=1)
    whole, _ = session(model, library).run(None, _feeds(q * 3, k, v, 0.3, 1e-3))
    s = session(model, library)
    rows = [s.run(None, _feeds(q[:, :, :30] * 3, k[:, :, :30], v[:, :, :30], 0.3, 1e-3))[0]]
    for t in range(30, 40):
        rows.append(s.run(None, _feeds(q[:, :, t:t + 1] * 3, k[:, :, :t + 1], v[:, :, :t + 1], 0.3, 1e-3))[0])
    np.testing.assert_allclose(np.concatenate(rows, 2), whole, atol=1e-5)


@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_span_is_exact_inside_the_window_when_the_window_covers_it(library, softcap):
    q, k, v = smooth_qkv(7, n=50)
    span, scale = 6, 64 ** -0.5
    y, macs = session(_model(scale, 6, 2, softcap=softcap, span=span), library).run(
        None, _feeds(q, k, v, 5.0, 0.5))  # large thresholds, but every key the row sees is near
    np.testing.assert_allclose(y, exact(q, k, v, scale, softcap, span), atol=2e-5)
    seen = np.minimum(np.arange(1, 51), span).sum()   # dense MACs count only the keys in the window
    assert (macs[..., 0] == 2 * 64 * seen).all() and (macs[..., 1:].sum(-1) == macs[..., 0]).all()


def _reference(q, k, v, scale, window, tq, tv, softcap=0.0, span=0, state=None):
    import torch

    from edgesparse_deltallm import reference as R

    return R.delta_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), scale=scale, window=window, sinks=0,
                             theta_q=tq, theta_v=tv, softcap=softcap, span=span, state=state)


@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_span_with_delta_inside_the_sliding_window_matches_the_reference(library, softcap):
    """Sequences 4x longer than the sliding window: the far keys inside it go through the delta
    approximation, and those that leave it leave the running sums (kernel == reference)."""
    from test_kernel import close_enough

    q, k, v = smooth_qkv(11, n=160)
    q *= 2
    span, window, scale = 40, 8, 64 ** -0.5
    ref, _, stats = _reference(q, k, v, scale, window, 0.3, 2e-3, softcap, span)
    y, macs = session(_model(scale, window, 3, softcap=softcap, span=span), library).run(
        None, _feeds(q, k, v, 0.3, 2e-3))   # sinks are ignored with a span: nothing before the window is seen
    close_enough(y, ref.numpy())
    assert macs[..., 0].sum() == stats.dense_macs
    assert macs[..., 1].sum() == pytest.approx(stats.qk_macs, rel=1e-3)
    assert macs[..., 2].sum() == pytest.approx(stats.pv_macs, rel=1e-3)
    assert stats.sparsity > 0.3   # far keys inside the sliding window are skipped
    # and it approximates the windowed attention, not the full causal one
    rel = lambda want: np.sqrt(((y - want) ** 2).mean() / (want ** 2).mean())  # noqa: E731
    windowed, causal = rel(exact(q, k, v, scale, softcap, span)), rel(exact(q, k, v, scale, softcap))
    assert windowed < 0.1 and causal > 3 * windowed   # measured: 0.078 vs 0.98 (cap 4: 0.064 vs 0.78), 40% sparsity


def test_span_with_zero_thresholds_is_exact_windowed_attention(library):
    q, k, v = smooth_qkv(12, n=130)
    span, scale = 32, 64 ** -0.5
    y, _ = session(_model(scale, 4, 0, span=span), library).run(None, _feeds(q, k, v))
    np.testing.assert_allclose(y, exact(q, k, v, scale, 0.0, span), atol=2e-5)


@pytest.mark.parametrize("carry, split", [(1, 70), (1, 20), (0, 70)])
def test_span_prefill_then_decode_equals_one_call_and_the_reference(library, carry, split):
    """Decode with the KV cache far past the sliding window: the state kept between calls (in
    the node, or fed back) continues the sequence exactly; and the reference's own prefill +
    decode agrees."""
    import torch

    from edgesparse_deltallm import reference as R

    q, k, v = smooth_qkv(13, n=120)
    span, window, scale = 30, 6, 64 ** -0.5
    whole, _ = session(_model(scale, window, 0, span=span), library).run(None, _feeds(q, k, v, 0.4, 3e-3))
    names = ["q", "k", "v", "tq", "tv"] + ([] if carry else ["s"])
    node = helper.make_node("DeltaAttention", names, ["y", "so"], domain=DOMAIN, scale=float(scale), window=window,
                            sinks=0, carry=carry, span=span)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "so")])
    s = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]),
                library)
    part = lambda a, b: _feeds(q[:, :, a:b], k[:, :, :b], v[:, :, :b], 0.4, 3e-3)  # noqa: E731
    feed = part(0, split)
    if not carry:
        feed["s"] = np.zeros((1, 9, 0), np.float32)
    y, state = s.run(None, feed)
    ys = [y]
    for t in range(split, 120):
        feed = part(t, t + 1)
        if not carry:
            feed["s"] = state
        y, state = s.run(None, feed)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, axis=2), whole, atol=1e-6)

    kw = dict(scale=scale, window=window, sinks=0, theta_q=0.4, theta_v=3e-3, span=span)
    ref_whole, _, st_whole = R.delta_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), **kw)
    rstate, rows, total = None, [], R.DeltaStats()
    for a, b in [(0, split)] + [(t, t + 1) for t in range(split, 120)]:
        y, rstate, st = R.delta_attention(torch.tensor(q[:, :, a:b]), torch.tensor(k[:, :, :b]), torch.tensor(v[:, :, :b]),
                                          state=rstate, **kw)
        rows.append(y)
        total.add(st)
    torch.testing.assert_close(torch.cat(rows, 2), ref_whole, atol=1e-5, rtol=1e-5)
    assert total.macs == st_whole.macs and total.dense_macs == st_whole.dense_macs
    err = np.abs(whole - ref_whole.numpy())
    assert err.max() < 2e-3 and (err < 2e-5).mean() > 0.995


def test_the_onnx_function_means_the_same_without_the_library(library):
    import onnxruntime as ort

    q, k, v = smooth_qkv(8, n=30)
    for softcap, span in ((0.0, 0), (4.0, 0), (0.0, 5), (4.0, 5)):
        model = _model(0.125, 4096, 0, softcap=softcap, span=span, functions=True)
        y = ort.InferenceSession(model.SerializeToString()).run(None, _feeds(q * 2, k, v))[0]
        np.testing.assert_allclose(y, exact(q * 2, k, v, 0.125, softcap, span), atol=2e-5)
