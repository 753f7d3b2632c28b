"""The build, top to bottom:

    load -> keep the original -> torch passes -> export -> check -> ONNX passes -> check -> compile -> package
         -> verify -> quality (vs the original) -> publish

Every stage is a call into a small module; this file only orders them and records what happened.
"""
from __future__ import annotations

import datetime
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import __version__, distributed, export, inputs, onnx_import, package, quality, verify
from .context import BuildContext
from .errors import EdgesparseError
from .plugins import registry as default_registry
from .source import TorchModel, is_factory, load_factory

CALIBRATION_BATCHES = 8  # default; `--calibration-batches` changes it
VERIFY_BATCHES = 2
VERIFICATION_DATA = "verification.npz"


@dataclass
class BuildRequest:
    model: str
    target: str
    output: Path
    target_options: dict = field(default_factory=dict)
    passes: list[tuple[str, dict]] = field(default_factory=list)
    backend: str | None = None
    tolerance: float = 1e-4
    threads: int = 1
    inputs: Path | None = None
    eval_inputs: Path | None = None  # held-out inputs for the quality comparison (ONNX models)
    min_quality: dict = field(default_factory=dict)  # the quality budget: {metric: value}
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # --input-shape, for dynamic dims
    calibration_batches: int = CALIBRATION_BATCHES
    calibration_text: Path | None = None  # hf: models: calibrate on windows of this text
    force: bool = False
    quiet: bool = False
    name: str | None = None


