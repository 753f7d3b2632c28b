// node run_node.mjs <ort.node.min.mjs> <package dir> <io dir> <package|dense> [threads]
// Runs a package once on <io dir>/inputs.* and writes outputs.* and stats.json there.
//   package: the edgesparse runtime (onnxruntime-web segments + wasm kernels)
//   dense:   plain onnxruntime-web on the package's model.onnx (sparse ops as ONNX functions)
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { readTensors, writeTensors } from "./tensors.mjs";

const [ortModule, pkgDir, ioDir, mode = "package", threads = "1"] = process.argv.slice(2);
const ort = await import(pathToFileURL(ortModule).href);
ort.env.wasm.numThreads = Number(threads);
const manifest = JSON.parse(fs.readFileSync(path.join(pkgDir, "manifest.json"), "utf8"));
const feeds = readTensors(ort, ioDir, "inputs");
let outputs, stats;
if (mode === "dense") {
  const session = await ort.InferenceSession.create(path.join(pkgDir, manifest.runtime.model), { executionProviders: ["wasm"] });
  outputs = await session.run(feeds);
  stats = { kernelNodes: {} };
} else {
  const { load } = await import(pathToFileURL(path.join(pkgDir, manifest.runtime.web.runtime)).href);
  const model = await load(pkgDir, { ort });
  outputs = await model.run(feeds);
  stats = { kernelNodes: model.kernelNodes, steps: model.plan.steps.length };
}
const names = manifest.outputs.map((o) => o.name);
writeTensors(ioDir, "outputs", names.map((n) => [n, outputs[n]]));
fs.writeFileSync(path.join(ioDir, "stats.json"), JSON.stringify({ ...stats, ortWeb: ort.env.versions ? ort.env.versions.web : null }));
