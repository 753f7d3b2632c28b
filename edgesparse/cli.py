"""The `edgesparse` command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import EdgesparseError


class Cli(click.Group):
    """Turns every failure into one line on stderr and a non-zero exit; --debug shows tracebacks.
    Plugins add subcommands through the `register_commands` hook, loaded only when they run."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            if isinstance(exc, EdgesparseError):
                message = str(exc)
            else:
                message = f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
            click.echo(f"error: {message}".splitlines()[0], err=True)
            sys.exit(1)

    def list_commands(self, ctx):
        from .plugins import registry

        return sorted(set(super().list_commands(ctx)) | set(registry().commands))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        from .plugins import registry

        spec = registry().commands.get(name)
        return None if spec is None else _PluginCommand(spec)


class _PluginCommand(click.Command):
    """A plugin's subcommand: listed from its registration, imported only when it runs."""

    def __init__(self, spec):
        super().__init__(spec.name, help=spec.help, short_help=spec.help)
        self.spec = spec

    def make_context(self, info_name, args, parent=None, **extra):
        return self.spec.load().make_context(info_name, args, parent=parent, **extra)


@click.group(cls=Cli)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="edgesparse")
def main(debug):
    """edgesparse: prune, compile and package sparse models for edge targets, with the speed-up
    measured against dense."""


def _emit(data, as_json: bool, text: str):
    click.echo(json.dumps(data, indent=2) if as_json else text)


@main.command()
@click.argument("model", required=False)
@click.option("--target", "-t", metavar="NAME[:key=value,...]", help="Target, with options (see `edgesparse targets`).")
@click.option("--pass", "-p", "pass_specs", multiple=True, metavar="NAME[:key=value,...]", help="A pass to run; repeat for more.")
@click.option("--recipe", type=click.Path(path_type=Path), help="TOML file holding any of these options.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Package folder to write (a .zip is written beside it).")
@click.option("--backend", help="Compile backend (default: the target's first).")
@click.option("--tolerance", type=float, help="Max abs error vs the reference, relative to max(1, |reference|). Default 1e-4.")
@click.option("--threads", type=int, help="Threads for verification. Default 1.")
@click.option("--inputs", type=click.Path(path_type=Path), help=".npz of real inputs for an ONNX model.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=d0,d1,...",
              help="Shape of generated inputs for an ONNX model with dynamic dims; repeat per input.")
@click.option("--calibration-batches", type=int, help="Batches taken from the model factory's calibration(). Default 8.")
@click.option("--calibration-text", type=click.Path(path_type=Path),
              help="hf: models: a text file whose token windows are the calibration batches.")
@click.option("--eval-inputs", type=click.Path(path_type=Path),
              help=".npz of held-out inputs for an ONNX model: the package is compared with the original on them.")
