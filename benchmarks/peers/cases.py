"""The models every runtime runs: dense ONNX files, edgesparse's package built from each, and the
pruned dense copy the peers get.

For one case (a dense model D, a sparsity S, a thread count T):
- edgesparse: `edgesparse build D.onnx --target x86 --pass magnitude:sparsity=S,block=16
  --threads T` (called in-process through `edgesparse.pipeline.build`, the same code the CLI runs);
  its dispatch rule may keep layers dense (then they stay unpruned and run on ORT's kernels).
- peers and the ORT dense baseline: D with every layer the magnitude pass would prune (pruned, or
  kept dense only because the dispatch rule predicted no gain) replaced by the pass's own
  `prune_blocks` output, stored densely with its zeros. So every runtime sees the same pruned
  weights wherever edgesparse prunes, and the peers also get the zeros where it declines to.

All dense models have static shapes (DeepSparse compiles for one batch size; MNN resizes anyway),
opset <= 18 and IR version 8, which DeepSparse's onnx 1.14 reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
BLOCK = 16
IR_VERSION = 8


@dataclass
class Model:
    """A dense model and one batch of inputs for it."""

    kind: str              # ffn, dwsep, minilm, sbnn
    label: str             # e.g. "768x3072"
    path: Path             # dense ONNX (static shapes)
    inputs: dict           # name -> np.ndarray
    tokens: int            # M: rows of the matmuls (FFN), batch x sequence (MiniLM), batch (CNNs)
    meta: dict = field(default_factory=dict)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


def ffn_model(work: Path, k: int, n: int, m: int, seed: int = 0) -> Model:
    """Y = X @ W + b, X [M, K]: one FFN projection (what the kernels bench measures)."""
    rng = np.random.default_rng(seed + 7919 * k + n)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = (0.1 * rng.standard_normal(n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="fc"), helper.make_node("Add", ["xw", "b"], ["y"], name="fc_bias")],
        "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgesparse-peers")
    path = _save(model, work / "models" / f"ffn_{k}x{n}_m{m}.onnx")
    x = np.random.default_rng(seed + m).standard_normal((m, k)).astype(np.float32)
    return Model("ffn", f"{k}x{n}", path, {"x": x}, m, {"K": k, "N": n})


def dwsep_model(work: Path, c: int = 128, o: int = 256, hw: int = 28, batch: int = 1, seed: int = 0) -> Model:
    """A depthwise-separable block: 3x3 depthwise conv (pad 1) + ReLU, 1x1 pointwise C->O + ReLU."""
    rng = np.random.default_rng(seed + c + o)
    dw = (rng.standard_normal((c, 1, 3, 3)) / 3.0).astype(np.float32)
    dwb = (0.1 * rng.standard_normal(c)).astype(np.float32)
    pw = (rng.standard_normal((o, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
    pwb = (0.1 * rng.standard_normal(o)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "dw", "dwb"], ["d"], name="depthwise", group=c, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["dr"], name="depthwise_relu"),
        helper.make_node("Conv", ["dr", "pw", "pwb"], ["p"], name="pointwise", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["p"], ["y"], name="pointwise_relu"),
    ]
    graph = helper.make_graph(nodes, "dwsep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, o, hw, hw])],
                              [numpy_helper.from_array(a, nm) for a, nm in ((dw, "dw"), (dwb, "dwb"), (pw, "pw"), (pwb, "pwb"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgesparse-peers")
    path = _save(model, work / "models" / f"dwsep_{c}x{o}_{hw}_b{batch}.onnx")
    x = np.random.default_rng(seed + 1).standard_normal((batch, c, hw, hw)).astype(np.float32)
    return Model("dwsep", f"dw3x3 {c} + pw {c}->{o} @{hw}x{hw}", path, {"x": x}, batch, {"C": c, "O": o, "HW": hw})


def _static(model: onnx.ModelProto, inputs: dict) -> onnx.ModelProto:
    """Pin the graph inputs to the benchmark's shapes (DeepSparse compiles for fixed shapes); the
    exporter's symbolic shapes inside the graph are left as they are."""
    for value in model.graph.input:
        if value.name in inputs:
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, inputs[value.name].shape):
                d.Clear()
                d.dim_value = int(size)
    return model


