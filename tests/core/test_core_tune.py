"""Dispatch for the machine the package runs on: `--target x86:isa=...`, `edgesparse tune` and the
tables it stores, imports, and the warnings for tables that do not fit."""
import json
import os

import pytest

from edgesparse.kernels import dispatch
from edgesparse_testing import run, run_json


@pytest.fixture
def cache(tmp_path):
    """A user cache of its own (its dispatch tables), sharing the built kernels and headers."""
    from edgesparse.kernels.build import default_cache_dir

    real = default_cache_dir()
    mine = tmp_path / "cache"
    mine.mkdir()
    for shared in ("kernels", "ort-headers"):
        if (real / shared).exists():
            (mine / shared).symlink_to(real / shared)
    return mine


def env_with(cache, **extra):
    return {**os.environ, "EDGESPARSE_CACHE": str(cache), **extra}


def tuned_file(cache):
    files = list((cache / "dispatch").glob("tuned-*.json"))
    assert len(files) == 1, files
    return files[0]


def test_isa_option_decides_the_table_and_is_recorded(mlp_onnx, tmp_path, cache):
    manifest = run_json("build", mlp_onnx, "-t", "x86:isa=avx2", "-p", "magnitude:sparsity=0.9", "-o", tmp_path / "p",
                        env=env_with(cache))
    target = manifest["target"]
    assert target["isa"] == "avx2" and target["config"]["isa"] == "avx2"
    assert target["dispatch_table"]["source"] == "shipped" and target["dispatch_table"]["entries"] > 0
    # 256x1024 and 1024x256 at 90 %: the shipped AVX2 measurements make both sparse
    assert len(manifest["layers"]) == 2
    assert {layer["dispatch_table"] for layer in manifest["layers"]} == {"shipped"}
    verification = manifest["verification"]
    assert verification["passed"]
    if dispatch.host_supports("avx2"):
        assert verification["kernel_isa"] == "avx2" and "not_verified" not in verification


def test_unknown_isa_is_one_line(mlp_onnx, tmp_path):
    result = run("build", mlp_onnx, "-t", "x86:isa=sse4", "-p", "magnitude", "-o", tmp_path / "p", check=False)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert "is not one of native, avx512, avx2" in result.stderr and not (tmp_path / "p").exists()


@pytest.mark.skipif(dispatch.host_supports("avx512"), reason="this machine runs AVX-512 code")
def test_avx512_package_on_a_machine_without_it_says_what_was_not_verified(mlp_onnx, tmp_path, cache):
    manifest = run_json("build", mlp_onnx, "-t", "x86:isa=avx512", "-p", "magnitude:sparsity=0.9,dispatch=off",
                        "-o", tmp_path / "p", env=env_with(cache))
    v = manifest["verification"]
    assert "avx512" in v["not_verified"] and v["kernel_isa"] != "avx512"
    assert any("not verified here" in w for w in manifest["warnings"])


def test_tune_quick_writes_a_table_the_next_build_uses(mlp_onnx, tmp_path, cache):
    env = env_with(cache)
    result = run("tune", "--quick", env=env)
    assert "tuned:" in result.stdout
    table = json.loads(tuned_file(cache).read_text())
    isa = dispatch.current_isa()
    assert table["isa"] == isa and table["cpu"] == dispatch.host_cpu() and table["library_hash"] == dispatch.library_hash()
    assert table["entries"] and all(e["isa"] == isa and e["threads"] == 1 for e in table["entries"])
    assert not list((cache / "dispatch").glob(".*"))  # no partial file left behind

    manifest = run_json("build", mlp_onnx, "-t", "x86", "-p", "magnitude:sparsity=0.9", "-o", tmp_path / "p", env=env)
    assert manifest["target"]["dispatch_table"]["source"] == "tuned"
    assert manifest["target"]["dispatch_table"]["path"] == str(tuned_file(cache))
    assert all(layer["dispatch_table"] == "tuned" for layer in manifest["layers"])
    shown = run("inspect", tmp_path / "p", env=env).stdout
    assert "dispatch table: tuned" in shown

    # a table from another CPU is ignored with a one-line warning; the shipped one decides
    path = tuned_file(cache)
    path.write_text(json.dumps(table | {"cpu": "Some Other CPU"}))
    manifest = run_json("build", mlp_onnx, "-t", "x86", "-p", "magnitude:sparsity=0.9", "-o", tmp_path / "q", env=env)
    assert manifest["target"]["dispatch_table"]["source"] == "shipped"
    assert any("measured on another CPU" in w for w in manifest["warnings"])
    # ... and so is one from another kernel library version, and a corrupt one
    for content, words in ((json.dumps(table | {"library_hash": "0" * 16}), "another kernel library version"),
                           ("{not json", "not valid JSON")):
        path.write_text(content)
        result = run("build", mlp_onnx, "-t", "x86", "-p", "magnitude", "-o", tmp_path / "r", "--force", env=env)
        warnings = [line for line in result.stderr.splitlines() if "dispatch table ignored" in line]
        assert len(warnings) == 1 and words in warnings[0]


def test_import_takes_a_table_measured_elsewhere(mlp_onnx, tmp_path, cache):
    env = env_with(cache)
    entries = [{"op": "BlockSparseMatMul", "isa": "avx2", "threads": 1, "block": 16, "shape": {"K": k, "N": n},
                "tokens": m, "size": k * n, "kind": [], "points": [], "break_even": 0.3}
               for k, n in ((256, 1024), (1024, 256)) for m in (1, 8, 64)]
    measured = tmp_path / "laptop.json"
    measured.write_text(json.dumps({"cpu": "A Laptop CPU", "library_hash": dispatch.library_hash(), "entries": entries}))
    assert "imported:" in run("tune", "--import", measured, env=env).stdout
    manifest = run_json("build", mlp_onnx, "-t", "x86:isa=avx2", "-p", "magnitude:sparsity=0.5", "-o", tmp_path / "p",
                        env=env)
    assert manifest["target"]["dispatch_table"]["source"] == "imported"
    assert manifest["target"]["dispatch_table"]["cpu"] == "A Laptop CPU"
    assert len(manifest["layers"]) == 2  # its break-even 0.3 made both layers sparse at 50 %

    # bad tables are refused with one line, and the imported one stays
    bad = tmp_path / "bad.json"
    for content, words in (("[1, 2", "not valid JSON"), (json.dumps({"entries": [{"op": "x"}]}), "malformed"),
                           (json.dumps({"library_hash": "f" * 16, "entries": entries}), "another kernel library")):
        bad.write_text(content)
        result = run("tune", "--import", bad, env=env, check=False)
        assert result.returncode != 0 and result.stderr.count("\n") == 1 and words in result.stderr
    assert json.loads((cache / "dispatch" / "imported-avx2.json").read_text())["cpu"] == "A Laptop CPU"


def test_interrupted_tuning_leaves_no_table(tmp_path, cache):
    """Entries are saved as they are measured, to a hidden partial file; only a finished run
    renames it into place, so a build after an interrupted one uses the shipped table."""
    import signal
    import subprocess
    import sys
    import time

    # the full plan (many minutes), so the interrupt always lands mid-run, however loaded the machine
    # and with SIGINT's default action restored: a CI runner that starts the suite in the background
    # hands it down ignored, and then Python never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "edgesparse", "tune", "--threads", "1"], env=env_with(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list((cache / "dispatch").glob(".*partial")) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err
    assert not list((cache / "dispatch").glob("tuned-*.json"))
    assert not list((cache / "dispatch").glob(".*"))  # the partial file is removed too
