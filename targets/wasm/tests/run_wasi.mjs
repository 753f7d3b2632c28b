// node run_wasi.mjs <command.wasm> <dir> <args...>: runs a WASI command with <dir> as /data.
import fs from "node:fs";
import { WASI } from "node:wasi";

const [wasmPath, dir, ...args] = process.argv.slice(2);
const wasi = new WASI({ version: "preview1", args: ["driver", ...args], env: {}, preopens: { "/data": dir } });
const module = await WebAssembly.compile(fs.readFileSync(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance);
