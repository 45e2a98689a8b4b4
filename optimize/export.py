"""Export a PyTorch model to ONNX and prove the ONNX model equal to its source.

The export is only as good as its verification: after onnx.checker and shape inference, ONNX Runtime's
outputs are compared with torch's on the example inputs and on inputs of other batch sizes and
sequence lengths, so a dynamic axis that was silently baked in as a constant fails here, not in
production.
"""

from __future__ import annotations

import inspect
import io
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dlopt.errors import InputError, StageError, VerificationError
from dlopt.fileio import WrittenModel
from dlopt.quiet import quiet_libraries
from dlopt.sources import EXPORTERS, Exporter, ModelSource, require_torch
from dlopt.stage import Artifact, Check, StageContext, StageInput, StageResult, config_to_dict, register_stage
from dlopt.tables import environment, format_table
from dlopt.usercode import user_code

DEFAULT_OPSET = 18


@dataclass(frozen=True, kw_only=True)
class Export:
    """Export a torch source to ONNX, verified against torch on several batch sizes and lengths."""

    VERSION: ClassVar[int] = 1
    opset: int = DEFAULT_OPSET
    exporter: Exporter | None = None  # None: the source's preferred exporter, else dynamo
    fallback: bool = True  # try the other exporter, announced, when the chosen one fails
    dynamic_shapes: bool = True  # batch axis, plus the sequence axis of token inputs
    atol: float | None = None  # None: the source's own tolerance, else 1e-4
    rtol: float | None = None  # None: the source's own tolerance, else 1e-3
    verify_batches: tuple[int, ...] = (1, 3)
    verify_seq_lens: tuple[int, ...] = (7, 33)
    allow_mismatch: bool = False
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Dynamic axes and verification inputs
# ---------------------------------------------------------------------------------------------


def _is_token_input(tensor) -> bool:
    return tensor.dim() == 2 and not tensor.dtype.is_floating_point


