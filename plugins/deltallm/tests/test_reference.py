"""The PyTorch reference inside a transformers Llama (the calibration/accuracy tool)."""
import numpy as np
import torch

import tiny_llama
from edgesparse_deltallm import hf, reference as R


def test_reference_prefill_equals_token_by_token():
    torch.manual_seed(0)
    q = torch.cumsum(torch.randn(1, 9, 40, 64) * 0.3, 2)
    k, v = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    kw = dict(scale=0.125, window=6, sinks=1, theta_q=0.4, theta_v=2e-3)
    whole, _, stats = R.delta_attention(q, k, v, **kw)
    state, rows, total = None, [], R.DeltaStats()
    for t in range(40):
        y, state, s = R.delta_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], state=state, **kw)
        rows.append(y)
        total.add(s)
    torch.testing.assert_close(torch.cat(rows, 2), whole, atol=1e-5, rtol=1e-5)
    assert total.macs == stats.macs and total.dense_macs == stats.dense_macs


def test_hf_model_with_exact_window_matches_sdpa():
    model = tiny_llama.model()
    ids = torch.tensor(tiny_llama.tokens(48)[None])
    with torch.no_grad():
        want = model(ids).logits
        hf.enable(model, hf.Settings.uniform(tiny_llama.LAYERS, window=4096, sinks=0, theta_q=1.0, theta_v=0.1))
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert hf.statistics(model)["prefill"] == 0.0
    hf.disable(model)


def test_hf_generation_counts_prefill_and_decode_separately():
    model = tiny_llama.model()
    ids = torch.tensor(tiny_llama.tokens(40)[None])
    hf.enable(model, hf.Settings.uniform(tiny_llama.LAYERS, window=8, sinks=0, theta_q=0.5, theta_v=0.01))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    stats = hf.statistics(model)
    assert out.shape[1] == 46
    assert stats["prefill"] is not None and stats["decode"] is not None
    assert 0 < stats["overall"] < 1
    assert len(stats["layers"]) == tiny_llama.LAYERS and all(r["decode"] is not None for r in stats["layers"])
    hf.disable(model)
    assert model.config._attn_implementation != hf.NAME


def test_reference_and_kernel_agree_inside_the_model(tiny_onnx, library):
    """The torch reference in the transformers model and the rewritten ONNX model with the C++
    kernel compute the same logits with the same thresholds."""
    import onnx
    import onnx_ir as ir
    from edgesparse_deltallm import rewrite
    from deltallm_testing import session

    model = tiny_llama.model()
    ids = tiny_llama.tokens(64, 5)
    hf.enable(model, hf.Settings.uniform(tiny_llama.LAYERS, window=8, sinks=2, theta_q=0.3, theta_v=0.01))
    with torch.no_grad():
        want = model(torch.tensor(ids[None])).logits.numpy()
    hf.disable(model)
    m = ir.from_proto(onnx.shape_inference.infer_shapes(onnx.load(str(tiny_onnx))))
    rewrite.apply(m, window=8, sinks=2, theta_q=0.3, theta_v=0.01, carry=False)
    proto = ir.to_proto(m)
    proto.opset_import.append(onnx.helper.make_opsetid(rewrite.DOMAIN, 1))
    got = session(proto, library).run(["logits"], tiny_llama.feeds(ids))[0]
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
