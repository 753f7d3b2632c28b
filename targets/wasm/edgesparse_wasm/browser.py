"""Running a package in headless Chromium: a page served on 127.0.0.1 by a small http.server thread
loads onnxruntime-web (the pinned npm copy) and the package's web/edgesparse.mjs exactly as an app
would, runs the package's recorded verification input and POSTs the outputs back as JSON."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgesparse import EdgesparseError

from .node import ort_web_dir

ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                  "--disable-extensions", "--mute-audio")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edgesparse wasm check</title></head>
<body><pre id="status">running</pre>
<script type="module">
const post = (body) => fetch("/result", { method: "POST", body: JSON.stringify(body) });
try {
  const ort = await import("/ort/ort.wasm.min.mjs");
  ort.env.wasm.wasmPaths = "/ort/";
  ort.env.wasm.numThreads = 1;
  const { load } = await import("/pkg/RUNTIME");
  const model = await load(new URL("/pkg/", location.href), { ort });
  const specs = await (await fetch("/io/inputs.json")).json();
  const blob = await (await fetch("/io/inputs.bin")).arrayBuffer();
  const arrays = { float32: Float32Array, int64: BigInt64Array, int32: Int32Array, bool: Uint8Array,
                   uint8: Uint8Array, int8: Int8Array, float64: Float64Array };
  const feeds = {};
  for (const s of specs) {
    const A = arrays[s.dtype];
    feeds[s.name] = new ort.Tensor(s.dtype, new A(blob.slice(s.offset, s.offset + s.bytes)), s.shape);
  }
  const outputs = await model.run(feeds);
  const t0 = performance.now();
  for (let i = 0; i < REPEAT; i++) await model.run(feeds);
  const ms = REPEAT ? (performance.now() - t0) / REPEAT : null;
  const result = {};
  for (const name of model.outputNames) {
    const t = outputs[name];
    result[name] = { dims: Array.from(t.dims), data: Array.from(t.data, Number) };
  }
  await post({ outputs: result, kernelNodes: model.kernelNodes, userAgent: navigator.userAgent,
               crossOriginIsolated: self.crossOriginIsolated, msPerRun: ms });
  document.getElementById("status").textContent = "done";
} catch (e) {
  await post({ error: String(e && e.stack || e) });
}
</script></body></html>
"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".json": "application/json"}

    def do_POST(self):  # noqa: N802  (http.server's naming)
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.send_response(204)
        self.end_headers()
        if self.path == "/result":
            self.server.result = body
            self.server.done.set()

    def log_message(self, *args):
        pass


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise EdgesparseError("headless Chromium is missing (Debian package chromium); run sh targets/wasm/setup_env.sh")
    return exe


def run_in_chromium(package_dir: Path, inputs: dict[str, np.ndarray], timeout: float = 120,
                    repeat: int = 0) -> dict:
    """Outputs (in the manifest's order, as arrays), kernelNodes and the browser's user agent."""
    from .node import write_tensors

    exe = chromium()
    package_dir = Path(package_dir).resolve()
    manifest = json.loads((package_dir / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="edgesparse-browser-") as tmp:
        root = Path(tmp) / "site"
        (root / "ort").mkdir(parents=True)
        (root / "io").mkdir()
        dist = ort_web_dir() / "dist"
        for name in ORT_FILES:
            (root / "ort" / name).symlink_to(dist / name)
        (root / "pkg").symlink_to(package_dir, target_is_directory=True)
        write_tensors(root / "io", "inputs", inputs)
        (root / "index.html").write_text(PAGE.replace("RUNTIME", manifest["runtime"]["web"]["runtime"])
                                         .replace("REPEAT", str(int(repeat))))
        handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)  # noqa: E731
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.done, server.result = threading.Event(), None
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        profile = Path(tmp) / "profile"
        proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            finished = server.done.wait(timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, err = proc.communicate()
            server.shutdown()
            server.server_close()
        if not finished:
            last = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise EdgesparseError(f"Chromium did not report a result within {timeout:.0f} s: {last[0]}")
    result = json.loads(server.result)
    if "error" in result:
        raise EdgesparseError(f"the package failed in Chromium: {result['error'].splitlines()[0]}")
    outputs = []
    for spec in manifest["outputs"]:
        o = result["outputs"][spec["name"]]
        outputs.append(np.asarray(o["data"], dtype=spec["dtype"]).reshape(o["dims"]))
    return {"outputs": outputs, "kernel_nodes": result["kernelNodes"], "user_agent": result["userAgent"],
            "ms_per_run": result["msPerRun"]}
