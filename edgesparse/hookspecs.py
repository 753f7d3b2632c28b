"""The hooks a plugin implements. Each hook receives a `register` callback and calls it once per
object it contributes; a plugin implements only the hooks it needs.

    from edgesparse import hookimpl

    @hookimpl
    def register_passes(register):
        register(MyPass)
"""
import pluggy

hookspec = pluggy.HookspecMarker("edgesparse")
hookimpl = pluggy.HookimplMarker("edgesparse")


@hookspec
def register_passes(register):
    """Register sparsity passes: `register(PassSubclass)`. The class's `name` is what users type
    after `--pass`."""


@hookspec
def register_targets(register):
    """Register deployment targets: `register(TargetInstance)`. The instance's `name` is what users
    type after `--target`."""


@hookspec
def register_backends(register):
    """Register compile backends: `register(BackendInstance)`. A target names the backends it can
    use; a backend turns the rewritten ONNX model into the files of a package."""


@hookspec
def register_commands(register):
    """Register `edgesparse` subcommands: `register(Command("name", "module:click_command", "help"))`.
    The module is imported only when the subcommand runs, so plugins keep every other command fast."""


@hookspec
def register_kernels(register):
    """Register kernel libraries: `register(KernelLibrary(...))`. A kernel library provides custom
    operators in one ONNX domain, builds itself for a target's toolchain and describes the
    sparsity held by each of its nodes."""
