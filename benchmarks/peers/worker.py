"""A timing server for one runtime, run by the orchestrator (run.py) inside that runtime's venv.

    <venv>/bin/python worker.py ort|deepsparse|mnn

Requests come one JSON object per line on stdin; answers go one per line to the original stdout.
Everything the runtimes themselves print (banners, converter logs) is sent to stderr, which the
orchestrator writes to a log file. Arrays travel as .npy files. Needs only the standard library,
numpy and the runtime, so it runs under DeepSparse's old numpy too.

Requests (each answers {"ok": true, ...} or {"ok": false, "error": "..."}):
  {"op": "hello"}                                     runtime and versions
  {"op": "load", "id", "model", "threads", "inputs": {name: .npy}, ...}   prepare one candidate
      ort: "libraries": [custom-op .so]; mnn: "mnn_model": converted-model path (made if missing)
  {"op": "run", "id", "out": prefix}                  one inference; outputs saved as prefix<i>.npy
  {"op": "time", "id", "reps"}                        reps back-to-back inferences -> "seconds"
  {"op": "drop", "id"}                                forget a candidate
  {"op": "quit"}

The timed call is one inference on inputs prepared at load time: ORT runs an IO binding with
inputs and outputs bound once; DeepSparse runs engine.run(inputs, val_inp=False); MNN copies the
inputs into its session tensors and runs runSession (its memory plan reuses the input buffers
during a run, so a second runSession without the copy computes on garbage).
"""
from __future__ import annotations

import importlib.abc
import json
import os
import sys
import time

import numpy as np


class _BlockTelemetry(importlib.abc.MetaPathFinder):
    """MNN.tools.utils.log runs `pip install` and uploads usage logs when imported: never let it."""

    BLOCKED = ("MNN.tools", "aliyun")

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
            raise ImportError(f"{name} is blocked by the edgesparse peer worker (it calls the network)")
        return None


class OrtRuntime:
    name = "onnxruntime"

    def __init__(self):
        import onnxruntime as ort

        self.ort = ort
        self.version = ort.__version__

    def load(self, req, inputs):
        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(req["threads"])
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # an idle session's pool must not spin on the core the next candidate needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for lib in req.get("libraries", []):
            options.register_custom_ops_library(lib)
        session = ort.InferenceSession(req["model"], options, providers=["CPUExecutionProvider"])
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cpu")
        session.run_with_iobinding(binding)
        names = [o.name for o in session.get_outputs()]
        return {"session": session, "binding": binding, "names": names, "inputs": inputs}, {}

    def call(self, state):
        state["session"].run_with_iobinding(state["binding"])

    def outputs(self, state):
        return state["session"].run(state["names"], state["inputs"])


class DeepSparseRuntime:
    name = "deepsparse"

    def __init__(self):
        import deepsparse

        self.deepsparse = deepsparse
        self.version = deepsparse.__version__

    def load(self, req, inputs):
        batch = int(req["batch_size"])
        engine = self.deepsparse.compile_model(req["model"], batch_size=batch, num_cores=int(req["threads"]))
        order = list(req["input_order"])
        arrays = [np.ascontiguousarray(inputs[n]) for n in order]
        engine.run(arrays, val_inp=True)
        info = {}
        for key in ("fraction_of_supported_ops", "num_cores", "batch_size"):
            try:
                info[key] = getattr(engine, key)
            except Exception:  # noqa: BLE001 - informational only
                pass
        return {"engine": engine, "arrays": arrays}, info

    def call(self, state):
        state["engine"].run(state["arrays"], val_inp=False)

    def outputs(self, state):
        return state["engine"].run(state["arrays"], val_inp=True)


