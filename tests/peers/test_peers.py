"""The peer benchmark (benchmarks/peers) end to end on its --quick case: one FFN projection
(768x3072, M=8, 90% sparse, 1 thread) through ORT dense, edgesparse, DeepSparse 1.8.0 and MNN
3.6.1, each from its own venv. The first run creates the peers' venvs under
~/.cache/edgesparse/peers (about a minute and a half, from PyPI); a missing registry fails the
test with the error, it is never skipped."""
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))

import envs  # noqa: E402
import report  # noqa: E402


def test_quick_run_outputs_agree_and_records_are_complete(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, str(PEERS / "run.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmarks/peers/run.py --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())

    env = result["environment"]
    for key in ("date", "cpu", "cpus", "load_avg_start", "load_avg_end", "onnxruntime", "edgesparse", "kernel_isa"):
        assert key in env, key
    assert env["peers"]["deepsparse"]["version"] == "1.8.0"
    assert env["peers"]["mnn"]["version"] == "3.6.1"
    assert env["peers"]["deepsparse"]["numpy"].startswith("1.26"), "DeepSparse must run on its own pinned numpy"

    (rec,) = result["records"]
    assert (rec["kind"], rec["shape"], rec["tokens"], rec["sparsity"], rec["threads"]) == \
        ("ffn", {"K": 768, "N": 3072}, 8, 0.9, 1)
    assert rec["edgesparse"]["dispatch_sparse"] and rec["edgesparse"]["fraction_on_sparse_kernels"] == 1.0
    # the peers got the very weights edgesparse pruned (16x1 blocks, stored densely with zeros)
    assert rec["edgesparse_reference_vs_peer_reference"] < 1e-5
    assert abs(rec["peer_pruned_zero_fraction"] - 0.9) < 0.01
    for name in ("ort", "edgesparse", "deepsparse", "mnn"):
        c = rec["candidates"][name]
        assert "error" not in c, f"{name}: {c.get('error')}"
        assert c["outputs_match"] and c["max_abs_error"] <= c["tolerance"] < 0.01, name
        for key in ("median_ms", "p25_ms", "p75_ms", "rounds", "reps", "ratio", "paired_ratio", "samples_ms"):
            assert key in c, f"{name} lacks {key}"
        assert c["rounds"] >= 5 and len(c["samples_ms"]) == c["rounds"]
        assert c["p25_ms"] <= c["median_ms"] <= c["p75_ms"]
    assert rec["candidates"]["deepsparse"]["info"]["fraction_of_supported_ops"] == 1.0
    # 90% sparse 16x1 blocks: the sparse kernel is several times faster than ORT's dense MatMul
    assert rec["candidates"]["edgesparse"]["ratio"] > 1.5, rec["candidates"]["edgesparse"]
    # the FMA peak is the yardstick of the AVX2 report (report.peak_check): present on x86-64, and no
    # runtime's useful rate is above the widest vector's peak (a timing error would show here)
    if platform.machine() == "x86_64":
        peak = env["fma_peak_gflops"]
        assert peak and peak["avx2"] > 1.0, peak
        widest = peak["avx512"] or peak["avx2"]
        for name in ("ort", "edgesparse", "deepsparse", "mnn"):
            assert report.useful_gflops(rec, name) < 1.1 * widest, (name, report.useful_gflops(rec, name), peak)


def test_mnn_worker_blocks_the_telemetry_import():
    """Importing MNN.tools runs `pip install` and uploads logs; the MNN worker must refuse it."""
    python = envs.ensure("mnn")
    code = ("import worker; worker.MnnRuntime()\n"
            "try:\n    import MNN.tools\nexcept ImportError as e:\n    print('blocked', e)\n")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=str(PEERS),
                          env=envs.peer_env("mnn"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "blocked" in proc.stdout