def build(request: BuildRequest, registry=None) -> dict | None:
    """Run the pipeline and publish the package; return its manifest (None on the ranks other than 0
    of a build under torchrun: they help the torch passes train and write nothing)."""
    registry = registry or default_registry()
    if request.calibration_batches < 1:
        raise EdgesparseError(f"calibration batches must be at least 1 (got {request.calibration_batches})")
    target = registry.get("targets", request.target).configure(request.target_options)
    backend = _backend_for(registry, target, request.backend)
    passes = [registry.get("passes", name)(**options) for name, options in request.passes]
    for p in passes:
        if p.targets is not None and target.name not in p.targets:
            raise EdgesparseError(f"pass '{p.name}' cannot run on target '{target.name}' (supports: {', '.join(p.targets)})")
    budget = quality.parse_budget(request.min_quality)
    out = Path(request.output)
    package.check_destination(out, request.force)
    target.check_environment()

    # load
    if request.calibration_text is not None and not is_factory(request.model):
        raise EdgesparseError("--calibration-text is for hf: models; an ONNX model takes --inputs")
    source = load_factory(request.model, request.calibration_text) if is_factory(request.model) else None
    torch_passes = [p for p in passes if "torch" in p.stages()]
    needing_torch = [p for p in torch_passes if p.requires_torch()]
    if needing_torch and source is None:
        raise EdgesparseError(f"pass '{needing_torch[0].name}' works on PyTorch models; give a model.py:build factory instead of an ONNX file")
    model = export.load_onnx(Path(request.model)) if source is None else None
    evaluate = source.evaluate if source is not None else None
    if evaluate is None:
        quality.check_metric_names(budget, None)

    # torch passes and export
    calibration, input_kind = _calibration(request, source, model)
    held_out, held_out_kind = quality.held_out_batches(request.eval_inputs, source, model, calibration)
    ctx = BuildContext(target, registry, calibration=calibration, train=source.train if source else None,
                       threads=request.threads, quiet=request.quiet or not distributed.is_main(),
                       evaluation=held_out if held_out_kind != "calibration" else None)
    table = target.dispatch_table()
    ctx.log(f"target {target.name}, ISA {target.isa}; dispatch table: {table.label}")
    for warning in table.warnings:
        ctx.warn(warning)
    original = None
    measured = []

    def measure_baseline() -> quality.Baseline:
        """The original on the held-out batches, once: when a pass first asks (sparsity=auto) or
        before the ONNX passes."""
        if not measured:
            reference = original or model
            if reference is None:  # a factory's torch stage, no pass of which needs torch
                raise EdgesparseError("the original model is not exported yet: quality is measurable from the ONNX stage on")
            ctx.log(f"running the original model on {len(held_out)} {held_out_kind} batches")
            measured.append(quality.measure_original(_dense_original(reference, registry), held_out, held_out_kind,
                                                     evaluate, request.threads))
            if evaluate is not None:
                quality.check_metric_names(budget, set(measured[0].metrics))
        return measured[0]

    ctx.set_quality(budget, measure_baseline, evaluate)
    if source is not None:
        if needing_torch:  # the module as the user gave it, before the passes change it
            ctx.log("exporting the original model to ONNX")
            original = export.export_torch(source)
        for p in torch_passes:
            ctx.begin_pass(p.name)
            ctx.log(f"[{p.name}] transforming the PyTorch module")
            source.module = p.transform_module(source.module, ctx)
    if not distributed.is_main():
        return None
    if source is not None:
        ctx.log("exporting to ONNX")
        model = export.export_torch(source)
    model = export.check(model, "before the passes")
    imported = None
    if source is None:  # an ONNX file from elsewhere: make sure it runs, upgrade an old opset
        needs = onnx_import.MIN_OPSET if any(p.emits for p in passes) else 0
        model, imported = onnx_import.prepare(model, calibration, request.tolerance, input_kind, needs)
        if "converted" in imported:
            c = imported["converted"]
            ctx.log(f"converted the model from opset {c['from']} to {c['to']} (max abs error {c['max_abs_error']:.2e} vs the original)")

    # the original, run once now on the held-out batches: the package is compared with it at the end
    baseline = measure_baseline()

    # ONNX passes
    graph = ir.from_proto(model)
    for p in passes:
        if "onnx" in p.stages():
            ctx.begin_pass(p.name)
            ctx.log(f"[{p.name}] rewriting the ONNX graph")
            p.rewrite_graph(graph, ctx)
    model = ir.to_proto(graph)
    ctx.end_passes()
    libraries = _attach_functions(model, registry)
    model = export.check(model, "after the passes")

    # compile, package, verify
    ctx.log(f"compiling for {target.name} with the {backend.name} backend")
    with package.staging_for(out) as staging:
        runtime = backend.compile(model, target, staging, libraries)
        for name, data in ctx.files.items():  # extra files the passes ship (ctx.add_file)
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        manifest = {
            "name": request.name or out.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": target.describe(),
            "backend": backend.name,
            "runtime": runtime,
            "inputs": inputs.signature(model, "input"),
            "outputs": inputs.signature(model, "output"),
            **({"import": imported} if imported else {}),
            "passes": [{"name": p.name, "options": _jsonable(p.config), "report": ctx.reports.get(p.name, {})} for p in passes],
            "layers": _layers(model, libraries, target, request.threads),
            "warnings": ctx.warnings,
            "tools": _tool_versions(target),
        }
        package.finalize(staging, manifest)  # the target runs the package as an app would: complete it first
        run_package = _runner(target, staging, request.threads, keep=calibration[:VERIFY_BATCHES])
        manifest["verification"] = _verify(run_package, staging, model, libraries, calibration, input_kind, request, ctx,
                                           node_libraries=[staging / f for f in runtime.get("custom_op_libraries", [])]
                                           if target.runs_here() else None)
        if not manifest["verification"]["passed"]:
            v = manifest["verification"]
            hint = ""
            if v.get("per_node") and not v["per_node"]["agree"]:  # the kernel itself disagrees with its reference
                n = v["per_node"]["worst"]
                hint = (f" (approximating node {n['node']} differs from its reference on the same inputs: "
                        f"{100 * n['rows_within']:.2f}% of rows within the tolerance, the rest "
                        f"{100 * n.get('of_approximation', 0.0):.1f}% of what the approximation changes: its kernel "
                        "computes something else)")
            elif v.get("reference") == "op reference" and request.tolerance > 0:  # decisions can flip between kernel and reference
                scale = v["tolerance"] / request.tolerance  # the tolerance is relative to max(1, |reference|)
                hint = (f" (approximating nodes: a skip decision that rounds differently in the kernel and its "
                        f"reference changes every later layer; --tolerance {1.5 * v['max_abs_error'] / scale:.2g} "
                        "accepts this difference)")
            raise EdgesparseError(f"verification failed: max abs error {v['max_abs_error']:.3g} exceeds tolerance "
                                  f"{v['tolerance']:.3g}{hint}")
        ctx.log(f"comparing the package with the original on {len(held_out)} {held_out_kind} batches")
        manifest["quality"] = quality.compare(baseline, lambda b: run_package(b).outputs,
                                              [o["name"] for o in manifest["outputs"]], evaluate)
        manifest["quality"]["budget"] = quality.check_budget(manifest["quality"], budget)  # a miss raises
        manifest["warnings"] = ctx.warnings
        manifest = package.finalize(staging, manifest)
        package.publish(staging, out, request.force)
    return manifest