@click.option("--min-quality", "min_quality", multiple=True, metavar="METRIC=VALUE",
              help="Quality budget vs the original (repeatable): cosine, cosine_min, top1_agreement, rel_l2 (a maximum), "
                   "or a factory evaluate() metric NAME / NAME_drop. A build that misses it fails and writes nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def build(model, target, pass_specs, recipe, output, backend, tolerance, threads, inputs, input_shapes,
          calibration_batches, calibration_text, eval_inputs, min_quality, force, as_json):
    """Build MODEL (an .onnx file, path/to/model.py:factory, or hf:PATH for a Hugging Face causal LM
    folder or .gguf file) into a verified package."""
    from .pipeline import CALIBRATION_BATCHES, BuildRequest, build as run_build
    from .quality import parse_budget_flags, summary_line
    from .recipe import load_recipe, parse_input_shapes, parse_pass, parse_target

    settings = load_recipe(recipe) if recipe else {}
    flags = {"model": model, "target": target, "output": output, "backend": backend,
             "tolerance": tolerance, "threads": threads, "inputs": inputs, "calibration_batches": calibration_batches,
             "eval_inputs": eval_inputs, "calibration_text": calibration_text}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if pass_specs:
        settings["passes"] = [parse_pass(s) for s in pass_specs]
    settings["min_quality"] = parse_budget_flags(min_quality, settings.get("min_quality"))
    if input_shapes:
        settings["input_shapes"] = list(input_shapes)
    for required in ("model", "target", "output"):
        if not settings.get(required):
            raise EdgesparseError(f"build needs a {required} (argument, option or recipe key)")
    target_name, target_options = parse_target(settings["target"])
    request = BuildRequest(
        model=str(settings["model"]), target=target_name, target_options=target_options, output=Path(settings["output"]),
        passes=settings.get("passes", []), backend=settings.get("backend"),
        tolerance=float(settings.get("tolerance", 1e-4)), threads=int(settings.get("threads", 1)),
        inputs=Path(settings["inputs"]) if settings.get("inputs") else None,
        input_shapes=parse_input_shapes(settings.get("input_shapes", [])),
        calibration_text=Path(settings["calibration_text"]) if settings.get("calibration_text") else None,
        calibration_batches=int(settings.get("calibration_batches", CALIBRATION_BATCHES)), force=force,
        eval_inputs=Path(settings["eval_inputs"]) if settings.get("eval_inputs") else None,
        min_quality=settings["min_quality"],
        quiet=as_json, name=settings.get("name"),
    )
    manifest = run_build(request)
    if manifest is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    v = manifest["verification"]
    frac = v["fraction_on_sparse_kernels"]
    if "per_node" in v:  # end to end over the tolerance, every approximating node matching on its own inputs
        how = (f"verified node by node: {v['per_node']['nodes']} approximating nodes match their reference on the same "
               f"inputs (end to end {v['max_abs_error']:.2e}: threshold decisions flip and compound); ")
    else:
        how = f"verified: max abs error {v['max_abs_error']:.2e} <= {v['tolerance']:.1e}; "
    _emit(manifest, as_json, (
        f"package: {request.output} (archive {request.output}.zip)\n"
        + how + f"sparse nodes on sparse kernels: {v['sparse_nodes_on_kernel']}/{v['sparse_nodes']}"
        + ("" if frac is None else f" ({frac:.0%})") + "\n"
        + summary_line(manifest.get("quality"))
    ))


