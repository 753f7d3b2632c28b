"""Export: dynamic axes given for some inputs only must land on those inputs."""
import numpy as np
import onnxruntime as ort
import torch

from edgesparse import TorchModel
from edgesparse.export import export_torch


class Scaled(torch.nn.Module):
    def forward(self, scale, x):
        return x * scale.sum()


def test_dynamic_axes_of_a_later_input_only():
    model = TorchModel(Scaled(), {"scale": torch.ones(3), "x": torch.ones(2, 4)}, ["y"],
                       {"x": {0: "batch"}, "y": {0: "batch"}})
    exported = export_torch(model)
    shapes = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in exported.graph.input]
    assert shapes == [[3], ["batch", 4]]
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"scale": np.full(3, 2, np.float32), "x": np.ones((5, 4), np.float32)})[0]
    np.testing.assert_allclose(y, np.full((5, 4), 6.0))


class PerLayerCaches(torch.nn.Module):
    """forward(x, *caches): one cache input per layer, the form LLM exports take."""

    def forward(self, x, *caches):
        grown = [torch.cat([c, x], 1) for c in caches]
        return (x * 2, *grown)


def test_dynamic_axes_of_varargs_inputs():
    caches = {f"past.{i}": torch.ones(1, 3, 4) for i in range(3)}
    model = TorchModel(PerLayerCaches(), {"x": torch.ones(1, 2, 4), **caches}, ["y", *[f"present.{i}" for i in range(3)]],
                       {"x": {1: "sequence"}, **{n: {1: "past"} for n in caches}})
    exported = export_torch(model)
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in exported.graph.input}
    assert shapes == {"x": [1, "sequence", 4], **{n: [1, "past", 4] for n in caches}}
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.ones((1, 5, 4), np.float32), **{n: np.zeros((1, 7, 4), np.float32) for n in caches}})
    assert out[0].shape == (1, 5, 4) and all(o.shape == (1, 12, 4) for o in out[1:])
