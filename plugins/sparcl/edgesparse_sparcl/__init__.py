"""edgesparse-sparcl: sparse continual learning (SparCL) for edgesparse.

- `ContinualTrainer` / `ContinualConfig` (trainer.py): DER++ with SparCL's task-aware dynamic
  masking, dynamic data removal and dynamic gradient masking, each switchable; block-sparse layers
  train on C++ kernels (sparse.py, csrc/sparcl_train.cpp) forward and backward.
- `edgesparse continual` (cli.py; also installed as `edgesparse-continual`): the command line, with
  checkpoints after every task and resume.
- the `sparcl` pass (rewrite.py): turns layers that are already block-sparse into edgesparse's
  BlockSparseConv / BlockSparseMatMul, keeping the learned masks.
- `export_update_step` (ondevice.py): an ONNX update step with the masks for learning on the device.
"""
from edgesparse import Command, hookimpl

__version__ = "0.1.0"

# torch is imported on first use of the Python API, not when edgesparse loads its plugins.
_LAZY = {"TaskStream": "data", "split_fashion_mnist": "data", "ContinualConfig": "trainer",
         "ContinualTrainer": "trainer", "Schedule": "trainer"}


@hookimpl
def register_passes(register):
    from .rewrite import Sparcl

    register(Sparcl)


@hookimpl
def register_commands(register):
    register(Command("continual", "edgesparse_sparcl.cli:main",
                     "Sparse continual learning (SparCL on DER++): train, show, update-step."))


def __getattr__(name):  # heavy parts on demand
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in ("train_run", "load_run", "read_results"):
        from . import runs

        return getattr(runs, name)
    if name == "export_update_step":
        from .ondevice import export_update_step

        return export_update_step
    raise AttributeError(name)


__all__ = ["ContinualConfig", "ContinualTrainer", "Schedule", "TaskStream", "split_fashion_mnist", "train_run",
           "load_run", "read_results", "export_update_step", "__version__"]
