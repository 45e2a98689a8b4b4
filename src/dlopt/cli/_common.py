"""Small helpers shared by the CLI verbs."""

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
