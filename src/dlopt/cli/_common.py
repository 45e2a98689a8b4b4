"""Small helpers shared by the CLI verbs."""

import functools
from dataclasses import dataclass
from typing import Any

import click


def echo_err(message: str) -> None:
    """Progress and diagnostics go to stderr so that stdout stays the result."""
    click.echo(message, err=True)


def cache_dir_option(command):
    """--cache-dir: the stage cache of `dlopt run` and `dlopt cache`."""
    return click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                        help="Stage cache folder [default: $DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages].")(command)


def input_shape_option(command):
    """--input-shape NAME=DxD... (repeatable): every verb that makes inputs takes it (dlopt.inputs)."""
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD...",
                        help="Shape of a generated input, e.g. x=1x3x640x640 (repeat per input); fixes its free "
                             "dimensions. Without it, free sizes are chosen that the model runs on.")(command)


DATA_SOURCES_HELP = ("an .npz (arrays named by input, samples on axis 0 or as --input-layout says), a folder of "
                     ".npz/.npy files or of images (see --image-*), a Python reader file.py:function or "
                     "package.module:function (yields {input: array} dicts, one feed each), or model:NAME")


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

        found = []
        for index, source in enumerate(sources):
            if source is None and (self.spec_file is None or index > 0):
                found.append(None)
                continue
            spec = data_spec(source, spec_file=self.spec_file, layout=self.layout, values=self.values,
                             image=self.image)
            found.append(spec if spec.source is not None else None)
        if all(spec is None for spec in found) and (self.layout or self.values or self.image or self.spec_file):
            raise InputError("data options (--data-spec, --input-layout, --input-value, --image-*) were given, "
                             "and no data they describe", "give the data (its source), or drop those options")
        return tuple(found)


_IMAGE_OPTIONS = ("image_size", "image_layout", "image_resize", "image_pad", "image_interpolation", "image_scale",
                  "image_mean", "image_std", "image_bgr")


def data_options(command):
    """The data options every verb that reads data shares (dlopt.data; docs/data.md). The command gets
    them as one argument, `declared` (a DeclaredData); `declared.specs(SOURCE, ...)` are the DataSpecs."""
    options = [
        click.option("--data-spec", "data_spec_file", default=None, metavar="FILE",
                     help="Data spec file (TOML: source, [layout], [values], [image]; or a quantize report / "
                          "bundle manifest that recorded one). The options below override its keys."),
        click.option("--input-layout", "input_layouts", multiple=True, metavar="NAME=AXIS",
                     help="Data: the input's samples lie on AXIS of its arrays (e.g. state=1 for a [2, N, 128] "
                          "state); default 0. Repeatable."),
        click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE",
                     help="Data: a constant fed to every sample in the model's dtype and rank (e.g. rate=16000; "
                          "1,2,3 for a vector), also for inputs the data does not hold. Repeatable."),
        click.option("--image-size", default=None, metavar="HxW",
                     help="Images: the size fed [default: the model's fixed input size]."),
        click.option("--image-layout", default=None, help="Images: auto (from the model's input shape) | nchw | nhwc "
                                                          "[default: auto]."),
        click.option("--image-resize", default=None,
                     help="Images: stretch (aspect not kept) | letterbox (keep aspect, pad; YOLO-style, centred) | "
                          "center-crop (shorter side fits, centre kept) [default: stretch]."),
        click.option("--image-pad", default=None, metavar="PIXEL",
                     help="Images, letterbox: the pad value, a pixel value 0..255 before scaling [default: 114]."),
        click.option("--image-interpolation", default=None,
                     help="Images: bilinear | nearest | bicubic | area | lanczos [default: bilinear]."),
        click.option("--image-scale", default=None, help="Images: pixel (0..255) multiplier [default: 1/255]."),
        click.option("--image-mean", default=None,
                     help="Images: subtracted after scaling, one value or one per channel (e.g. 0.5,0.5,0.5) "
                          "[default: 0]."),
        click.option("--image-std", default=None,
                     help="Images: divisor after the mean, one value or one per channel [default: 1]."),
        click.option("--image-bgr/--image-rgb", default=None,
                     help="Images: channels in BGR order (OpenCV-trained models) [default: RGB]."),
    ]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        image = {name[len("image_"):]: kwargs.pop(name) for name in _IMAGE_OPTIONS}
        kwargs["declared"] = DeclaredData(spec_file=kwargs.pop("data_spec_file"),
                                          layout=tuple(kwargs.pop("input_layouts")),
                                          values=tuple(kwargs.pop("input_values")),
                                          image={k: v for k, v in image.items() if v is not None})
        return command(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
