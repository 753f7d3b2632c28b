"""Is ORT's NCHWc layout worth its reorders here? Times a package and its dense baseline with and
without ORT's NchwcTransformer, interleaved, one thread.

    flock /tmp/edgesparse-timing.lock python samples/sparsebytenn/nchwc_check.py out/sparsebytenn/prof-70
"""
import sys, numpy as np, onnx, onnxruntime as ort, time
sys.path.insert(0, "samples/sparsebytenn")
from edgesparse import runtime, verify
from edgesparse.plugins import registry
from edgesparse.timing import interleaved
pkg = runtime.load(sys.argv[1])
rec = np.load(pkg.root / "verification.npz")
feed = {k[6:]: rec[k] for k in rec.files if k.startswith("input:")}
domains = set(pkg.manifest["runtime"].get("custom_domains", []))
libs = [l for l in registry().kernels.values() if l.domain in domains]
dm = verify.dense_equivalent(onnx.load(str(pkg.model_path)), libs).SerializeToString()
def sess(model, lib, disabled=(), level=None):
    o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if level is not None: o.graph_optimization_level = level
    for l in lib: o.register_custom_ops_library(str(l))
    return ort.InferenceSession(model, o, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
c = {"dense": sess(dm, []), "dense_nonchwc": sess(dm, [], ["NchwcTransformer"]),
     "pkg": sess(str(pkg.model_path), pkg.libraries), "pkg_nonchwc": sess(str(pkg.model_path), pkg.libraries, ["NchwcTransformer"])}
st = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in c.items()}, rounds=200, budget_s=20)
for k, v in st.items(): print(k, round(v["median_ms"], 3), round(v["p25_ms"], 3), round(v["p75_ms"], 3))
