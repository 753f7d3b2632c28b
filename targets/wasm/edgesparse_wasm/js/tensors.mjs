// Tensors through files between Python and node: <name>.json [{name, dtype, shape, offset, bytes}]
// plus <name>.bin (see edgesparse_wasm/node.py).
import fs from "node:fs";
import path from "node:path";

const ARRAYS = {
  float32: Float32Array, float64: Float64Array, int64: BigInt64Array, int32: Int32Array, int16: Int16Array,
  int8: Int8Array, uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, bool: Uint8Array,
};

export function readTensors(ort, dir, name) {
  const specs = JSON.parse(fs.readFileSync(path.join(dir, `${name}.json`), "utf8"));
  const blob = fs.readFileSync(path.join(dir, `${name}.bin`));
  const out = {};
  for (const s of specs) {
    const Array_ = ARRAYS[s.dtype];
    const copy = new Uint8Array(s.bytes);
    copy.set(blob.subarray(s.offset, s.offset + s.bytes));
    const data = new Array_(copy.buffer, 0, s.bytes / Array_.BYTES_PER_ELEMENT);
    out[s.name] = new ort.Tensor(s.dtype, data, s.shape);
  }
  return out;
}

export function writeTensors(dir, name, tensors) {
  const specs = [];
  const parts = [];
  let offset = 0;
  for (const [key, t] of tensors) {
    const pad = (16 - (offset % 16)) % 16;
    if (pad) parts.push(Buffer.alloc(pad));
    offset += pad;
    const data = Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    parts.push(data);
    specs.push({ name: key, dtype: t.type, shape: Array.from(t.dims), offset, bytes: data.byteLength });
    offset += data.byteLength;
  }
  fs.writeFileSync(path.join(dir, `${name}.bin`), Buffer.concat(parts));
  fs.writeFileSync(path.join(dir, `${name}.json`), JSON.stringify(specs));
}
