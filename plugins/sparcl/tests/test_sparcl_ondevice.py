"""The on-device update step: an ONNX graph that trains with a stock ONNX Runtime."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgesparse import EdgesparseError
from edgesparse_sparcl import sparse
from edgesparse_sparcl.models import SmallResNet
from edgesparse_sparcl.ondevice import INFO_FILE, PARAMS_FILE, STEP_FILE, export_update_step


def test_update_step_learns_and_keeps_masks(tmp_path, fmnist_two_tasks):
    torch.manual_seed(0)
    model = SmallResNet(width=4)
    layer = sparse.PrunableLayer("layer2.conv2", model.layer2.conv2, "block", 4)
    layer.set_mask(torch.rand(layer.unit_shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    layer.apply_mask()
    mask = layer.weight_mask().clone()
    out = export_update_step(model, {"layer2.conv2.weight": mask}, tmp_path / "upd", batch=8, num_classes=10)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["checked_against_torch"]["max_abs_error"] < 1e-4
    session = ort.InferenceSession(str(out / STEP_FILE), providers=["CPUExecutionProvider"])
    params = dict(np.load(out / PARAMS_FILE))
    s = fmnist_two_tasks
    idx = s.task_indices(0, "train")[:8]
    bidx = s.task_indices(1, "train")[:8]
    feeds = {"x": s.x_train[idx].numpy(), "y": s.y_train[idx].numpy(), "buf_x": s.x_train[bidx].numpy(),
             "buf_y": s.y_train[bidx].numpy(), "buf_logits": np.zeros((8, 10), np.float32),
             "logit_bias": np.zeros(10, np.float32), "lr": np.array(0.1, np.float32), "alpha": np.array(0.1, np.float32),
             "beta": np.array(0.5, np.float32)}
    losses = []
    for _ in range(6):
        feeds.update({info["param_inputs"][n]: params[n] for n in info["params"]})
        loss, *new = session.run(None, feeds)
        losses.append(float(loss))
        params.update(zip(info["params"], new))
    assert losses[-1] < 0.8 * losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    w = params["layer2.conv2.weight"]
    assert np.all(w[~mask.numpy()] == 0) and np.count_nonzero(w) > 0
    assert not np.allclose(w, model.layer2.conv2.weight.detach().numpy())
    # batch norm's running statistics follow the batches, as in training
    assert "layer1.bn1.running_var" in info["running_statistics"]
    assert not np.allclose(params["layer1.bn1.running_mean"], model.layer1.bn1.running_mean.numpy())


def test_update_step_refuses_unknown_masks_and_existing_output(tmp_path):
    model = SmallResNet(width=4)
    with pytest.raises(EdgesparseError, match="mask for 'nope.weight'"):
        export_update_step(model, {"nope.weight": torch.ones(1)}, tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(EdgesparseError, match="exists"):
        export_update_step(model, {}, tmp_path / "b")
