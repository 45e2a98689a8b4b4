"""The `mobile` target, and what preparing a model for a phone takes with ONNX Runtime Mobile.

What runs here is honest about what it is: PyPI onnxruntime has no NNAPI, CoreML or XNNPACK execution
provider (naming one only warns and runs on the CPU). So the `mobile` target runs the ORT-format model
that a phone would load, on ONNX Runtime's CPU execution provider with a phone-like thread count.
These are the CPU (MLAS) kernels of this host, not a phone's kernels, NPU or GPU; the numbers tell
you how the packaged artifact behaves, not how fast a given phone is.

Three things a phone build needs, wrapped from ONNX Runtime's own tools:
- `to_ort_format`: the ORT flatbuffer format (`onnxruntime.tools.convert_onnx_models_to_ort`) with the
  optimization style fit for the intended EP: "Fixed" (all optimizations applied now) for the CPU EP
  and XNNPACK, "Runtime" (basic optimizations now, the rest saved and replayed at load time) for
  NNAPI and CoreML, because the fused ops of higher levels are CPU-only and would take nodes away
  from those EPs. It also writes the reduced-operator config for a minimal ONNX Runtime build.
- `coverage_report`: how much of the model NNAPI and CoreML can take, from
  `onnxruntime.tools.mobile_helpers.usability_checker` (supported nodes, partitions, unsupported
  ops, nodes lost to dynamic shapes), turned into concrete advice such as `--fix-shape
  input_ids=1x128`. Unsupported ops are reported, never raised.
- `fix_shapes`: make dynamic input shapes static (`onnxruntime.tools.make_dynamic_shape_fixed`),
  which NNAPI needs and CoreML prefers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dlopt.errors import InputError, StageError
from dlopt.fileio import external_data_files  # noqa: F401 (part of this module's API)
from dlopt.targets.base import CPU_PROVIDER, Int8Form, Target, TargetSession

# Android and iOS apps typically give ONNX Runtime the big cores: 4 on most current phones. Capped
# at this host's core count, since more threads than cores measures contention, not a phone.
PHONE_THREADS = 4

OPTIMIZATION_STYLES = ("Fixed", "Runtime")
# The optimization style fit for each intended execution provider (ONNX Runtime Mobile's guidance).
STYLE_FOR_EP = {"cpu": "Fixed", "xnnpack": "Fixed", "nnapi": "Runtime", "coreml": "Runtime"}
INTENDED_EPS = tuple(STYLE_FOR_EP)
# Session config entries an ORT-format model of each style must be loaded with.
SESSION_CONFIG_FOR_STYLE = {
    "Fixed": {},
    "Runtime": {"session.enable_saved_runtime_optimizations": "1"},
}


def phone_threads() -> int:
    return max(1, min(PHONE_THREADS, os.cpu_count() or 1))


class MobileTarget(Target):
    name: ClassVar[str] = "mobile"
    description: ClassVar[str] = (
        "ORT-format model on ONNX Runtime's CPU execution provider with a phone-like "
        "thread count: this host's CPU kernels, not a phone's NPU, GPU or NNAPI/CoreML"
    )
    providers: ClassVar[tuple[str, ...]] = (CPU_PROVIDER,)
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    device_type: ClassVar[str] = "cpu"
    cpu_time_measures_work: ClassVar[bool] = True
    default_threads: ClassVar[int] = PHONE_THREADS
    # Phones are ARM: s8·s8 dot-product kernels; NNAPI, CoreML and XNNPACK take static QDQ graphs, the
    # CPU EP also runs dynamic quantization.
    int8: ClassVar[Int8Form | None] = Int8Form(
        dynamic=True, activation="s8", per_channel=True, note="ARM int8 dot-product kernels are s8·s8"
    )
    # The bundle: an ORT-format model, and with --torch-source an ExecuTorch .pte (XNNPACK) program.
    package_formats: ClassVar[tuple[str, ...]] = ("ort", "pte")

    def is_available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return False, f"onnxruntime cannot be imported ({e})"
        return True, (
            f"onnxruntime {ort.__version__} {CPU_PROVIDER} running ORT-format models "
            "(CPU kernels of this host; no NNAPI/CoreML/XNNPACK EP in PyPI onnxruntime)"
        )

    def session_threads(self) -> int:
        return phone_threads()

    def device_name(self, device_id: int = 0) -> str:
        from dlopt.targets.cpu import cpu_model_name

        return f"{cpu_model_name()} (CPU kernels standing in for a phone)"

    def create_session(
        self,
        model: str | Path | bytes,
        *,
        threads: int | None = None,
        graph_opt_level: str = "all",
        provider_options: Mapping[str, str] | None = None,
        allow_fallback: bool = False,
        device_id: int = 0,
        check_available: bool = True,
        free_dimensions: Mapping[str, int] | None = None,
        profile_prefix: str | None = None,
    ) -> TargetSession:
        """A session on the ORT-format form of `model`: an .ort file or bytes are loaded as they are;
        an .onnx file is converted first (Fixed style, as the CPU EP wants). `threads=None` means a
        phone-like count (`phone_threads()`)."""
        source: str | Path | bytes = model
        if isinstance(model, (str, Path)) and not str(model).lower().endswith(".ort"):
            from dlopt.fileio import load_onnx

            load_onnx(model, load_external_data=False)  # a clear error for a missing or corrupt file
            with tempfile.TemporaryDirectory(prefix="dlopt-mobile-") as tmp:
                converted = to_ort_format(Path(model), Path(tmp), style="Fixed")
                source = converted.model.read_bytes()
        return super().create_session(
            source,
            threads=threads or phone_threads(),
            graph_opt_level=graph_opt_level,
            provider_options=provider_options,
            allow_fallback=allow_fallback,
            device_id=device_id,
            check_available=check_available,
            free_dimensions=free_dimensions,
            profile_prefix=profile_prefix,
        )


# ---------------------------------------------------------------------------------------------
# ORT format
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrtConversion:
    model: Path  # the .ort file
    operators_config: Path  # required_operators[_and_types].config for a minimal build
    style: str
    ort_format_version: str


def to_ort_format(
    onnx_path: Path,
    out_dir: Path,
    *,
    style: str = "Fixed",
    type_reduction: bool = False,
    model_name: str = "model.ort",
    target_platform: str = "arm",
) -> OrtConversion:
    """Convert one ONNX file to ORT format in `out_dir` as `model_name`, with its operator config.

    `target_platform="arm"` keeps the model portable to phones: ONNX Runtime then skips the x86-only
    NCHWc layout transformer and allows int8 QDQ fusions that ARM kernels have."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if style not in OPTIMIZATION_STYLES:
        raise InputError(f"unknown optimization style {style!r}", f"choose one of {', '.join(OPTIMIZATION_STYLES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The converter writes beside its input (and a temp folder there): work on a private copy.
    with tempfile.TemporaryDirectory(prefix="dlopt-ort-") as tmp:
        work = Path(tmp) / "in"
        work.mkdir()
        staged = work / "model.onnx"
        _copy_with_external_data(onnx_path, staged)
        converted = Path(tmp) / "out"
        chatter = io.StringIO()
        utils_logger = logging.getLogger("ort_format_model.utils")
        level = utils_logger.level
        utils_logger.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(chatter):
                convert_onnx_models_to_ort(
                    staged,
                    output_dir=converted,
                    optimization_styles=[OptimizationStyle[style]],
                    target_platform=target_platform,
                    enable_type_reduction=type_reduction,
                )
        except Exception as e:  # onnxruntime raises its own types (Fail, InvalidGraph, NotImplemented …)
            raise StageError(
                f"ONNX Runtime could not convert {onnx_path} to ORT format: {str(e).strip()[:400]}",
                "check that onnxruntime can load the model (`dlopt bench MODEL`)",
            ) from e
        finally:
            utils_logger.setLevel(level)
        ort_files = sorted(converted.glob("*.ort"))
        configs = sorted(converted.glob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise StageError(
                f"ORT conversion of {onnx_path} wrote {[p.name for p in converted.iterdir()]}",
                "expected one .ort file and one .config",
            )
        model_out = out_dir / model_name
        shutil.move(str(ort_files[0]), model_out)
        config_name = "required_operators_and_types.config" if type_reduction else "required_operators.config"
        config_out = out_dir / config_name
        config_out.write_text(_portable_config(configs[0].read_text(), model_name))
    return OrtConversion(
        model=model_out, operators_config=config_out, style=style, ort_format_version=ort_format_version(model_out)
    )


def _portable_config(text: str, model_name: str) -> str:
    """The converter's config names the temp files it read in comments: name the bundle's file instead,
    so the config (and its hash) does not depend on where it was built."""
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    header = [
        f"# Operators (and kernel types, if listed) required by {model_name}.",
        "# Build a minimal ONNX Runtime with: ./build.sh --minimal_build --include_ops_by_config THIS_FILE",
    ]
    return "\n".join(header + lines) + "\n"


def _copy_with_external_data(src: Path, dst: Path) -> None:
    from dlopt.fileio import load_onnx

    model = load_onnx(src, load_external_data=False)
    shutil.copyfile(src, dst)
    for location in external_data_files(model):
        shutil.copyfile(src.parent / location, dst.parent / location)


def ort_format_version(path: Path) -> str:
    """The ORT flatbuffer format version stored in an .ort file (its `ort_version` field)."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    data = path.read_bytes()
    if data[4:8] != b"ORTM":
        raise InputError(f"{path} is not an ORT-format model (no ORTM identifier)", "convert it with dlopt package")
    session = InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0)
    version = session.OrtVersion()
    return version.decode() if isinstance(version, bytes) else str(version)


# ---------------------------------------------------------------------------------------------
# Static shapes
# ---------------------------------------------------------------------------------------------


def parse_fix_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'input_ids=1x128' -> ('input_ids', (1, 128))."""
    name, sep, dims = text.partition("=")
    if not sep or not name or not dims:
        raise InputError(f"fixed shape {text!r} is not NAME=DIMS", "write it like input_ids=1x128 or image=1x3x224x224")
    try:
        shape = tuple(int(d) for d in re.split(r"[x,]", dims))
    except ValueError:
        raise InputError(f"fixed shape {text!r}: dimensions must be integers", "e.g. input_ids=1x128") from None
    if any(d < 1 for d in shape):
        raise InputError(f"fixed shape {text!r}: dimensions must be at least 1", "e.g. input_ids=1x128")
    return name, shape


def fix_shapes(model, shapes: Mapping[str, Sequence[int]]):
    """A copy of `model` with the named inputs' shapes made static (and the outputs' shapes where they
    follow). Symbolic dims shared with other inputs are fixed everywhere they appear."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for name, shape in shapes.items():
        if name not in names:
            raise InputError(
                f"a fixed shape names {name!r}, which is not an input of the model",
                f"the model's inputs are {', '.join(names)}",
            )
        try:
            make_input_shape_fixed(fixed.graph, name, list(shape))
        except ValueError as e:
            raise InputError(
                f"fixed shape {name}={'x'.join(map(str, shape))}: {e}",
                "give one size per axis, keeping the axes that are already fixed",
            ) from e
    try:
        fix_output_shapes(fixed)
    except Exception as e:  # onnx.checker / shape inference errors have several types
        raise InputError(
            f"the model with fixed shapes {dict(shapes)} does not check: {str(e)[:300]}",
            "check the sizes against the model's inputs",
        ) from e
    return fixed


def dynamic_inputs(model) -> dict[str, list[int | str | None]]:
    """Graph inputs that have a dynamic (symbolic or unknown) axis, with their shapes."""
    inits = {t.name for t in model.graph.initializer}
    found = {}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim
        ]
        if any(not isinstance(d, int) for d in dims):
            found[vi.name] = dims
    return found


# ---------------------------------------------------------------------------------------------
# NNAPI / CoreML coverage
# ---------------------------------------------------------------------------------------------

# (name in reports, intended EP it informs, checker)
COVERAGE_EPS = ("NNAPI", "CoreML-MLProgram", "CoreML-NeuralNetwork")


def _checker(ep: str):
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    if ep == "NNAPI":
        return uc.check_nnapi_partitions
    files = {
        "CoreML-MLProgram": "coreml_supported_mlprogram_ops.md",
        "CoreML-NeuralNetwork": "coreml_supported_neuralnetwork_ops.md",
    }
    return lambda model, require_fixed: uc.check_coreml_partitions(model, require_fixed, files[ep])


def coverage_report(
    model, *, sample_shapes: Mapping[str, Sequence[int]] | None = None, model_label: str = "the model"
) -> dict[str, Any]:
    """How much of `model` (an onnx.ModelProto) NNAPI and CoreML can take, with advice.

    The model is first optimized at ONNX Runtime's "basic" level, as the ORT-format conversion for
    these EPs does ("Runtime" style), so the nodes counted are the ones the EP will be offered.
    `sample_shapes` (input name -> a concrete shape) turns the static-shape advice into a command
    line with real sizes. Never raises for unsupported ops: they are what the report is about."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import optimize_model

    with tempfile.TemporaryDirectory(prefix="dlopt-coverage-") as tmp:
        src = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(src), save_as_external_data=model.ByteSize() > 2**31 - 1)
        basic = Path(tmp) / "basic.onnx"
        try:
            optimize_model(src, basic, use_external_initializers=True)
            optimized = onnx.load_model(str(basic))
        except Exception as e:  # an ORT load failure: report on the unoptimized graph instead
            optimized = model
            note = f"ONNX Runtime could not optimize the model ({str(e).strip()[:200]}); counted on the original graph"
        else:
            note = (
                "counted on the graph after ONNX Runtime's basic optimizations (what Runtime-style ORT models "
                "offer the EP)"
            )
        try:
            with_shapes = onnx.shape_inference.infer_shapes(optimized)
        except Exception:  # shape inference is best effort here; dynamic-shape counts then over-report
            with_shapes = optimized
    dynamic = dynamic_inputs(with_shapes)
    eps: dict[str, Any] = {}
    for ep in COVERAGE_EPS:
        eps[ep] = _ep_coverage(ep, with_shapes, bool(dynamic))
    advice = _advice(eps, dynamic, sample_shapes or {}, model_label)
    return {"note": note, "nodes": len(with_shapes.graph.node), "dynamic_inputs": dynamic, "eps": eps, "advice": advice}


def _ep_coverage(ep: str, model, has_dynamic: bool) -> dict[str, Any]:
    check = _checker(ep)
    try:
        info = check(model, True)
    except Exception as e:  # a checker bug must not stop packaging: report it as unknown coverage
        return {
            "error": f"{type(e).__name__}: {str(e)[:200]}",
            "supported_nodes": 0,
            "nodes": len(model.graph.node),
            "supported_pct": 0.0,
            "partitions": 0,
            "partition_sizes": [],
            "unsupported_ops": [],
            "nodes_unsupported_due_to_op": 0,
            "nodes_unsupported_due_to_dynamic_shape": 0,
            "nodes_unsupported_due_to_rank": 0,
            "caveats": [],
            "verdict": "NO",
            "if_shapes_fixed": None,
        }
    result = _info_dict(info)
    result["if_shapes_fixed"] = None
    if has_dynamic:
        try:
            fixed = check(model, False)
        except Exception:  # noqa: BLE001 - the what-if is optional
            fixed = None
        if fixed is not None:
            result["if_shapes_fixed"] = {k: v for k, v in _info_dict(fixed).items() if k != "caveats"}
    return result


def _info_dict(info) -> dict[str, Any]:
    nodes = max(1, info.num_nodes)
    return {
        "supported_nodes": info.num_supported_nodes,
        "nodes": info.num_nodes,
        "supported_pct": round(100.0 * info.num_supported_nodes / nodes, 1),
        "partitions": info.num_partitions,
        "partition_sizes": [len(g) for g in info.supported_groups],
        "unsupported_ops": sorted(info.unsupported_ops),
        "nodes_unsupported_due_to_op": info.nodes_unsupported_due_to_op,
        "nodes_unsupported_due_to_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
        "nodes_unsupported_due_to_rank": info.num_unsupported_nodes_due_to_rank,
        "caveats": info.supported_ops_checker.get_caveats(),
        "verdict": info.suitability().name if info.num_nodes else "NO",
    }


def _advice(
    eps: Mapping[str, Any], dynamic: Mapping[str, list], sample_shapes: Mapping[str, Sequence[int]], model_label: str
) -> list[str]:
    advice = []
    if dynamic:
        gains = []
        for ep, cov in eps.items():
            fixed = cov.get("if_shapes_fixed")
            if fixed and fixed["supported_pct"] > cov["supported_pct"]:
                gains.append(
                    f"{ep} {cov['supported_pct']:.0f}% -> {fixed['supported_pct']:.0f}% of nodes, "
                    f"{cov['partitions']} -> {fixed['partitions']} partitions"
                )
        flags = []
        for name, dims in dynamic.items():
            concrete = sample_shapes.get(name)
            if concrete is None or len(concrete) != len(dims):
                concrete = [d if isinstance(d, int) else (1 if i == 0 else 128) for i, d in enumerate(dims)]
            flags.append(f"--fix-shape {name}={'x'.join(str(int(d)) for d in concrete)}")
        if gains:
            advice.append(
                f"make the input shapes static: dlopt package {model_label} --target mobile "
                f"{' '.join(flags)} ({'; '.join(gains)}); NNAPI cannot run dynamic shapes at all"
            )
        else:
            advice.append(
                f"inputs {', '.join(dynamic)} have dynamic shapes; NNAPI needs static shapes "
                f"({' '.join(flags)}), CoreML runs them slower"
            )
    for ep, cov in eps.items():
        if cov.get("error"):
            advice.append(f"{ep}: coverage could not be computed ({cov['error']})")
            continue
        after = cov.get("if_shapes_fixed") or cov
        if after["unsupported_ops"]:
            advice.append(
                f"{ep} has no kernel for {', '.join(o.split(':', 1)[1] for o in after['unsupported_ops'])} "
                f"({after['nodes_unsupported_due_to_op']} node(s)): they fall back to the CPU EP, leaving "
                f"{after['partitions']} {ep} partition(s); replace them in the model, or ship for the "
                "CPU EP / XNNPACK"
            )
        if after["nodes_unsupported_due_to_rank"]:
            advice.append(f"{ep}: {after['nodes_unsupported_due_to_rank']} nodes have inputs of rank above 5")
    verdicts = {ep: (cov.get("if_shapes_fixed") or cov)["verdict"] for ep, cov in eps.items()}
    good = [ep for ep, v in verdicts.items() if v == "YES"]
    if good:
        advice.append(
            f"worth trying: {', '.join(good)} (package with --intended-ep "
            f"{'nnapi' if 'NNAPI' in good else 'coreml'} for the Runtime optimization style)"
        )
    else:
        advice.append(
            "neither NNAPI nor CoreML is likely to beat the CPU EP on this model: ship it for the CPU EP "
            "(or XNNPACK) with --intended-ep cpu"
        )
    return advice


def coverage_table_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for ep, cov in report["eps"].items():
        fixed = cov.get("if_shapes_fixed")
        rows.append(
            [
                ep,
                f"{cov['supported_nodes']}/{cov['nodes']}",
                cov["supported_pct"],
                cov["partitions"],
                cov["nodes_unsupported_due_to_dynamic_shape"],
                ", ".join(o.split(":", 1)[1] for o in cov["unsupported_ops"]) or "-",
                cov["verdict"],
                f"{fixed['supported_pct']}% / {fixed['partitions']} / {fixed['verdict']}" if fixed else "-",
            ]
        )
    return rows


COVERAGE_HEADERS = (
    "EP",
    "nodes",
    "supported %",
    "partitions",
    "dynamic-shape nodes",
    "unsupported ops",
    "verdict",
    "if shapes fixed (% / partitions / verdict)",
)

__all__ = [
    "COVERAGE_EPS",
    "COVERAGE_HEADERS",
    "INTENDED_EPS",
    "MobileTarget",
    "OrtConversion",
    "PHONE_THREADS",
    "SESSION_CONFIG_FOR_STYLE",
    "STYLE_FOR_EP",
    "coverage_report",
    "coverage_table_rows",
    "dynamic_inputs",
    "external_data_files",
    "fix_shapes",
    "ort_format_version",
    "parse_fix_shape",
    "phone_threads",
    "to_ort_format",
]
