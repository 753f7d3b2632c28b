"""The two models of a from-scratch run (train_scratch.py) as edgesparse model factories, so that
their packages can be compared on ORT (same inputs and outputs: input_ids and per-layer caches):

    BLOCKFFN_SCRATCH_RUN=<run> edgesparse build samples/blockffn/scratch_model.py:build_blockffn \\
        --target x86 --pass blockffn:chunk=1 -o out/scratch-blockffn
    BLOCKFFN_SCRATCH_RUN=<run> edgesparse build samples/blockffn/scratch_model.py:build_dense \\
        --target x86 -o out/scratch-dense

Both calibrate on the same training text windows (the held-out articles stay out of the build);
<run> defaults to the cache folder train_scratch.py uses."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

WINDOWS, TOKENS = 4, 64


def _run() -> Path:
    env = os.environ.get("BLOCKFFN_SCRATCH_RUN")
    if env:
        return Path(env)
    import blockffn_common

    return blockffn_common.state_dir() / "scratch"


def _finished(run: Path, kind: str) -> Path:
    from edgesparse import EdgesparseError

    if not (run / kind / "result.json").exists():
        raise EdgesparseError(f"no finished {kind} model in {run}: run samples/blockffn/train_scratch.py first")
    return run / kind


def _calibration(run: Path) -> list[np.ndarray]:
    ids = np.load(run / "data.npz")["train"]
    return [ids[i * TOKENS:(i + 1) * TOKENS] for i in range(WINDOWS)]


def build_blockffn():
    from edgesparse_blockffn import checkpoint_factory

    run = _run()
    return checkpoint_factory(_finished(run, "blockffn") / "checkpoint", calibration=_calibration(run))


def build_dense():
    """The dense twin in the same deployable form (same cache inputs and outputs)."""
    import torch

    import scratch_recipe as recipe
    from edgesparse_blockffn import factory

    run = _run()
    folder = _finished(run, "dense")
    state = torch.load(folder / "state.pt", weights_only=False)
    model = recipe.make_model("dense", recipe.config(state["recipe"], int(np.load(run / "data.npz")["vocab"])), 0)
    model.load_state_dict(state["model"])
    return factory.torch_model(model.eval(), _calibration(run), "given")
