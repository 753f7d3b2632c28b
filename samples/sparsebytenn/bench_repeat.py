"""Usage: flock /tmp/edgesparse-timing.lock python samples/sparsebytenn/bench_repeat.py AFTER_PKG BEFORE_PKG OUT.json

Before/after at 70 %: the package built today (residual fold, new kernels) and the earlier
package with the same groups (prof-70, 11 sparse layers), `edgesparse bench` alternated."""
import json, subprocess, sys, os, time
HERE = "samples/sparsebytenn"
pk = dict(zip(("after", "before"), sys.argv[1:3]))
runs = []
for r in range(3):
    for name, path in pk.items():
        out = subprocess.run([sys.executable, f"{HERE}/es.py", "bench", path, "--threads", "1,2", "--json", "--rounds", "100"],
                             capture_output=True, text=True, check=True).stdout
        rec = json.loads(out[out.index("["):])
        runs.append({"run": r, "package": name, "load_average": os.getloadavg()[0],
                     "results": [{"threads": b["threads"], "speedup": round(b["speedup"], 3),
                                  "dense_ms": round(b["dense"]["median_ms"], 3), "package_ms": round(b["package"]["median_ms"], 3),
                                  "package_p25_p75": [round(b["package"]["p25_ms"], 3), round(b["package"]["p75_ms"], 3)]} for b in rec]})
        print(name, r, [(b["threads"], round(b["speedup"], 3)) for b in rec], flush=True)
json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}, open(sys.argv[3], "w"), indent=1)
