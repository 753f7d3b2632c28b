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
