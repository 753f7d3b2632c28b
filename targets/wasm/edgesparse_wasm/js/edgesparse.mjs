// edgesparse web runtime: runs an edgesparse wasm package in a browser or in node.
//
//   import * as ort from "onnxruntime-web";
//   import { load } from "./pkg/web/edgesparse.mjs";
//   const model = await load("./pkg/", { ort });
//   const outputs = await model.run({ x: new ort.Tensor("float32", data, [1, 256]) });
//
// The package's web/plan.json lists the steps: onnxruntime-web sessions over sub-models
// ("segments") and calls into edgesparse_kernels.wasm for the sparse nodes. The sparse weights
// (web/weights.bin) are copied into the kernel module's memory once, at load.
// No dependencies besides the onnxruntime-web module the app passes in.

export const PLAN_FORMAT = "edgesparse-web-plan";
export const PLAN_VERSION = 1;

const isNode = typeof process !== "undefined" && !!(process.versions && process.versions.node);

function joinPath(base, name) {
  if (base instanceof URL) return new URL(name, base);
  return base.endsWith("/") ? base + name : base + "/" + name;
}

// Reads a package file: fetch() for URLs, the file system for paths in node.
async function defaultRead(base, name) {
  const where = joinPath(base, name);
  const text = String(where);
  if (isNode && !/^(https?|blob|data):/.test(text)) {
    const fs = await import("node:fs/promises");
    const { fileURLToPath } = await import("node:url");
    const path = text.startsWith("file:") ? fileURLToPath(text) : text;
    const data = await fs.readFile(path);
    return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  }
  const response = await fetch(where);
  if (!response.ok) throw new Error(`edgesparse: cannot fetch ${text} (HTTP ${response.status})`);
  return new Uint8Array(await response.arrayBuffer());
}

const decoder = new TextDecoder();

// The wasm kernel module: weights live in its memory; x and y go through a grow-only buffer.
class Kernels {
  constructor(instance) {
    this.e = instance.exports;
    if (this.e._initialize) this.e._initialize();
    this.io = 0;
    this.ioBytes = 0;
  }
  static async create(bytes) {
    const { instance } = await WebAssembly.instantiate(bytes, {});
    return new Kernels(instance);
  }
  alloc(bytes) {
    const p = this.e.esw_malloc(bytes);
    if (!p) throw new Error(`edgesparse: the kernel module cannot allocate ${bytes} bytes`);
    return p;
  }
  ensureIo(bytes) {
    if (bytes > this.ioBytes) {
      if (this.io) this.e.esw_free(this.io);
      this.io = 0;
      this.io = this.alloc(bytes);
      this.ioBytes = bytes;
    }
    return this.io;
  }
  get heap() {
    return this.e.memory.buffer; // re-read after every allocation: growth replaces the buffer
  }
}

function product(dims) {
  let p = 1;
  for (const d of dims) p *= d;
  return p;
}

class KernelStep {
  constructor(step, kernels, weightsPtr) {
    this.step = step;
    this.k = kernels;
    const at = (r) => (r ? weightsPtr + r[0] : 0);
    this.values = at(step.values);
    this.index = at(step.index);
    this.rowPtr = at(step.row_ptr);
    this.bias = at(step.bias);
  }

  // Copies x into the module, runs `call(xPtr, yPtr)`, copies y out.
  _call(ort, x, yCount, outDims, call) {
    const s = this.step;
    const y = new Float32Array(yCount);
    if (x.data.length > 0 && yCount > 0) {
      const xBytes = x.data.length * 4;
      const base = this.k.ensureIo(((xBytes + 63) & ~63) + yCount * 4);
      const yPtr = base + ((xBytes + 63) & ~63);
      new Float32Array(this.k.heap, base, x.data.length).set(x.data);
      const rc = call(base, yPtr);
      if (rc !== 0) throw new Error(`edgesparse: kernel for ${s.node} failed (${rc})`);
      y.set(new Float32Array(this.k.heap, yPtr, yCount));
    }
    return new ort.Tensor("float32", y, outDims);
  }

  run(ort, x) {
    const s = this.step;
    if (x.type !== "float32") throw new Error(`edgesparse: ${s.node} takes float32, got ${x.type}`);
    return s.op === "BlockSparseConv" ? this._conv(ort, x) : this._matmul(ort, x);
  }

  _matmul(ort, x) {
    const s = this.step;
    const dims = x.dims;
    if (dims.length < 1 || dims[dims.length - 1] !== s.K)
      throw new Error(`edgesparse: ${s.node} expects [..., ${s.K}] input, got [${dims}]`);
    const m = product(dims) / s.K;
    return this._call(ort, x, m * s.N, [...dims.slice(0, -1), s.N], (xPtr, yPtr) =>
      this.k.e.esw_bsmm(xPtr, m, s.K, s.N, s.block, s.activation, this.values, this.index, this.rowPtr,
                        this.bias, yPtr));
  }

