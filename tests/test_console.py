"""Long verbs tell a log that they are alive: `dlopt.console.heartbeat` writes a line at least every
HEARTBEAT_INTERVAL_S where stderr is not a terminal (quantize, optimize, run), naming the verb, the time
elapsed and the last step; on a terminal it adds nothing."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import dlopt.console
from dlopt.console import heartbeat

BEAT = re.compile(r"^dlopt quantize: still running, (\d+) s elapsed; last step: (.+)$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_heartbeat_lines_come_at_the_interval_with_the_last_step_when_not_a_terminal():
    lines: list[str] = []
    stamps: list[float] = []

    def log(message: str) -> None:
        lines.append(message)
        stamps.append(time.monotonic())

    with heartbeat("quantize", log, interval_s=0.05, stream=io.StringIO()) as forward:
        forward("calibrating (minmax)")
        time.sleep(1.0)
    beats = [line for line in lines if BEAT.match(line)]
    assert lines[0] == "calibrating (minmax)" and len(beats) >= 3, lines
    assert all(BEAT.match(b).group(2) == "calibrating (minmax)" for b in beats)
    # no line was ever further apart than the interval plus scheduling slack (generous: a loaded CI host may
    # stall a thread for a second); the elapsed time grows
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 2.0
    assert int(BEAT.match(beats[-1]).group(1)) >= int(BEAT.match(beats[0]).group(1))
    count = len(lines)
    time.sleep(0.2)
    assert len(lines) == count  # the thread stopped with the block


def test_heartbeat_is_quiet_while_lines_flow_and_on_a_terminal():
    busy: list[str] = []
    # lines every ~20 ms against a 3 s interval: no beat, even when a loaded host stretches the sleeps
    with heartbeat("quantize", busy.append, interval_s=3.0, stream=io.StringIO()) as forward:
        for k in range(50):
            forward(f"step {k}")
            time.sleep(0.02)
    assert busy == [f"step {k}" for k in range(50)]

    terminal: list[str] = []
    with heartbeat("quantize", terminal.append, interval_s=0.02, stream=_Terminal()) as forward:
        forward("calibrating")
        time.sleep(0.3)
    assert terminal == ["calibrating"]


def _linear_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantize_prints_heartbeat_lines_on_stderr_when_it_is_not_a_terminal(tmp_path, monkeypatch):
    from dlopt.cli import main

    monkeypatch.setattr(dlopt.console, "HEARTBEAT_INTERVAL_S", 0.1)
    onnx.save_model(_linear_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((16, 8, 64)).astype(np.float32))
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                       "--calibration", str(tmp_path / "x.npz")])
    assert result.exit_code == 0, result.output
    beats = [line for line in result.stderr.splitlines() if BEAT.match(line)]
    assert beats, result.stderr  # the run takes seconds (calibration, checks, the speed check): many intervals
    assert all(BEAT.match(b).group(2) != "starting" or b is beats[0] for b in beats)
    assert not any(BEAT.match(line) for line in result.stdout.splitlines())  # stdout stays the result