@main.command()
@click.argument("package")
@click.option("--threads", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option("--rounds", default=300, show_default=True,
              help="Interleaved rounds at most; each thread count also stops after 5 s. Sub-ms models need the hundreds.")
@click.option("--quick", is_flag=True, help="For `bench kernels`: a few shapes only.")
@click.option("--json", "as_json", is_flag=True)
def bench(package, threads, rounds, quick, as_json):
    """Time PACKAGE against its dense baseline, interleaved in one process.

    `edgesparse bench kernels` instead times each sparse operator against ORT's dense kernel."""
    thread_counts = tuple(int(t) for t in threads.split(",") if t)
    if package == "kernels":
        from .kernels.bench import run_kernel_benchmarks

        records = run_kernel_benchmarks(quick=quick, threads=thread_counts)
        lines = [f"{r['op']:<18} {_shape(r):<24} sparsity {r['sparsity']:.2f} threads {r['threads']}: "
                 f"speedup {r['speedup']:.2f}x" for r in records]
        _emit(records, as_json, "\n".join(lines))
        return
    from . import runtime
    from .plugins import registry

    pkg = runtime.load(package, check_target=False)
    target = _package_target(pkg)
    if target is None:
        raise EdgesparseError(f"target '{pkg.manifest['target']['name']}' of {package} is not installed")
    domains = set(pkg.manifest["runtime"].get("custom_domains", []))
    libraries = [lib for lib in registry().kernels.values() if lib.domain in domains]
    records = target.bench(pkg.root, _verification_inputs(pkg), libraries, threads=thread_counts, rounds=rounds)
    lines = [f"threads {r['threads']}: dense {r['dense']['median_ms']:.3f} ms "
             f"[{r['dense']['p25_ms']:.3f}-{r['dense']['p75_ms']:.3f}], package {r['package']['median_ms']:.3f} ms "
             f"[{r['package']['p25_ms']:.3f}-{r['package']['p75_ms']:.3f}], speedup {r['speedup']:.2f}x"
             for r in records]
    _emit(records, as_json, "\n".join(lines))


@main.command()
@click.option("--quick", is_flag=True, help="A few minutes: block 16, the common FFN and conv shapes, short timings.")
@click.option("--isa", help="Kernel code to measure (default: what the library runs here; avx2 on an AVX-512 machine "
              "measures the AVX2 code against ORT's AVX-512 dense kernel: a pessimistic table).")
@click.option("--threads", default=None, help="Comma-separated thread counts. Default 1 (--quick) or 1,2.")
@click.option("--import", "import_file", type=click.Path(path_type=Path), help="Take in a table measured elsewhere.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the table here instead of the user cache.")
@click.option("--merge", is_flag=True, help="With --out: keep the entries of that file this run does not measure.")
def tune(quick, isa, threads, import_file, out, merge):
    """Measure this machine's dispatch table (sparse kernels vs ORT's dense ones), or --import one.

    Builds for this machine then use it ahead of the shipped table; `edgesparse inspect` names the
    table that decided each layer."""
    from .kernels import dispatch, tune as tuning

    if import_file is not None:
        path = tuning.import_table(import_file)
        click.echo(f"imported: {path} (used by builds for {json.loads(path.read_text())['isa']})")
        return
    isa = isa or dispatch.current_isa()
    counts = [int(t) for t in (threads or ("1" if quick else "1,2")).split(",") if t]
    if not counts or min(counts) < 1:
        raise EdgesparseError(f"--threads needs positive thread counts (got {threads!r})")
    path = tuning.tune(isa, counts, quick, progress=lambda line: click.echo(line, err=True), out=out, merge=merge)
    click.echo(f"tuned: {path} ({isa}, {dispatch.host_cpu()})")


def _package_target(pkg):
    """The installed target a package was built for, with the options it was built with (an x86
    package built for avx2 runs its AVX2 code), or None when that target is not installed."""
    from .plugins import registry

    recorded = pkg.manifest["target"]
    target = registry().targets.get(recorded["name"])
    if target is None:
        return None
    known = {o.name for o in target.options}
    return target.configure({k: v for k, v in recorded.get("config", {}).items() if k in known})


def _shape(record) -> str:
    keys = [k for k in ("M", "K", "N", "C", "H", "W", "O", "kernel") if k in record]
    return " ".join(f"{k}={record[k]}" for k in keys)


def _verification_inputs(pkg) -> dict:
    import numpy as np

    from .pipeline import VERIFICATION_DATA

    data = np.load(pkg.root / VERIFICATION_DATA)
    return {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}


@main.command()
@click.argument("package")
@click.option("--json", "as_json", is_flag=True)
def inspect(package, as_json):
    """Show what PACKAGE holds: target, passes, per-layer sparsity, verification, quality."""
    from . import runtime
    from .quality import summary_line

    m = runtime.load(package, check_target=False).manifest
    v = m.get("verification", {})
    lines = [
        f"{m['name']}: target {m['target']['name']} ({m['target'].get('machine')}), backend {m['backend']}",
        "passes: " + (", ".join(f"{p['name']}({', '.join(f'{k}={x}' for k, x in p['options'].items())})" for p in m["passes"]) or "none"),
        "inputs: " + ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in m["inputs"]),
        *([f"converted from opset {m['import']['converted']['from']} to {m['import']['converted']['to']}"]
          if "converted" in m.get("import", {}) else []),
        f"verification: max abs error {v.get('max_abs_error', float('nan')):.2e}, "
        f"sparse nodes on sparse kernels {v.get('sparse_nodes_on_kernel')}/{v.get('sparse_nodes')}",
        f"dispatch table: {_table_label(m['target'].get('dispatch_table'))}",
        summary_line(m.get("quality")),
        f"layers ({len(m['layers'])} sparse):",
    ] + [f"  {l['node']:<40} {l['op']:<20} {_layer_sparsity(l)}"
         + (f"  dispatch table: {l['dispatch_table']}" if l.get("dispatch_table") else "") for l in m["layers"]]
    _emit(m, as_json, "\n".join(lines))