  _conv(ort, x) {
    const s = this.step;
    const dims = x.dims;
    if (dims.length !== 4 || dims[1] < s.min_in_channels)
      throw new Error(`edgesparse: ${s.node} expects NCHW input with >= ${s.min_in_channels} channels, got [${dims}]`);
    const [n, c, h, w] = dims;
    const [kh, kw] = s.kernel_shape, [sh, sw] = s.strides, [dh, dw] = s.dilations;
    const [pt, pl, pb, pr] = s.pads;
    const oh = Math.floor((h + pt + pb - dh * (kh - 1) - 1) / sh) + 1;
    const ow = Math.floor((w + pl + pr - dw * (kw - 1) - 1) / sw) + 1;
    if (oh < 1 || ow < 1) throw new Error(`edgesparse: ${s.node}: input [${dims}] is smaller than the kernel`);
    const co = s.out_channels;
    return this._call(ort, x, n * co * oh * ow, [n, co, oh, ow], (xPtr, yPtr) =>
      this.k.e.esw_bsconv(xPtr, n, c, h, w, co, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, s.block, s.activation,
                          this.values, this.index, this.rowPtr, this.bias, yPtr));
  }
}

export class EdgesparseModel {
  constructor(ort, plan, kernels, steps) {
    this.ort = ort;
    this.plan = plan;
    this.kernels = kernels;
    this.steps = steps;
    this.inputNames = plan.inputs.map((i) => i.name);
    this.outputNames = plan.outputs.map((o) => o.name);
    // Which sparse nodes really executed on a wasm kernel since load, by op type.
    this.kernelNodes = {};
    this._ran = new Set();
  }

  // feeds: {name: ort.Tensor}. Returns {name: ort.Tensor} for every graph output.
  async run(feeds) {
    const env = new Map();
    for (const name of this.inputNames) {
      if (!(name in feeds)) throw new Error(`edgesparse: missing input '${name}'`);
      env.set(name, feeds[name]);
    }
    for (const { step, session, kernel } of this.steps) {
      if (kernel) {
        const x = env.get(step.input);
        if (!x) throw new Error(`edgesparse: value '${step.input}' is not available for ${step.node}`);
        env.set(step.output, kernel.run(this.ort, x));
        if (!this._ran.has(step.node)) {
          this._ran.add(step.node);
          this.kernelNodes[step.op] = (this.kernelNodes[step.op] || 0) + 1;
        }
      } else {
        const segmentFeeds = {};
        for (const name of step.inputs) segmentFeeds[name] = env.get(name);
        const results = await session.run(segmentFeeds);
        for (const name of step.outputs) env.set(name, results[name]);
      }
      for (const name of step.release) if (!this.outputNames.includes(name)) env.delete(name);
    }
    const out = {};
    for (const name of this.outputNames) out[name] = env.get(name);
    return out;
  }

  async release() {
    for (const { session } of this.steps) if (session) await session.release();
  }
}

// base: the package folder (URL, URL string, or a path in node). options.ort: the onnxruntime-web
// module. options.read(base, name) -> Uint8Array replaces fetch/fs. options.sessionOptions go to
// every onnxruntime-web session.
export async function load(base, options = {}) {
  const ort = options.ort;
  if (!ort || !ort.InferenceSession) throw new Error("edgesparse: pass the onnxruntime-web module as options.ort");
  const read = options.read || defaultRead;
  const manifest = JSON.parse(decoder.decode(await read(base, "manifest.json")));
  const web = manifest.runtime && manifest.runtime.web;
  if (!web) throw new Error(`edgesparse: package target '${manifest.target && manifest.target.name}' is not a wasm package`);
  const plan = JSON.parse(decoder.decode(await read(base, web.plan)));
  if (plan.format !== PLAN_FORMAT || plan.format_version !== PLAN_VERSION)
    throw new Error(`edgesparse: plan format ${plan.format} v${plan.format_version} is not supported (v${PLAN_VERSION})`);
  const dir = web.plan.includes("/") ? web.plan.slice(0, web.plan.lastIndexOf("/") + 1) : "";
  const [wasmBytes, weights] = await Promise.all([read(base, dir + plan.kernels), read(base, dir + plan.weights)]);
  const kernels = await Kernels.create(wasmBytes);
  let weightsPtr = 0;
  if (weights.byteLength) {
    weightsPtr = kernels.alloc(weights.byteLength + 16);
    weightsPtr = (weightsPtr + 15) & ~15; // 16-byte aligned, as the offsets in the plan are
    new Uint8Array(kernels.heap, weightsPtr, weights.byteLength).set(weights);
  }
  const sessionOptions = { executionProviders: ["wasm"], graphOptimizationLevel: "all", ...(options.sessionOptions || {}) };
  const steps = [];
  for (const step of plan.steps) {
    if (step.kind === "kernel") {
      steps.push({ step, kernel: new KernelStep(step, kernels, weightsPtr) });
    } else {
      const bytes = await read(base, dir + step.model);
      steps.push({ step, session: await ort.InferenceSession.create(bytes, sessionOptions) });
    }
  }
  return new EdgesparseModel(ort, plan, kernels, steps);
}
