"""Small helpers shared by the CLI verbs."""

import click


class Number(click.ParamType):
    """A numeric option, checked when it is parsed: a finite number (an integer with `integer`) within
    [minimum, maximum] (`above`: strictly above minimum). NaN, infinity, 400-digit values and values out
    of range are usage errors (exit 2), not a crash after the work. The check is the library's own
    (dlopt.api.check_number), so recipes and API calls are held to the same rules."""

    def __init__(self, *, minimum: float | None = None, maximum: float | None = None, above: bool = False,
                 integer: bool = False) -> None:
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
            check_number(number, "value",
                         minimum=self.minimum, maximum=self.maximum, above=self.above, integer=self.integer)
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
    return click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                        help="Stage cache folder [default: $DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages].")(command)


def input_shape_option(command):
    """--input-shape NAME=DxD... (repeatable): every verb that makes inputs takes it (dlopt.inputs)."""
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD...",
                        help="Shape of a generated input, e.g. x=1x3x640x640 (repeat per input); fixes its free "
                             "dimensions. Without it, free sizes are chosen that the model runs on.")(command)


def image_options(command):
    """How a folder of images becomes the model's input (dlopt.images.ImagePreprocess)."""
    options = [
        click.option("--image-size", default=None, metavar="HxW",
                     help="Images: resize to HEIGHTxWIDTH [default: the model's fixed input size]."),
        click.option("--image-layout", default="auto", show_default=True,
                     help="Images: auto (from the model's input shape) | nchw | nhwc."),
        click.option("--image-scale", default="1/255", show_default=True, help="Images: pixel (0..255) multiplier."),
        click.option("--image-mean", default="0", show_default=True,
                     help="Images: subtracted after scaling, one value or one per channel (e.g. 0.5,0.5,0.5)."),
        click.option("--image-std", default="1", show_default=True,
                     help="Images: divisor after the mean, one value or one per channel."),
        click.option("--image-bgr", is_flag=True, help="Images: channels in BGR order (OpenCV-trained models)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def image_preprocess(image_size, image_layout, image_scale, image_mean, image_std, image_bgr):
    """The ImagePreprocess the --image-* options declare."""
    from dlopt.api import ImagePreprocess

    return ImagePreprocess.from_text(size=image_size, layout=image_layout, scale=image_scale, mean=image_mean,
                                     std=image_std, bgr=image_bgr)