def _layer_sparsity(layer: dict) -> str:
    """Weight sparsity, or for activation-sparse ops (dense weights) what decides at run time."""
    sparsity = layer.get("sparsity")
    if sparsity is None:
        return layer.get("note", "sparsity unknown")
    if not sparsity and layer.get("note", "").startswith("activation sparsity"):
        return f"weights dense; {layer['note']}"
    return f"sparsity {sparsity:.2f}"


def _table_label(table: dict | None) -> str:
    if not table:
        return "none recorded"
    where = ", ".join(x for x in (table.get("cpu"), (table.get("generated") or "")[:10]) if x)
    return f"{table['source']} ({where}; {table['entries']} entries) {table['path']}"


@main.command()
@click.argument("package")
def verify(package):
    """Check PACKAGE's checksums and format, run it where its target runs, and compare with the
    reference outputs recorded at build time."""
    import numpy as np

    from . import runtime
    from .pipeline import VERIFICATION_DATA
    from .plugins import registry

    pkg = runtime.load(package, check_target=False)
    target_name = pkg.manifest["target"]["name"]
    target = _package_target(pkg)
    data = np.load(pkg.root / VERIFICATION_DATA)
    batch = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
    expected = [data[k] for k in data.files if k.startswith("output:")]
    if target is not None:
        got = target.run_package(pkg.root, batch).outputs
    else:
        runtime.check_machine(pkg.manifest)
        got = pkg.run(batch)
    from .verify import max_abs_error

    error = max_abs_error([got], [expected])
    recorded = pkg.manifest["verification"]
    tolerance = recorded["tolerance"]
    if error > tolerance and "per_node" in recorded and target is not None and target.runs_here():
        import onnx

        from .verify import node_agreement

        model = onnx.load(str(pkg.root / pkg.manifest["runtime"]["model"]))
        files = [str(pkg.root / f) for f in pkg.manifest["runtime"]["custom_op_libraries"]]
        rows = node_agreement(model, list(registry().kernels.values()), batch, files, recorded["per_node"]["tolerance"])
        bad = [r for r in rows if not r["agrees"]]
        if bad:
            raise EdgesparseError(f"{package}: node {bad[0]['node']} differs from its reference on the same inputs "
                                  f"({100 * bad[0]['rows_within']:.2f}% of rows within the tolerance)")
        click.echo(f"ok: {package} (target {target_name}); verified node by node: {len(rows)} approximating nodes match "
                   f"their reference on the same inputs (end to end {error:.2e}, as at build time {recorded['max_abs_error']:.2e})")
        return
    if error > tolerance:
        raise EdgesparseError(f"{package}: max abs error {error:.3g} exceeds tolerance {tolerance:.3g}")
    click.echo(f"ok: {package} (target {target_name}); max abs error {error:.2e} <= {tolerance:.1e}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json):
    """List installed plugins, their versions and what each registered."""
    from .plugins import registry

    infos = registry().plugins
    data = [{"name": p.name, "version": p.version, "registered": p.registered, "error": p.error} for p in infos]
    lines = [f"{p.name} {p.version}: " + (f"FAILED: {p.error}" if p.error else ", ".join(p.registered) or "nothing") for p in infos]
    _emit(data, as_json, "\n".join(lines) or "no plugins installed")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def passes(as_json):
    """List the available passes and their options."""
    from .plugins import registry

    described = [cls.describe() for cls in registry().passes.values()]
    lines = []
    for d in described:
        lines.append(f"{d['name']}: {d['summary']} [stages: {', '.join(d['stages'])}; needs: {d['needs']}]")
        lines += [f"    {o['name']} ({o['type']}, default {o['default']!r}): {o['help']}" for o in d["options"]]
    _emit(described, as_json, "\n".join(lines) or "no passes installed")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def targets(as_json):
    """List the available targets."""
    from .plugins import registry

    described = [t.describe() for t in registry().targets.values()]
    lines = []
    for d in described:
        lines.append(f"{d['name']}: {d['summary']} [backends: {', '.join(d['backends'])}]")
        lines += [f"    {o['name']} ({o['type']}, default {o['default']!r}): {o['help']}" for o in d["options"]]
    _emit(described, as_json, "\n".join(lines) or "no targets installed")