class MnnRuntime:
    name = "mnn"

    def __init__(self):
        sys.meta_path.insert(0, _BlockTelemetry())
        import MNN
        import _tools  # the converter's C extension (not MNN.tools, see _BlockTelemetry)

        self.MNN = MNN
        self.tools = _tools
        self.version = MNN.version()

    def convert(self, onnx_path, mnn_path, sparse=True):
        tmp = f"{mnn_path}.tmp{os.getpid()}"
        args = ["MNNConvert", "-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", tmp, "--bizCode", "edgesparse"]
        if sparse:
            args.append("--detectSparseSpeedUp")
        self.tools.mnnconvert(args)
        if not os.path.isfile(tmp):
            raise RuntimeError(f"MNNConvert wrote no model for {onnx_path}")
        os.replace(tmp, mnn_path)

    def load(self, req, inputs):
        MNN = self.MNN
        mnn_path = req["mnn_model"]
        converted = False
        if not os.path.isfile(mnn_path):
            self.convert(req["model"], mnn_path, sparse=req.get("sparse", True))
            converted = True
        interp = MNN.Interpreter(mnn_path)
        session = interp.createSession({"backend": "CPU", "numThread": int(req["threads"]), "precision": "high"})
        tensors = interp.getSessionInputAll(session)
        missing = [n for n in inputs if n not in tensors]
        if missing:
            raise RuntimeError(f"MNN model lacks inputs {missing} (has {sorted(tensors)})")
        for name, array in inputs.items():
            interp.resizeTensor(tensors[name], tuple(array.shape))
        interp.resizeSession(session)
        tensors = {name: interp.getSessionInput(session, name) for name in inputs}  # fresh after resize
        hosts = []
        for name, array in inputs.items():
            if array.dtype.kind == "f":
                host = MNN.Tensor(tuple(array.shape), MNN.Halide_Type_Float, np.ascontiguousarray(array, np.float32),
                                  MNN.Tensor_DimensionType_Caffe)
            else:
                host = MNN.Tensor(tuple(array.shape), MNN.Halide_Type_Int, np.ascontiguousarray(array, np.int32),
                                  MNN.Tensor_DimensionType_Caffe)
            hosts.append((tensors[name], host))
        state = {"interp": interp, "session": session, "order": req["output_order"], "hosts": hosts}
        self.call(state)
        return state, {"mnn_model_bytes": os.path.getsize(mnn_path), "converted_now": converted}

    def call(self, state):
        # MNN's memory plan reuses the input buffer during a run: inputs are copied in every time
        for tensor, host in state["hosts"]:
            tensor.copyFrom(host)
        state["interp"].runSession(state["session"])

    def outputs(self, state):
        MNN = self.MNN
        interp, session = state["interp"], state["session"]
        self.call(state)
        outs = interp.getSessionOutputAll(session)
        result = []
        for name in state["order"]:
            t = outs[name]
            shape = tuple(t.getShape())
            host = MNN.Tensor(shape, MNN.Halide_Type_Float, np.zeros(shape, np.float32), MNN.Tensor_DimensionType_Caffe)
            t.copyToHostTensor(host)
            result.append(np.array(host.getData(), dtype=np.float32).reshape(shape))
        return result


RUNTIMES = {"ort": OrtRuntime, "deepsparse": DeepSparseRuntime, "mnn": MnnRuntime}


def serve(kind: str) -> None:
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # runtime chatter on fd 1 goes to the log, not into the protocol
    sys.stdout = sys.stderr
    try:
        runtime = RUNTIMES[kind]()
    except Exception as exc:  # noqa: BLE001
        answer.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    states = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "quit":
                answer.write(json.dumps({"ok": True}) + "\n")
                break
            if op == "hello":
                reply = {"runtime": runtime.name, "version": runtime.version, "numpy": np.__version__,
                         "python": sys.version.split()[0]}
            elif op == "load":
                inputs = {name: np.load(path) for name, path in req["inputs"].items()}
                t0 = time.perf_counter()
                states[req["id"]], info = runtime.load(req, inputs)
                reply = {"info": info, "load_s": time.perf_counter() - t0}
            elif op == "run":
                outs = runtime.outputs(states[req["id"]])
                paths = []
                for i, out in enumerate(outs):
                    path = f"{req['out']}{i}.npy"
                    np.save(path, np.asarray(out))
                    paths.append(path)
                reply = {"outputs": paths}
            elif op == "time":
                state, reps = states[req["id"]], int(req["reps"])
                call = runtime.call
                t0 = time.perf_counter()
                for _ in range(reps):
                    call(state)
                reply = {"seconds": time.perf_counter() - t0}
            elif op == "drop":
                states.pop(req["id"], None)
                reply = {}
            else:
                raise ValueError(f"unknown op {op!r}")
            reply["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reply = {"ok": False, "error": f"{type(exc).__name__}: {msg}"[:500]}
        answer.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    serve(sys.argv[1])
