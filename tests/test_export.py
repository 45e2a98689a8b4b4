"""dlopt export on small models built in code: dynamic axes, verification that blocks, reports, bad input."""

import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from dlopt.api import export_model  # noqa: E402
from dlopt.cli import main  # noqa: E402
from dlopt.errors import InputError, VerificationError  # noqa: E402
from dlopt.optimize.export import Export, compare_outputs, export  # noqa: E402
from dlopt.sources import ModelSource, load_source  # noqa: E402


class TokenModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1).float()
        return self.proj(hidden).sum(1), hidden


class ImageModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, image):
        return self.fc(torch.relu(self.conv(image)).mean((2, 3)))


class ConstantBatchModel(torch.nn.Module):
    """Reshapes to the example's batch size: exports, but is wrong for any other batch."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x).reshape(2, 2)


def token_source():
    torch.manual_seed(0)
    return ModelSource(name="token", module=TokenModel().eval(),
                       example_inputs={"input_ids": torch.randint(0, 50, (2, 9)),
                                       "attention_mask": torch.ones(2, 9, dtype=torch.int64)},
                       output_names=("pooled", "hidden"))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_token_model_exports_with_dynamic_batch_and_sequence(exporter):
    result = export(token_source(), Export(exporter=exporter, fallback=False))
    model = result.model
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    assert [o.name for o in model.graph.output] == ["pooled", "hidden"]
    report = result.report
    assert report["exporter"] == exporter and report["verification"]["passed"]
    cases = {d["case"] for d in report["verification"]["diffs"]}
    assert cases == {"example", "b1 s7", "b3 s33"}
    assert all(d["max_abs_diff"] < 1e-4 for d in report["verification"]["diffs"])
    # and it really runs at other shapes in ONNX Runtime
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 16), (8, 128)]:
        feeds = {"input_ids": np.random.default_rng(0).integers(0, 50, (batch, seq)),
                 "attention_mask": np.ones((batch, seq), np.int64)}
        pooled, hidden = session.run(None, feeds)
        assert pooled.shape == (batch, 4) and hidden.shape == (batch, seq, 16)


def test_static_shapes_fix_every_axis():
    result = export(token_source(), Export(dynamic_shapes=False, exporter="torchscript"))
    dims = [d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 9]
    assert {d["case"] for d in result.report["verification"]["diffs"]} == {"example"}


def test_a_baked_in_batch_fails_verification_and_writes_nothing(tmp_path):
    source = ModelSource(name="const", module=ConstantBatchModel().eval(), example_inputs={"x": torch.randn(2, 8)})
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError):
        export_model(source, out, Export(exporter="torchscript", fallback=False))
    assert list(tmp_path.iterdir()) == []


def test_allow_mismatch_writes_the_model_and_a_failing_report(tmp_path):
    class Drifting(torch.nn.Module):  # differs between torch and ONNX: the eager path adds noise
        def forward(self, x):
            if torch.onnx.is_in_onnx_export():
                return x * 2
            return x * 2 + 0.5

    source = ModelSource(name="drift", module=Drifting(), example_inputs={"x": torch.randn(2, 3)})
    out = tmp_path / "m.onnx"
    written = export_model(source, out, Export(exporter="torchscript", fallback=False, allow_mismatch=True))
    assert out.exists() and written.report_path.exists()
    report = json.loads(written.report_path.read_text())
    assert report["verification"]["passed"] is False
    assert all(abs(d["max_abs_diff"] - 0.5) < 1e-6 for d in report["verification"]["diffs"])


def test_report_beside_the_model(tmp_path):
    out = tmp_path / "tok.onnx"
    written = export_model(token_source(), out, Export(exporter="torchscript"))
    report = json.loads((tmp_path / "tok.export.json").read_text())
    assert report["source"] == "token" and report["opset"] == 18 and report["exporter"] == "torchscript"
    assert report["bytes"] == out.stat().st_size
    assert {"onnx", "onnxruntime", "torch"} <= set(report["environment"]["packages"])
    onnx.checker.check_model(onnx.load(str(out)))
    assert written.model_path == out


def test_compare_outputs_flags_nan_shape_and_tolerance():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    ok, = compare_outputs("c", ["y"], [a], [a + 1e-6], atol=1e-4, rtol=1e-3)
    assert ok.passed and ok.max_abs_diff == pytest.approx(1e-6, rel=0.1)
    bad, = compare_outputs("c", ["y"], [a], [a + 0.01], atol=1e-4, rtol=1e-3)
    assert not bad.passed and bad.max_rel_diff == pytest.approx(0.01, rel=0.01)
    nan, = compare_outputs("c", ["y"], [a], [np.array([1.0, np.nan, 3.0], np.float32)], atol=1e-4, rtol=1e-3)
    assert not nan.passed
    shape, = compare_outputs("c", ["y"], [a], [a[:2]], atol=1e-4, rtol=1e-3)
    assert not shape.passed


FACTORY = textwrap.dedent('''
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, features):
            return self.fc(features)

    def build():
        torch.manual_seed(0)
        return Net().eval(), (torch.randn(1, 6),)

    def with_options():
        torch.manual_seed(0)
        return Net().eval(), {"features": torch.randn(4, 6)}, {"output_names": ["scores"], "atol": 1e-5}

    def raises():
        raise RuntimeError("weights missing")

    def wrong_type():
        return "not a model", {}

    def sequential_with_a_dict():
        return torch.nn.Sequential(torch.nn.Linear(6, 3)), {"x": torch.randn(2, 6)}

    def wrong_width():
        return Net().eval(), (torch.randn(1, 7),)

    not_callable = 3
''')


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text(FACTORY)
    return path


def test_factory_file_with_positional_inputs_is_named_from_forward(factory_file):
    source = load_source(f"{factory_file}:build")
    assert list(source.example_inputs) == ["features"]
    result = export(source, Export())
    assert [i.name for i in result.model.graph.input] == ["features"]
    assert result.report["verification"]["passed"]


def test_factory_options_name_outputs_and_set_tolerance(factory_file):
    source = load_source(f"{factory_file}:with_options")
    assert source.output_names == ("scores",) and source.atol == 1e-5


@pytest.mark.parametrize("args, message", [
    (["{dir}/missing.py:build"], "factory file .*missing.py does not exist"),
    (["{factory}:nothere"], "has no attribute 'nothere'"),
    (["{factory}:raises"], "raised RuntimeError: weights missing"),
    (["{factory}:wrong_type"], "returned str where a torch.nn.Module was expected"),
    (["{factory}:not_callable"], "is not callable"),
    (["{factory}:sequential_with_a_dict"],
     r"Sequential.forward\(input\) cannot take the example inputs \['x'\] as keyword arguments"),
    (["{factory}:wrong_width"], r"Net.forward failed on the factory's example inputs \(RuntimeError: mat1"),
    (["no_such_pkg_xyz.mod:build"], "factory module 'no_such_pkg_xyz.mod' cannot be imported"),
    (["resnet9000"], "unknown model 'resnet9000'"),
    (["{factory}:build", "--opset", "3"], "opset 3 is out of range"),
])
def test_bad_sources_exit_2_with_one_line_and_no_output(tmp_path, factory_file, args, message):
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    args = [a.format(dir=tmp_path, factory=factory_file) for a in args]
    result = CliRunner().invoke(main, ["export", *args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    import re
    assert re.search(message, result.output), result.output
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("make_output, message", [
    (lambda tmp: tmp / "no_dir" / "m.onnx", "does not exist"),
    (lambda tmp: tmp / "factory.py" / "m.onnx", "is not a directory"),
])
def test_unwritable_outputs_exit_2(tmp_path, factory_file, make_output, message):
    result = CliRunner().invoke(main, ["export", f"{factory_file}:build", "-o", str(make_output(tmp_path))])
    assert result.exit_code == 2 and message in result.output, result.output


def test_debug_shows_the_traceback(factory_file, tmp_path):
    result = CliRunner().invoke(main, ["--debug", "export", f"{factory_file}:raises", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "Traceback" in result.output


def test_cli_export_prints_the_diff_table(factory_file, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", f"{factory_file}:build", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output and "pass" in result.output and "FAIL" not in result.output
    assert out.exists()


def test_output_named_like_an_internal_value_keeps_the_dynamo_exporter():
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(30, 8)

        def forward(self, input_ids):
            return torch.nn.functional.normalize(self.embedding(input_ids).mean(1), dim=-1)

    torch.manual_seed(0)
    source = ModelSource(name="enc", module=Encoder().eval(),
                         example_inputs={"input_ids": torch.randint(0, 30, (2, 5))}, output_names=("embedding",))
    result = export(source, Export(exporter="dynamo", fallback=False))
    assert [o.name for o in result.model.graph.output] == ["embedding"]
    assert result.report["exporter"] == "dynamo" and result.report["verification"]["passed"]


def test_a_source_s_preferred_exporter_is_the_default_and_an_explicit_one_wins():
    class Scale(torch.nn.Module):
        def forward(self, x):
            return x * 2.0

    source = ModelSource(name="scale", module=Scale().eval(), example_inputs={"x": torch.randn(2, 3)},
                         exporter="torchscript")
    assert export(source, Export(fallback=False)).report["exporter"] == "torchscript"
    assert export(source, Export(exporter="dynamo", fallback=False)).report["exporter"] == "dynamo"
    plain = ModelSource(name="scale", module=Scale().eval(), example_inputs={"x": torch.randn(2, 3)})
    assert export(plain, Export(fallback=False)).report["exporter"] == "dynamo"


def test_a_factory_naming_an_unknown_exporter_is_a_usage_error(tmp_path):
    factory = tmp_path / "f.py"
    factory.write_text("import torch\n"
                       "def build():\n"
                       "    return torch.nn.Linear(3, 2), {'input': torch.randn(1, 3)}, {'exporter': 'tflite'}\n")
    with pytest.raises(InputError, match="exporter 'tflite'"):
        load_source(f"{factory}:build")
