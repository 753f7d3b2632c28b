// node bench_node.mjs <ort.node.min.mjs> <package dir> <dense.onnx> <io dir> <rounds> <budget s> [threads] [with-functions]
// Times, interleaved in one node process, on <io dir>/inputs.*:
//   package:   the edgesparse runtime (onnxruntime-web segments + wasm kernels)
//   dense:     plain onnxruntime-web on <dense.onnx> (the same weights stored densely)
//   functions: plain onnxruntime-web on the package's model.onnx (sparse ops as ONNX functions),
//              only with the last argument set
// Checks first that package and dense agree, then prints JSON with medians and quartiles.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { readTensors } from "./tensors.mjs";

const [ortModule, pkgDir, denseModel, ioDir, roundsArg, budgetArg, threads = "1", withFunctions = ""] = process.argv.slice(2);
const ort = await import(pathToFileURL(ortModule).href);
ort.env.wasm.numThreads = Number(threads);
const manifest = JSON.parse(fs.readFileSync(path.join(pkgDir, "manifest.json"), "utf8"));
const { load } = await import(pathToFileURL(path.join(pkgDir, manifest.runtime.web.runtime)).href);
const feeds = readTensors(ort, ioDir, "inputs");
const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };

const model = await load(pkgDir, { ort });
const dense = await ort.InferenceSession.create(denseModel, options);
const candidates = {
  package: () => model.run(feeds),
  dense: () => dense.run(feeds),
};
if (withFunctions) {
  const functions = await ort.InferenceSession.create(path.join(pkgDir, manifest.runtime.model), options);
  candidates.functions = () => functions.run(feeds);
}

// the two must compute the same thing before their times mean anything
const [a, b] = [await candidates.package(), await candidates.dense()];
let maxAbs = 0;
for (const o of manifest.outputs) {
  const x = a[o.name].data, y = b[o.name].data;
  if (x.length !== y.length) throw new Error(`output ${o.name}: ${x.length} vs ${y.length} elements`);
  for (let i = 0; i < x.length; i++) maxAbs = Math.max(maxAbs, Math.abs(x[i] - y[i]));
}

const names = Object.keys(candidates);
for (let w = 0; w < 3; w++) for (const n of names) await candidates[n]();
const samples = Object.fromEntries(names.map((n) => [n, []]));
const rounds = Number(roundsArg), budget = Number(budgetArg) * 1000;
const start = performance.now();
for (let r = 0; r < rounds; r++) {
  const order = names.slice(r % names.length).concat(names.slice(0, r % names.length));
  for (const n of order) {
    const t0 = performance.now();
    await candidates[n]();
    samples[n].push(performance.now() - t0);
  }
  if (r >= 4 && performance.now() - start > budget) break;
}
const quantile = (s, q) => {
  const v = [...s].sort((x, y) => x - y);
  const i = (v.length - 1) * q, lo = Math.floor(i), hi = Math.ceil(i);
  return v[lo] + (v[hi] - v[lo]) * (i - lo);
};
const stats = Object.fromEntries(names.map((n) => [n, {
  median_ms: quantile(samples[n], 0.5), p25_ms: quantile(samples[n], 0.25), p75_ms: quantile(samples[n], 0.75),
  rounds: samples[n].length,
}]));
console.log(JSON.stringify({ ...stats, max_abs_diff: maxAbs, kernel_nodes: model.kernelNodes,
  ort_web: ort.env.versions ? ort.env.versions.web : null, node: process.version, threads: Number(threads) }));