def _cache_dir() -> Path:
    base = os.environ.get("EDGESPARSE_CACHE") or str(Path.home() / ".cache" / "edgesparse")
    return Path(base) / "peers" / "models"


def _exported(tag: str, source_files: list[Path], make) -> onnx.ModelProto:
    """Torch exports take a while on a loaded VM: cache them by the source they came from."""
    digest = hashlib.sha256()
    for f in source_files:
        digest.update(f.read_bytes())
    import torch

    digest.update(torch.__version__.encode())
    path = _cache_dir() / f"{tag}-{digest.hexdigest()[:16]}.onnx"
    if path.is_file():
        return onnx.load(str(path))
    model = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return model


def minilm_model(work: Path, batch: int = 1) -> Model:
    """samples/minilm (all-MiniLM-L6-v2, real weights), exported by edgesparse's own exporter,
    sequence 32, real sentences."""
    from edgesparse.export import export_torch
    from edgesparse.inputs import to_numpy
    from edgesparse.source import load_factory

    spec = f"{REPO / 'samples' / 'minilm' / 'model.py'}:build"
    source = load_factory(spec)
    base = _exported("minilm", [REPO / "samples" / "minilm" / "model.py"], lambda: export_torch(source))
    batches = [to_numpy(b) for b in source.calibration()]
    inputs = {k: np.ascontiguousarray(np.concatenate([b[k] for b in batches])[:batch]) for k in batches[0]}
    if len(next(iter(inputs.values()))) < batch:
        raise ValueError(f"MiniLM's calibration has fewer than {batch} sentences")
    model = _static(base, inputs)
    path = _save(model, work / "models" / f"minilm_b{batch}.onnx")
    seq = next(iter(inputs.values())).shape[1]
    return Model("minilm", f"MiniLM-L6 (batch {batch}, seq {seq})", path, inputs, batch * seq, {"batch": batch, "seq": seq})


def sbnn_model(work: Path, batch: int = 1) -> tuple[Model | None, str]:
    """samples/sparsebytenn's FashionMobileNet CNN (28x28 grayscale). Uses the trained weights if
    the sample has cached them, else the same architecture with seeded random weights (speed does
    not depend on the values; the record says which)."""
    folder = REPO / "samples" / "sparsebytenn"
    if not (folder / "cnn.py").is_file():
        return None, "samples/sparsebytenn/cnn.py not found"
    sys.path.insert(0, str(folder))
    try:
        import cnn  # noqa: PLC0415
        import torch
    except Exception as exc:  # noqa: BLE001
        return None, f"samples/sparsebytenn/cnn.py does not import: {type(exc).__name__}: {exc}"
    finally:
        sys.path.remove(str(folder))
    trained = cnn.weights_path().is_file()

    def make():
        from edgesparse import TorchModel
        from edgesparse.export import export_torch

        torch.manual_seed(0)
        module = cnn.FashionMobileNet()
        if trained:
            module.load_state_dict(torch.load(cnn.weights_path(), weights_only=True))
        return export_torch(TorchModel(module=module.eval(), example_inputs={"x": torch.zeros(1, 1, 28, 28)},
                                       output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}))

    sources = [folder / "cnn.py"] + ([cnn.weights_path()] if trained else [])
    base = _exported("sbnn-" + ("trained" if trained else "seed0"), sources, make)
    x = np.random.default_rng(3).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    model = _static(base, {"x": x})
    path = _save(model, work / "models" / f"sbnn_b{batch}.onnx")
    return Model("sbnn", f"FashionMobileNet (batch {batch})", path, {"x": x}, batch,
                 {"batch": batch, "weights": "trained" if trained else "untrained (seed 0)"}), ""


# --- edgesparse's build and the peers' pruned copy -------------------------------------------

