"""Write an ONNX model over protobuf's 2 GB limit, its weights in an external data file: no such
model installs offline, so the corpus makes one. A stack of MatMul + bias + Relu layers on
x[batch, width] (default: 34 layers of 4096 x 4096 float32, 2.28 GB), weights written layer by
layer so the script itself never holds more than one.

    python benchmarks/corpus/make_large_model.py out/large/model.onnx [--layers 34] [--width 4096]
    edgesparse build out/large/model.onnx -t x86 -p magnitude -o out/large-pkg

The build needs about four times the model's size in memory (the model, its rewritten copy, the
dense reference) and several minutes on two cores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def make(path: Path, layers: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        x = "x"
        for i in range(layers):
            # scaled so activations stay of order one through the stack
            w = (rng.standard_normal((width, width), dtype=np.float32) * np.float32(np.sqrt(2.0 / width)))
            b = (rng.standard_normal(width, dtype=np.float32) * np.float32(0.01))
            for name, array in ((f"w{i}", w), (f"b{i}", b)):
                raw = array.tobytes()
                data.write(raw)
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += len(raw)
                initializers.append(tensor)
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"layer{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"layer{i}_bias")]
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [f"add{i}"], [f"h{i}"], name=f"layer{i}_relu"))
                x = f"h{i}"
    graph = helper.make_graph(nodes, "large_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info(f"add{layers - 1}", TensorProto.FLOAT, ["batch", width])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgesparse corpus")
    model.ir_version = 10
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    path = make(args.output, args.layers, args.width)
    size = (path.parent / f"{path.name}.data").stat().st_size
    print(f"wrote {path} and {path.name}.data ({size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