def _runner(target, staging: Path, threads: int, keep: list[dict]):
    """target.run_package on the staged package. The runs of the `keep` batches are kept, so that
    verification and a quality comparison on calibration batches run them once (a run can be a
    browser or an emulator)."""
    kept = {id(b): None for b in keep}  # `keep` outlives the build: its ids stay unique

    def run(batch: dict):
        if id(batch) not in kept:
            return target.run_package(staging, batch, threads)
        if kept[id(batch)] is None:
            kept[id(batch)] = target.run_package(staging, batch, threads)
        return kept[id(batch)]
    return run


def _verify(run_package, staging: Path, model, libraries, calibration: list[dict], input_kind: str,
            request: BuildRequest, ctx, node_libraries: list[Path] | None = None) -> dict:
    """Run the package where it runs against the reference (the dense equivalent; nodes whose
    kernel approximates on purpose computed by their library's reference implementation), and
    count the sparse nodes that really ran on a sparse kernel.

    Approximating nodes decide (skip or compute) by comparing with thresholds; a decision that
    rounds differently in the kernel and in its reference changes that node's output, and every
    later layer then sees different inputs. So when such a model misses the tolerance end to end
    and its kernels run here (node_libraries), each approximating node is checked on its own:
    its kernel on the inputs the reference run gave it, against the reference's output
    (verify.node_agreement). The package passes when every node agrees within the tolerance; the
    end-to-end difference is recorded, and a warning names it."""
    batches = calibration[:VERIFY_BATCHES]
    ctx.log(f"verifying on {len(batches)} input batches")
    runs = [run_package(b) for b in batches]
    reference, kind, staged_values = verify.verification_reference(model, libraries, batches)
    if kind != "dense":
        ctx.log("the reference runs the approximating nodes with their library's reference implementation")
    error = verify.max_abs_error([r.outputs for r in runs], reference)
    scale = max((float(np.abs(o).max()) for batch in reference for o in batch if o.size), default=1.0)
    tolerance = request.tolerance * max(1.0, scale)
    cover = verify.coverage(verify.sparse_nodes(model, libraries), runs[0].kernel_nodes, libraries)
    if cover["fraction_on_sparse_kernels"] is not None and cover["fraction_on_sparse_kernels"] < 1:
        ctx.warn(f"only {cover['sparse_nodes_on_kernel']}/{cover['sparse_nodes']} sparse nodes run on a sparse kernel: the rest run dense")
    if "not_verified" in runs[0].details:
        ctx.warn(f"not verified here: {runs[0].details['not_verified']}")
    _save_verification_data(staging, batches[0], reference[0], model)
    result = {
        "max_abs_error": error,
        "tolerance": tolerance,
        "passed": error <= tolerance,
        "reference": kind,
        "criterion": "end to end",
        "batches": len(batches),
        "inputs": input_kind,
        "calibration_batches": len(calibration),
        **cover,
        **runs[0].details,
    }
    if not result["passed"] and kind == "op reference" and node_libraries is not None:
        ctx.log(f"end to end {error:.3g} > {tolerance:.3g}: checking each approximating node on its reference inputs")
        with ctx.target.kernel_code():  # the code the package's devices run, as run_package ran it
            nodes = verify.node_agreement(model, libraries, batches[0], [str(f) for f in node_libraries],
                                          request.tolerance, request.threads, values=staged_values)
        worst = min(nodes, key=lambda r: (r["agrees"], r["rows_within"], -r.get("of_approximation", 0.0)))
        agree = all(r["agrees"] for r in nodes)
        result["per_node"] = {"nodes": len(nodes), "agree": agree, "tolerance": request.tolerance,
                              "rows_within": verify.ROWS_WITHIN,
                              "of_approximation": verify.OF_APPROXIMATION, "worst": worst}
        if agree:
            result.update(passed=True, criterion="per node (teacher-forced), end to end recorded")
            ctx.warn(f"verified node by node: every approximating node matches its reference on the same inputs "
                     f"(worst {worst['node']}: {100 * worst['rows_within']:.2f}% of rows within the tolerance, the "
                     f"rest {100 * worst.get('of_approximation', 0.0):.2f}% of what the approximation changes); end "
                     f"to end the package differs by {error:.3g} because threshold decisions that round differently "
                     f"compound over later layers (quality below says what the approximation costs)")
    return result


