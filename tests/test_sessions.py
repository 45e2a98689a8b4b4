"""dlopt.sessions: a model whose declared output shape is wrong (rank 3 declared, rank 2 produced, as
exported OCR models do) runs through bench, package, verify and eval, with one note and no ONNX
Runtime warnings; the user's file is never changed."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main


def _misdeclared(path, inferable: bool):
    """y = x @ w, [N, 6], declared [N, 6, 1]. `inferable`: shape inference finds [N, 6] (ONNX Runtime
    merges leniently); else the rank hangs on a computed Squeeze axis that inference cannot know, so
    ONNX Runtime keeps the declaration and a reused output buffer fails ("Invalid rank for output")."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32), "w")
    if inferable:
        nodes, inits = [helper.make_node("MatMul", ["x", "w"], ["y"])], [w]
    else:
        two = numpy_helper.from_array(np.array([2], np.int64), "two")
        zero = numpy_helper.from_array(np.array([0.0], np.float32), "zero")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Unsqueeze", ["m", "two"], ["u"]),
                 helper.make_node("ReduceMin", ["x"], ["low"], keepdims=0), helper.make_node("Mul", ["low", "zero"], ["z"]),
                 helper.make_node("Cast", ["z"], ["zi"], to=TensorProto.INT64),
                 helper.make_node("Add", ["two", "zi"], ["axes"]), helper.make_node("Squeeze", ["u", "axes"], ["y"])]
        inits = [w, two, zero]
    graph = helper.make_graph(nodes, "misdeclared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_onnx_runtime_fails_the_uninferable_one_on_a_reused_output_buffer(tmp_path):
    """The failure being fixed, in ONNX Runtime itself (if a later version stops failing, this says so)."""
    session = ort.InferenceSession(str(_misdeclared(tmp_path / "m.onnx", inferable=False)),
                                   providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input("x", np.ones((1, 4), np.float32))
    binding.bind_output("y", "cpu")
    session.run_with_iobinding(binding)
    assert binding.copy_outputs_to_cpu()[0].shape == (1, 6)
    with pytest.raises(Exception, match="Invalid rank for output"):
        session.run_with_iobinding(binding)


@pytest.mark.parametrize("inferable", [True, False])
def test_bench_package_verify_and_eval_run_it_and_say_so_once(tmp_path, inferable):
    path = _misdeclared(tmp_path / "ocr.onnx", inferable)
    before = path.read_bytes()
    note = "ocr.onnx: output y declared [N, 6, 1], produces [1, 6]: declaration relaxed" if not inferable else \
        "ocr.onnx: output y declared [N, 6, 1], produces [N, 6]: declaration relaxed"
    runner = CliRunner()

    bench = runner.invoke(main, ["bench", str(path), "--rounds", "5", "--no-progress"])
    assert bench.exit_code == 0, bench.output
    assert bench.stderr.count(note) == 1 and "Invalid rank" not in bench.output
    assert "[W:onnxruntime" not in bench.stderr and "MergeShapeInfo" not in bench.stderr  # no ORT warnings

    bundle = tmp_path / "ocr.bundle"
    package = runner.invoke(main, ["package", str(path), "-o", str(bundle)])
    assert package.exit_code == 0, package.output
    assert package.stderr.count(note) == 1 and "VerifyOutputSizes" not in package.stderr
    verify = runner.invoke(main, ["verify", str(bundle)])
    assert verify.exit_code == 0, verify.output

    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32))
    evaluated = runner.invoke(main, ["eval", str(path), "--data", str(tmp_path / "x.npz"), "--reference", str(path),
                                     "--metric", "sqnr"])
    assert evaluated.exit_code == 0, evaluated.output
    assert path.read_bytes() == before  # the user's file is never changed


def test_relaxing_keeps_right_declarations_and_the_element_type(tmp_path):
    from dlopt.sessions import relax_declared_outputs

    wrong = onnx.load(_misdeclared(tmp_path / "w.onnx", inferable=False))
    (relaxed,) = relax_declared_outputs(wrong)
    assert (relaxed.name, relaxed.declared, relaxed.inferred) == ("y", "[N, 6, 1]", None)
    assert not wrong.graph.output[0].type.tensor_type.HasField("shape")
    assert wrong.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    right = onnx.load(_misdeclared(tmp_path / "r.onnx", inferable=True))
    right.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6]))
    assert relax_declared_outputs(right) == [] and len(right.graph.output[0].type.tensor_type.shape.dim) == 2
