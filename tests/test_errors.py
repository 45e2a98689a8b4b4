"""Error text: option placeholders spelled as keyword arguments for API users, as flags on the CLI."""


def test_option_placeholders_are_spelled_for_the_reader():
    """Library errors never name a CLI flag: API users read keyword arguments, CLI users read flags."""
    from dlopt.errors import InputError, render

    error = InputError("no data for {calibration=DATA}", "pass {calibration=DATA}, or set {allow_fallback}")
    assert str(error) == "no data for calibration=DATA (pass calibration=DATA, or set allow_fallback=True)"
    assert error.cli_text() == "no data for --calibration DATA (pass --calibration DATA, or set --allow-fallback)"
    # Braces that are not an option placeholder (a set of names, a shape) are left alone.
    assert render("inputs {'ids', 'mask'} and {batch x seq}", "cli") == "inputs {'ids', 'mask'} and {batch x seq}"


def test_cli_prints_flags_for_a_library_error(tmp_path):
    from click.testing import CliRunner

    from dlopt.cli import main

    missing = tmp_path / "absent.onnx"
    result = CliRunner().invoke(main, ["quantize", str(missing), "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 2
    assert "{" not in result.output and "=True" not in result.output