def default_dynamic_axes(inputs: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    """Batch axis 0 for every input; axis 1 ("seq") for integer [batch, seq] token inputs."""
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in inputs.items():
        if tensor.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if _is_token_input(tensor):
            axes[name][1] = "seq"
    return axes


def _export_ready_inputs(inputs: dict[str, Any], axes: dict[str, dict[int, str]]) -> dict[str, Any]:
    """torch.export specializes dimensions of size 0 and 1: grow dynamic axes of size 1 to 2."""
    torch = require_torch()
    ready = {}
    for name, tensor in inputs.items():
        for axis in axes.get(name, {}):
            if tensor.shape[axis] == 1:
                tensor = torch.cat([tensor, tensor], dim=axis)
        ready[name] = tensor
    return ready


def _resample_inputs(
    example: dict[str, Any], axes: dict[str, dict[int, str]], batch: int, seq_len: int | None, rng: np.random.Generator
) -> dict[str, Any]:
    """Inputs of a new batch size / sequence length drawn from the example's value ranges."""
    torch = require_torch()
    sizes = {"batch": batch}
    if seq_len is not None:
        sizes["seq"] = seq_len
    out = {}
    for name, tensor in example.items():
        shape = list(tensor.shape)
        for axis, dim_name in axes.get(name, {}).items():
            if dim_name in sizes:
                shape[axis] = sizes[dim_name]
        values = tensor.detach().cpu().numpy()
        if tensor.dtype.is_floating_point:
            mean, std = float(values.mean()), float(values.std()) or 1.0
            array = rng.normal(mean, std, size=shape).astype(values.dtype)
        elif tensor.dtype == torch.bool:
            array = (
                rng.integers(0, 2, size=shape).astype(bool)
                if values.min() != values.max()
                else np.full(shape, bool(values.flat[0]))
            )
        else:
            array = rng.integers(int(values.min()), int(values.max()) + 1, size=shape).astype(values.dtype)
        out[name] = torch.from_numpy(array)
    return out


def verification_cases(
    source: ModelSource, axes: dict[str, dict[int, str]], config: Export
) -> list[tuple[str, dict[str, Any]]]:
    """The example, plus inputs of other batch sizes and (for token models) sequence lengths."""
    cases = [("example", dict(source.example_inputs))]
    dim_names = {d for per_input in axes.values() for d in per_input.values()}
    if not config.dynamic_shapes or "batch" not in dim_names:
        return cases
    has_seq = "seq" in dim_names
    rng = np.random.default_rng(config.seed)
    shapes = (
        [(b, None) for b in config.verify_batches]
        if not has_seq
        else [(b, s) for b, s in zip(config.verify_batches, config.verify_seq_lens)]
    )
    for batch, seq_len in shapes:
        label = f"b{batch}" + (f" s{seq_len}" if seq_len else "")
        if source.make_inputs is not None:
            with user_code(f"make_inputs of {source.name}"):
                inputs = dict(source.make_inputs(batch, seq_len))
        else:
            inputs = _resample_inputs(source.example_inputs, axes, batch, seq_len, rng)
        cases.append((label, inputs))
    return cases


# ---------------------------------------------------------------------------------------------
# The exporters
# ---------------------------------------------------------------------------------------------


def _run_exporter(
    exporter: Exporter,
    source: ModelSource,
    inputs: dict[str, Any],
    axes: dict[str, dict[int, str]],
    output_names: list[str],
    opset: int,
):
    torch = require_torch()
    import onnx

    module = source.module
    with quiet_libraries(), torch.no_grad():  # torch.onnx's progress output and warnings: --debug only
        if exporter == "dynamo":
            dynamic_shapes = {name: dict(axes.get(name, {})) or None for name in inputs} if axes else None
            # Output names are set afterwards: the dynamo exporter fails when a requested name is already
            # taken by an internal value (e.g. an output named "embedding" beside an nn.Embedding node).
            program = torch.onnx.export(
                module,
                (),
                kwargs=inputs,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                optimize=True,
            )
            return rename_graph_outputs(program.model_proto, output_names)
        # torchscript: positional arguments in forward()'s order
        params = list(inspect.signature(module.forward).parameters)
        ordered = [n for n in params if n in inputs]
        output_axes = {n: {0: "batch"} for n in output_names} if axes else {}
        buffer = io.BytesIO()
        torch.onnx.export(
            module,
            tuple(inputs[n] for n in ordered),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=ordered,
            output_names=output_names,
            dynamic_axes={**{n: a for n, a in axes.items() if n in ordered}, **output_axes},
            do_constant_folding=True,
        )
        return onnx.load_model_from_string(buffer.getvalue())


def rename_graph_outputs(model, names: list[str]):
    """Give the graph outputs `names`, renaming any internal value that already holds one of them."""
    graph = model.graph
    if len(names) != len(graph.output):
        raise StageError(f"the exported graph has {len(graph.output)} outputs, expected {len(names)}")
    taken = {v for node in graph.node for v in (*node.input, *node.output)}
    taken |= {v.name for v in graph.input} | {t.name for t in graph.initializer}

    def rename(old: str, new: str) -> None:
        for node in graph.node:
            node.input[:] = [new if v == old else v for v in node.input]
            node.output[:] = [new if v == old else v for v in node.output]
        for value in (*graph.output, *graph.value_info):
            if value.name == old:
                value.name = new

    for output, new in zip(list(graph.output), names):
        if output.name == new:
            continue
        if new in taken:  # an internal value holds the name: move it aside first
            spare = next(f"{new}_{i}" for i in range(1, 10**6) if f"{new}_{i}" not in taken)
            rename(new, spare)
            taken.add(spare)
        taken.discard(output.name)
        rename(output.name, new)
        taken.add(new)
    return model


def _count_outputs(source: ModelSource) -> int:
    torch = require_torch()
    try:
        with torch.no_grad():
            out = source.module(**source.example_inputs)
    except Exception as e:  # the user's module on the user's example inputs: their model or inputs are wrong
        raise InputError(
            f"{source.name}: {type(source.module).__name__}.forward failed on the factory's example "
            f"inputs ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            "check that the example inputs' names, shapes and dtypes are what forward() expects",
        ) from e
    return len(out) if isinstance(out, (tuple, list)) else 1


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputDiff:
    case: str
    output: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    passed: bool


def _torch_outputs(source: ModelSource, inputs: dict[str, Any]) -> list[np.ndarray]:
    torch = require_torch()
    with torch.no_grad():
        out = source.module(**inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def compare_outputs(
    case: str, names: list[str], expected: list[np.ndarray], actual: list[np.ndarray], atol: float, rtol: float
) -> list[OutputDiff]:
    """Per-output check |actual - expected| <= atol + rtol * |expected| (numpy.allclose's rule)."""
    diffs = []
    for name, want, got in zip(names, expected, actual):
        if want.shape != got.shape:
            diffs.append(OutputDiff(case, name, tuple(got.shape), float("inf"), float("inf"), atol, rtol, False))
            continue
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        err = np.abs(want64 - got64)
        finite = bool(np.isfinite(got64).all() or np.array_equal(np.isfinite(got64), np.isfinite(want64)))
        max_abs = float(np.nanmax(err)) if err.size else 0.0
        significant = np.abs(want64) > atol  # relative error is meaningless next to zero
        max_rel = float(np.max(err[significant] / np.abs(want64[significant]))) if significant.any() else 0.0
        passed = finite and bool(np.all(err <= atol + rtol * np.abs(want64)))
        diffs.append(OutputDiff(case, name, tuple(want.shape), max_abs, max_rel, atol, rtol, passed))
    return diffs


def verify_onnx(
    model, source: ModelSource, cases: list[tuple[str, dict[str, Any]]], atol: float, rtol: float
) -> list[OutputDiff]:
    from dlopt.sessions import cpu_session

    session = cpu_session(
        model, threads=os.cpu_count() or 1, error=StageError, hint="try {exporter=torchscript} or another {opset=N}"
    )
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    diffs = []
    for label, inputs in cases:
        feeds = {n: inputs[n].detach().cpu().numpy() for n in input_names}
        try:
            actual = session.run(None, feeds)
        except Exception as e:
            shapes = ", ".join(f"{n}{list(v.shape)}" for n, v in feeds.items())
            raise VerificationError(
                f"the exported model fails on inputs {shapes} ({label}): {e}",
                "an axis may have been exported as a constant; try static shapes or the other exporter",
            ) from e
        diffs += compare_outputs(label, output_names, _torch_outputs(source, inputs), actual, atol, rtol)
    return diffs


def diff_table(diffs: list[OutputDiff]) -> str:
    rows = [
        (
            d.case,
            d.output,
            "x".join(map(str, d.shape)),
            d.max_abs_diff,
            d.max_rel_diff,
            f"{d.atol:g}/{d.rtol:g}",
            "pass" if d.passed else "FAIL",
        )
        for d in diffs
    ]
    return format_table(["inputs", "output", "shape", "max abs diff", "max rel diff", "atol/rtol", "result"], rows)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def export(
    source: ModelSource, config: Export = Export(), log: Callable[[str], None] = lambda message: None
) -> StageResult:
    """Export `source` to ONNX and verify it. Raises VerificationError on a mismatch unless allowed.

    The report holds the exporter actually used, the opset, input/output shapes and the diff table."""
    # the source's forward() is user code: what it raises stays an export failure, but an exit is refused
    with user_code(f"the model of {source.name}", errors=False):
        return _export(source, config, log)


def _export(source: ModelSource, config: Export, log: Callable[[str], None]) -> StageResult:
    require_torch()
    first = config.exporter or source.exporter or "dynamo"
    if first not in EXPORTERS:
        raise InputError(f"unknown exporter {first!r}", f"choose one of {', '.join(EXPORTERS)}")
    if not 7 <= config.opset <= 23:
        raise InputError(f"opset {config.opset} is out of range", "use an opset between 7 and 23; 18 is the default")
    source.module.eval()
    atol = config.atol if config.atol is not None else source.atol
    rtol = config.rtol if config.rtol is not None else source.rtol

    axes: dict[str, dict[int, str]] = {}
    if config.dynamic_shapes:
        axes = {n: dict(a) for n, a in (source.dynamic_axes or default_dynamic_axes(source.example_inputs)).items()}
    n_outputs = _count_outputs(source)
    output_names = list(
        source.output_names or (["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)])
    )
    if len(output_names) != n_outputs:
        raise InputError(
            f"{source.name}: {len(output_names)} output names for {n_outputs} outputs", "give one name per output"
        )
    export_inputs = _export_ready_inputs(source.example_inputs, axes)

    order = [first] + ([e for e in EXPORTERS if e != first] if config.fallback else [])
    failures: dict[str, str] = {}
    model = None
    started = time.perf_counter()
    for exporter in order:
        if failures:
            log(
                f"{order[0]} exporter failed ({failures[order[0]].splitlines()[0][:200]}); "
                f"falling back to the {exporter} exporter"
            )
        try:
            model = _run_exporter(exporter, source, export_inputs, axes, output_names, config.opset)
            model = _finish(model)
            break
        except Exception as e:  # any exporter failure is worth a fallback; the reasons are all reported
            failures[exporter] = f"{type(e).__name__}: {e}"
            model = None
    if model is None:
        details = "; ".join(f"{k}: {v.splitlines()[0][:300]}" for k, v in failures.items())
        raise StageError(
            f"export of {source.name} failed ({details})", "try static shapes, another {opset=N} or the other exporter"
        )
    export_seconds = time.perf_counter() - started

    cases = verification_cases(source, axes, config)
    diffs = verify_onnx(model, source, cases, atol, rtol)
    passed = all(d.passed for d in diffs)
    log(diff_table(diffs))
    report = {
        "stage": "export",
        "source": source.name,
        "exporter": exporter,
        "exporter_failures": failures,
        "opset": config.opset,
        "config": config_to_dict(config),
        "dynamic_axes": {n: {str(k): v for k, v in a.items()} for n, a in axes.items()},
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "verification": {
            "passed": passed,
            "atol": atol,
            "rtol": rtol,
            "diffs": [d.__dict__ | {"shape": list(d.shape)} for d in diffs],
        },
        "export_seconds": round(export_seconds, 3),
        "parameters": int(sum(p.numel() for p in source.module.parameters())),
        "environment": environment(),
    }
    if not passed and not config.allow_mismatch:
        failed = sorted({f"{d.output} ({d.case})" for d in diffs if not d.passed})
        raise VerificationError(
            f"ONNX Runtime's outputs differ from torch's beyond atol={atol:g}, rtol={rtol:g}: {', '.join(failed)}",
            "no model was written; see the table above, try the other exporter, "
            "or pass {allow_mismatch} to write it anyway",
        )
    return StageResult(model=model, report=report)


def _finish(model):
    """onnx.checker, then shape inference kept in the model (later stages use the inferred shapes)."""
    import onnx

    if model.ByteSize() < 2**31 - 1:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    return model


def _value_info(value) -> dict[str, Any]:
    import onnx

    tensor_type = value.type.tensor_type
    return {
        "name": value.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
        "shape": [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim],
    }


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _source_problem(source, config, before) -> str | None:
    return None if isinstance(source, ModelSource) else f"got a {type(source).__name__}"


def _onnx_problem(model, config, before) -> str | None:
    import onnx

    return None if isinstance(model, onnx.ModelProto) else f"got a {type(model).__name__}"


TORCH_SOURCE = Check("a torch source (a ModelSource)", _source_problem)


def _write(given: StageInput, config: Export, context: StageContext) -> Artifact:
    """The source (rebuilt from the stage before's pruned checkpoint, if any) as OUTPUT/model.onnx."""
    from dlopt.checkpoint import torch_source

    source = given.source if given.artifact is None else torch_source(given.source, given.artifact, context.log)
    written = export_file(source, context.folder() / "model.onnx", config, log=context.log)
    return Artifact.of(written.model_path, written.report)


@register_stage(
    kind="export",
    config=Export,
    takes="torch",
    makes="onnx",
    requires=(TORCH_SOURCE,),
    ensures=(Check("an ONNX model", _onnx_problem),),
    summary="torch -> ONNX, verified against torch",
    writer=_write,
)
def export_stage(source: ModelSource, config: Export, context: StageContext) -> StageResult:
    return export(source, config, log=context.log)


def export_file(
    source: ModelSource | str,
    output: str | os.PathLike,
    config: Export | None = None,
    *,
    log: Callable[[str], None] = lambda message: None,
) -> WrittenModel:
    """Export SOURCE (a reference model name, "file.py:build", "pkg.module:build" or a ModelSource) to
    ONNX at `output`, verified against torch, and write the model and its JSON report (NAME.export.json)
    atomically, renamed into place together.

    Raises VerificationError (and writes nothing) when outputs differ, unless config.allow_mismatch."""
    from dlopt.fileio import (
        check_output_path,
        guard_outputs,
        guard_source_spec,
        json_text,
        report_path_for,
        stage_onnx,
        staged_outputs,
    )
    from dlopt.sources import load_source

    config = config or Export()
    out = check_output_path(output)  # fail before minutes of work, not after
    report_path = check_output_path(report_path_for(out, "export"))
    if not isinstance(source, ModelSource):
        guard_outputs([guard_source_spec(source)], [out, report_path])
        log(f"loading {source}")
        source = load_source(source)
    exporter = config.exporter or source.exporter or "dynamo"
    why = "" if config.exporter or not source.exporter else " (the model's preferred exporter)"
    log(f"exporting {source.name} with the {exporter} exporter{why}, opset {config.opset}")
    result = export_stage.apply(source, config, StageContext(log=log))
    # The model and its report are renamed into place together: never a new model beside an old report.
    with staged_outputs() as outputs:
        model_tmp = stage_onnx(result.model, out, outputs)
        report = result.report | {"output": str(out), "bytes": model_tmp.stat().st_size}
        outputs.stage(report_path).write_text(json_text(report))
    return WrittenModel(out, report_path, report)


def export_verified(source: ModelSource, log: Callable[[str], None]):
    """A torch ModelSource as a verified ONNX model (in memory): the export stage, default config."""
    return export_stage.apply(source, Export(), StageContext(log=log)).model


__all__ = [
    "TORCH_SOURCE",
    "Export",
    "DEFAULT_OPSET",
    "OutputDiff",
    "compare_outputs",
    "default_dynamic_axes",
    "diff_table",
    "export",
    "export_file",
    "export_stage",
    "export_verified",
    "verify_onnx",
]