def build_package(model: Model, sparsity: float, threads: int, out: Path, force_sparse: bool = False) -> dict:
    """Run edgesparse's build (same code path as the CLI command in the module docstring).

    force_sparse: a diagnostic variant, never the headline figure: the target's dispatch rule is
    bypassed (every layer the pass can prune is pruned onto the sparse kernels), to show what the
    kernels do where the rule keeps layers dense."""
    from edgesparse import targets
    from edgesparse.pipeline import BuildRequest, build

    if force_sparse:
        original = targets.Target.prefers_sparse
        targets.Target.prefers_sparse = lambda self, *args, **kwargs: True
        try:
            return build_package(model, sparsity, threads, out)
        finally:
            targets.Target.prefers_sparse = original

    npz = out.with_suffix(".inputs.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **model.inputs)
    request = BuildRequest(model=str(model.path), target="x86", output=out,
                           passes=[("magnitude", {"sparsity": sparsity, "block": BLOCK})],
                           threads=threads, inputs=npz, force=True, quiet=True)
    return build(request)


def eligible_layers(manifest: dict) -> tuple[list[str], list[str], list[dict]]:
    """(pruned by edgesparse, kept dense only by the dispatch rule, kept dense for other reasons)."""
    report = next(p["report"] for p in manifest["passes"] if p["name"] == "magnitude")
    pruned = [p["layer"] for p in report.get("pruned", [])]
    by_dispatch = [d["layer"] for d in report.get("kept_dense", []) if "would be slower" in d.get("reason", "")]
    other = [d for d in report.get("kept_dense", []) if "would be slower" not in d.get("reason", "")]
    return pruned, by_dispatch, other


def peer_model(model: Model, layers: list[str], sparsity: float, out: Path) -> tuple[Path, float]:
    """The dense model with `layers` pruned by the magnitude pass's own prune_blocks, as zeros in
    dense initializers. Returns the path and the fraction of zero weights in those layers."""
    import onnx_ir as ir
    from edgesparse import graph
    from edgesparse_magnitude import prune_blocks

    ir_model = ir.from_proto(onnx.load(str(model.path)))
    wanted, zeros, total = set(layers), 0, 0
    for layer in graph.layers(ir_model, kinds=("matmul", "conv")):
        if layer.name not in wanted:
            continue
        wanted.discard(layer.name)
        weight = prune_blocks(layer.weight.astype(np.float32), sparsity, BLOCK)
        zeros, total = zeros + int((weight == 0).sum()), total + weight.size
        value = layer.node.inputs[1]
        stored = value.const_value.numpy() if value.const_value is not None else None
        if stored is None:
            raise RuntimeError(f"layer {layer.name}: weight is not an initializer")
        if layer.node.op_type == "Gemm" and graph.attributes(layer.node).get("transB", 0):
            weight = weight.T
        value.const_value = ir.Tensor(np.ascontiguousarray(weight.reshape(stored.shape)), name=value.name)
    if wanted:
        raise RuntimeError(f"layers not found in the dense model: {sorted(wanted)}")
    proto = ir.to_proto(ir_model)
    _save(proto, out)
    return out, (zeros / total if total else 0.0)


def mnn_compatible(path: Path, out: Path) -> Path:
    """MNN 3.6.1's converter has no IsNaN (torch's export of transformers' attention masks uses it):
    a copy with IsNaN(x) written as Not(Equal(x, x)), which is the same function. Returns `path`
    itself when nothing needs rewriting."""
    model = onnx.load(str(path))
    if not any(n.op_type == "IsNaN" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return path
    nodes = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "IsNaN" and node.domain in ("", "ai.onnx"):
            same = f"{node.output[0]}__equal_self"
            nodes.append(helper.make_node("Equal", [node.input[0], node.input[0]], [same], name=f"{node.name or i}_equal"))
            nodes.append(helper.make_node("Not", [same], [node.output[0]], name=f"{node.name or i}_not"))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return _save(model, out)


def package_dense_equivalent(package_dir: Path, out: Path) -> Path:
    """The package's model with its sparse nodes as standard ops (the edgesparse reference)."""
    from edgesparse import verify
    from edgesparse.plugins import registry

    manifest = json.loads((package_dir / "manifest.json").read_text())
    model = onnx.load(str(package_dir / manifest["runtime"]["model"]))
    libraries = list(registry().kernels.values())
    dense = verify.dense_equivalent(model, libraries)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(dense, str(out))
    return out