def _dense_original(model: onnx.ModelProto, registry) -> onnx.ModelProto:
    """The original as plain ONNX: a model that already holds sparse nodes runs their dense meaning."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return verify.dense_equivalent(copy, _attach_functions(copy, registry))


def _save_verification_data(staging: Path, batch: dict, outputs: list, model) -> None:
    """One input batch and its reference outputs travel with the package for `edgesparse verify`."""
    names = [o["name"] for o in inputs.signature(model, "output")]
    arrays = {f"input:{k}": v for k, v in batch.items()} | {f"output:{n}": o for n, o in zip(names, outputs)}
    np.savez_compressed(staging / VERIFICATION_DATA, **arrays)


def _backend_for(registry, target, name):
    name = name or target.backends[0]
    if name not in target.backends:
        raise EdgesparseError(f"target '{target.name}' cannot use backend '{name}' (supports: {', '.join(target.backends)})")
    return registry.get("backends", name)


def _calibration(request: BuildRequest, source: TorchModel | None, model) -> tuple[list[dict], str]:
    """Input batches for calibration and verification, and where they came from."""
    if request.input_shapes and (model is None or request.inputs is not None):
        raise EdgesparseError("--input-shape is for ONNX models without --inputs (it shapes generated inputs)")
    if request.inputs is not None:
        if model is None:
            raise EdgesparseError("--inputs is for ONNX models; a model factory provides calibration=")
        return inputs.from_npz(request.inputs, model), "file"
    if source is not None and source.calibration is not None:
        batches = []
        for batch in source.calibration():
            batches.append(inputs.to_numpy(batch))
            if len(batches) == request.calibration_batches:
                break
        if not batches:
            raise EdgesparseError("the model factory's calibration() yielded no batches")
        return batches, "calibration"
    if source is not None:
        return [inputs.to_numpy(source.example_inputs)], "example"
    return inputs.generated(model, shapes=request.input_shapes), "generated"


def _attach_functions(model: onnx.ModelProto, registry) -> list:
    """Give every custom domain the model uses its dense ONNX functions and an opset import."""
    used = {n.domain for n in model.graph.node}
    libraries = [lib for lib in registry.kernels.values() if lib.domain in used]
    known = {(f.domain, f.name) for f in model.functions}
    for lib in libraries:
        for function in lib.functions(model.opset_import):
            if (function.domain, function.name) not in known:
                model.functions.append(function)
        if all(o.domain != lib.domain for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(lib.domain, 1))
    unknown = {d for d in used if d not in ("", "ai.onnx", "com.microsoft") and d not in {l.domain for l in libraries}}
    if unknown:
        raise EdgesparseError(f"the graph uses op domain '{sorted(unknown)[0]}' that no installed kernel library provides")
    return libraries


def _layers(model: onnx.ModelProto, libraries, target, threads: int) -> list[dict]:
    """Sparsity actually present in the packaged weights, per sparse node, and the dispatch table
    whose measurements decided the layer's kind."""
    by_domain = {lib.domain: lib for lib in libraries}
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes = verify.value_shapes(model)
    table = target.dispatch_table()
    layers = []
    for node in model.graph.node:
        lib = by_domain.get(node.domain)
        if lib is not None:
            origin = {p.key.removeprefix("edgesparse."): p.value for p in node.metadata_props if p.key.startswith("edgesparse.")}
            layer = {"node": node.name, "op": node.op_type, **_jsonable(lib.describe(node, arrays, shapes)), **origin}
            decided = table.source_for(node.op_type.removesuffix("Add"), layer.get("block"), threads)
            if decided:
                layer["dispatch_table"] = decided
            layers.append(layer)
    return layers


def _tool_versions(target) -> dict:
    import onnxruntime

    versions = {
        "edgesparse": __version__,
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    return versions


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
