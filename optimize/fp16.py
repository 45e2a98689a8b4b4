"""FP16 conversion that never writes a model which outputs NaN or Inf on the given data.

Built on onnxconverter-common's `convert_float_to_float16` (for `target="cuda"` on BERT-like graphs,
ONNX Runtime's transformer fusions first and ORT's own float16 converter, the recipe ORT ships for
fused transformers). What dlopt adds, and why:
- Automatic FP32 fallback (`auto_fallback`): the float model is run on the data with every
  intermediate tensor exposed; each node whose output leaves the FP16 range (|x| > 65504) is kept in
  FP32, and so is each node that reads such a tensor (a Cast to FP16 in between would turn it into Inf).
  The FP16 model is then run the same way; every node where a NaN/Inf first appears (inputs clean,
  output not, where the FP32 model was finite) is added to the FP32 list, and the conversion is redone,
  until the outputs are clean. If they cannot be made clean, StageError: nothing is written.
- Known converter pitfalls are repaired: a Cast to FLOAT inside the converted region keeps `to=FLOAT`
  while its output is declared FLOAT16 (ORT refuses the model: seen on transformers' MiniLM export), and
  constants beyond ±10,000 are clamped by the converter's default (`max_finite_val=1e4`), which changes
  numbers that FP16 can hold; dlopt clamps at the real FP16 limit, 65504.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from dlopt.errors import InputError, StageError
from dlopt.fidelity import compare_sessions
from dlopt.fidelity import report as fidelity_report
from dlopt.inputs import model_feeds, parse_input_shapes, take_samples
from dlopt.optimize.quantize_scheme import QuantizeScheme, check_excluded_nodes
from dlopt.quiet import quiet_libraries
from dlopt.sessions import cpu_session, feeds_for
from dlopt.stage import StageResult, config_to_dict

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest subnormal; below half of it a value becomes 0


@dataclass(frozen=True, kw_only=True)
class Fp16(QuantizeScheme):
    """FP16 weights and compute. exclude_ops (QuantizeScheme) join onnxconverter-common's block list."""

    VERSION: ClassVar[int] = 1
    precision: ClassVar[str] = "fp16"
    keep_io_types: bool = True  # graph inputs and outputs stay FP32 (Casts inside)
    auto_fallback: bool = True  # keep nodes that overflow or turn NaN/Inf in FP16 in FP32
    # auto: on for BERT-like graphs on a target with native FP16 kernels (cuda), whose fused ops run in FP16
    transformer_fusion: Literal["auto", "on", "off"] = "auto"
    check_samples: int = 8  # samples run to find overflowing nodes (synthetic inputs without data)
    max_rounds: int = 8  # convert -> run -> block rounds before giving up

    def __post_init__(self):
        super().__post_init__()
        if self.transformer_fusion not in ("auto", "on", "off"):
            raise InputError(f"fp16: transformer_fusion {self.transformer_fusion!r}", "use auto, on or off")
        if self.check_samples < 1 or self.max_rounds < 1:
            raise InputError("fp16: check_samples and max_rounds must be >= 1", "e.g. check_samples=8")


# -- helpers -----------------------------------------------------------------------------------------
def _copy(model):
    import onnx

    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _session(model):
    # basic optimizations only: intermediate values must be the converted graph's own, no fusions
    # that change precision
    return cpu_session(
        model,
        graph_opt_level="basic",
        error=StageError,
        hint="exclude the op type named above with exclude_ops, or report this model",
    )


def _with_all_outputs(model):
    """A copy of the model whose every node output is also a graph output."""
    import onnx

    extended = _copy(model)
    existing = {o.name for o in extended.graph.output}
    for node in extended.graph.node:
        for name in node.output:
            if name and name not in existing:
                extended.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                existing.add(name)
    return extended


# Below this size an FP16 model is also run by onnx's reference evaluator (numpy, every op in FP16).
# ONNX Runtime's CPU provider computes most FP16 nodes with float kernels between Casts and drops
# FP16->FP32 Cast pairs, so an overflow inside the graph does not show there; on a GPU it would.
EXACT_FP16_LIMIT_BYTES = 4 << 20


class _ReferenceRunner:
    def __init__(self, model):
        from onnx.reference import ReferenceEvaluator

        self._evaluator = ReferenceEvaluator(model)
        self._inputs = [i.name for i in model.graph.input]
        self._outputs = [o.name for o in model.graph.output]

    def get_inputs(self):
        return [type("Input", (), {"name": n})() for n in self._inputs]

    def get_outputs(self):
        return [type("Output", (), {"name": n})() for n in self._outputs]

    def run(self, names, feeds):
        with np.errstate(all="ignore"):
            return self._evaluator.run(names, feeds)


def _runner(model, exact_fp16: bool):
    if (
        exact_fp16
        and model.ByteSize() < EXACT_FP16_LIMIT_BYTES
        and all(o.domain in ("", "ai.onnx") for o in model.opset_import)
    ):
        try:
            return _ReferenceRunner(model), True
        except Exception:  # an op the reference evaluator lacks: ONNX Runtime it is
            pass
    return _session(model), False


def _scan(
    model, feeds: Sequence[Mapping[str, np.ndarray]], exact_fp16: bool = False
) -> dict[str, tuple[float, bool, float]]:
    """(largest |x|, all finite, smallest non-zero |x|) of every float tensor the model computes.

    The key "__exact__" says whether the values came from the reference evaluator (exact FP16)."""
    session, exact = _runner(_with_all_outputs(model), exact_fp16)
    names = [o.name for o in session.get_outputs()]
    stats: dict[str, tuple[float, bool, float]] = {}
    for sample in feeds:
        try:
            values = session.run(None, feeds_for(session, sample))
        except InputError:
            raise
        except Exception:  # the reference evaluator failed on this graph: ONNX Runtime it is
            if not isinstance(session, _ReferenceRunner):
                raise
            session, exact = _session(_with_all_outputs(model)), False
            values = session.run(None, feeds_for(session, sample))
        for name, value in zip(names, values):
            if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating) or value.size == 0:
                continue
            magnitude = np.abs(value[np.isfinite(value)])
            largest = float(magnitude.max(initial=0.0))
            smallest = float(magnitude[magnitude > 0].min(initial=np.inf))
            old = stats.get(name, (0.0, True, np.inf))
            stats[name] = (max(old[0], largest), old[1] and bool(np.isfinite(value).all()), min(old[2], smallest))
    stats["__exact__"] = (0.0, exact, 0.0)
    return stats


def _fix_converter_casts(model) -> list[str]:
    """Casts inside the FP16 region whose `to` still says FLOAT while their output is declared FLOAT16."""
    from onnx import TensorProto

    declared = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    fixed = []
    for node in model.graph.node:
        if node.op_type != "Cast":
            continue
        to = next((a for a in node.attribute if a.name == "to"), None)
        if to is not None and to.i == TensorProto.FLOAT and declared.get(node.output[0]) == TensorProto.FLOAT16:
            to.i = TensorProto.FLOAT16
            fixed.append(node.name)
    return fixed


def _remove_cast_round_trips(model) -> int:
    """Drop FP32 -> FP16 -> FP32 Cast pairs the converter puts between two FP32-kept nodes.

    They are not harmless: the value is rounded to FP16 on the way, so an underflow or overflow that
    the FP32 fallback was meant to avoid happens anyway (0/0 = NaN in a kept-FP32 Div)."""
    from onnx import TensorProto

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for node in model.graph.node:
        if cast_to(node) != TensorProto.FLOAT16 or node.output[0] in outputs:
            continue
        after = readers.get(node.output[0], [])
        if not after or any(cast_to(r) != TensorProto.FLOAT for r in after):
            continue
        dropped.add(id(node))
        for r in after:
            dropped.add(id(r))
            rename[r.output[0]] = node.input[0]
    if not dropped:
        return 0
    kept = [n for n in model.graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    model.graph.ClearField("node")
    model.graph.node.extend(kept)
    return len(dropped)


def _fuse_for_cuda(model) -> tuple[Any, dict[str, Any]]:
    from dlopt.optimize.preprocess import fuse_transformer

    return fuse_transformer(model, use_gpu=True)


def _split_shared_initializers(model, blocked: set[str]) -> int:
    """Give FP32-kept nodes their own copy of an initializer they share with FP16 nodes.

    onnxconverter-common keeps a shared initializer FP32 when any reader is blocked, and then hands the
    FP32 tensor to the FP16 readers too: ORT refuses the model ("bound to different types")."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    inits = {t.name: t for t in model.graph.initializer}
    copies = 0
    for node in model.graph.node:
        if node.name not in blocked:
            continue
        for i, name in enumerate(node.input):
            if name in inits and readers[name] - blocked:
                copy = type(inits[name])()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__fp32_{node.name}"
                model.graph.initializer.append(copy)
                node.input[i] = copy.name
                copies += 1
    return copies


def _convert(model, config: Fp16, blocked: set[str], use_ort_converter: bool):
    """One conversion of the (FP32) model with `blocked` nodes kept FP32; the input is not modified."""
    from onnxconverter_common import float16

    if use_ort_converter:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    else:
        DEFAULT_OP_BLOCK_LIST = float16.DEFAULT_OP_BLOCK_LIST  # noqa: N806
    op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(config.exclude_ops))
    with quiet_libraries():  # one warning per constant it rounds; the fidelity report says more
        model = _copy(model)
        _split_shared_initializers(model, blocked)
        if use_ort_converter:
            from onnxruntime.transformers.onnx_model import OnnxModel

            wrapped = OnnxModel(model)
            wrapped.convert_float_to_float16(
                keep_io_types=config.keep_io_types,
                op_block_list=op_block,
                node_block_list=sorted(blocked),
                max_finite_val=FP16_MAX,
            )
            converted = wrapped.model
        else:
            converted = float16.convert_float_to_float16(
                model,
                keep_io_types=config.keep_io_types,
                op_block_list=op_block,
                node_block_list=sorted(blocked),
                max_finite_val=FP16_MAX,
            )
    fixed = _fix_converter_casts(converted)
    if _remove_cast_round_trips(converted):
        fixed.append("removed FP32->FP16->FP32 cast round trips")
    return converted, fixed


# inputs that turn a zero into Inf/NaN: a denominator, a reciprocal, a logarithm
_ZERO_SENSITIVE = {"Div": (1,), "Reciprocal": (0,), "Log": (0,)}


def _overflow_in_fp32(model, stats: Mapping[str, tuple[float, bool, float]]) -> dict[str, str]:
    """From the FP32 run: nodes whose output leaves the FP16 range and nodes that read such a tensor;
    and nodes whose output underflows FP16 (non-zero values below 2^-24 flush to zero) where it feeds a
    denominator, reciprocal or logarithm, with that consumer (0/0 and 1/0 would follow in FP16)."""
    flagged: dict[str, str] = {}
    producer = {out: node.name for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        for name in node.output:
            if name in stats and stats[name][0] > FP16_MAX:
                flagged.setdefault(node.name, f"output {name} reaches {stats[name][0]:.4g} in FP32")
        for name in node.input:
            if name in stats and stats[name][0] > FP16_MAX:
                flagged.setdefault(node.name, f"reads {name}, which reaches {stats[name][0]:.4g} in FP32")
        for index in _ZERO_SENSITIVE.get(node.op_type, ()):
            name = node.input[index] if index < len(node.input) else ""
            if name in stats and stats[name][2] < FP16_TINY:
                flagged.setdefault(
                    node.name, f"{node.op_type} of {name}, which underflows FP16 ({stats[name][2]:.3g} in FP32)"
                )
                if name in producer:
                    flagged.setdefault(
                        producer[name],
                        f"output {name} underflows FP16 ({stats[name][2]:.3g}) and feeds {node.op_type} {node.name}",
                    )
    return flagged


def _first_non_finite(converted, source, fp16_stats, fp32_stats, blocked: Mapping[str, str]) -> dict[str, str]:
    """Nodes of the FP16 model where NaN/Inf first appears (clean inputs, non-finite output, finite in
    FP32), mapped back to original nodes: a Cast the converter inserted stands for the nodes it feeds;
    a node already kept FP32 stands for the producers of its inputs (their FP16 output underflowed)."""
    original_names = {n.name for n in source.graph.node}
    consumers: dict[str, list[str]] = {}
    producer: dict[str, str] = {}
    inputs_of: dict[str, list[str]] = {}
    for node in source.graph.node:
        inputs_of[node.name] = list(node.input)
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
        for name in node.output:
            producer[name] = node.name

    def bad(name: str) -> bool:
        if name not in fp16_stats or fp16_stats[name][1]:
            return False
        return name not in fp32_stats or fp32_stats[name][1]

    sources: dict[str, str] = {}
    for node in converted.graph.node:
        out_bad = [n for n in node.output if bad(n)]
        if not out_bad or any(bad(n) for n in node.input):
            continue
        if node.name in blocked:  # already FP32 and still NaN/Inf: a value underflowed upstream
            frontier, seen = list(inputs_of.get(node.name, [])), set()
            while frontier:  # the nearest FP16 ancestors
                tensor = frontier.pop()
                up = producer.get(tensor)
                if up is None or up in seen:
                    continue
                seen.add(up)
                if up in blocked:
                    frontier += inputs_of.get(up, [])
                else:
                    sources.setdefault(up, f"upstream of {node.name}, NaN/Inf even in FP32 (FP16 underflow)")
        elif node.name in original_names:
            sources.setdefault(node.name, f"output {out_bad[0]} turns NaN/Inf in FP16")
        else:  # a Cast inserted by the converter: keep the original consumers of its output in FP32
            for tensor in node.output:
                for consumer in consumers.get(tensor, []):
                    sources.setdefault(consumer, f"reads {tensor}, NaN/Inf after a cast to FP16")
    return sources


def _looks_like_transformer(model) -> bool:
    from dlopt.graphfacts import looks_like_transformer

    return looks_like_transformer(model)


# -- the stage ---------------------------------------------------------------------------------------
def convert_fp16(model, config: Fp16 = Fp16(), data: Iterable[Mapping[str, np.ndarray]] | None = None) -> StageResult:
    """Convert an onnx.ModelProto (never modified) to FP16, keeping in FP32 what FP16 cannot hold.

    `data`: an iterable of feeds (e.g. CalibrationData); without it, synthetic inputs are used for the
    overflow search, which finds only what those inputs trigger (the report says so)."""
    import onnx

    from dlopt.optimize.int4.graph import name_nodes
    from dlopt.targets import capabilities

    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"fp16 takes an onnx.ModelProto, not {type(model).__name__}", "load it with dlopt.fileio")
    started = time.perf_counter()
    source = _copy(model)
    name_nodes(source)  # fallback lists name nodes: unnamed ones get names, the 4-bit stage's rule
    names = {n.name for n in source.graph.node}
    check_excluded_nodes(config.exclude_nodes, names)
    if not any(t.data_type == onnx.TensorProto.FLOAT for t in source.graph.initializer) and not any(
        v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in source.graph.input
    ):
        raise InputError(
            "fp16: the model has no FP32 weights or inputs to convert", "it may already be FP16; give the FP32 model"
        )

    notes: list[str] = []
    feeds = take_samples(data, config.check_samples)
    if not feeds:
        feeds = model_feeds(
            source, count=min(config.check_samples, 2), overrides=parse_input_shapes(config.input_shapes)
        )
        notes.append("no calibration data: overflow checked on synthetic inputs only")

    fusion = None
    use_ort_converter = False
    wants_fusion = config.transformer_fusion == "on" or (
        config.transformer_fusion == "auto"
        and capabilities(config.target).fp16_native
        and _looks_like_transformer(source)
    )
    if wants_fusion:
        fused, fusion = _fuse_for_cuda(source)
        if fusion["fused"]:
            reference, fused_outs = _session(source), _session(fused)
            check = compare_sessions(reference, fused_outs, feeds[:2])
            if all(v.sqnr_db >= 60 for v in check.values()):  # fusions are exact up to float rounding
                source, use_ort_converter = fused, True
                fusion["fp32_check_sqnr_db"] = {k: v.sqnr_db for k, v in check.items()}
                name_nodes(source)
            else:
                notes.append(f"transformer fusion changed the FP32 outputs ({fidelity_report(check)}); not used")
                fusion = None
        else:
            notes.append("transformer fusion found nothing to fuse")
            fusion = None

    original_names = {n.name for n in source.graph.node}
    blocked: dict[str, str] = {n: "exclude_nodes" for n in config.exclude_nodes if n in original_names}
    fp32_stats = _scan(source, feeds)
    if config.auto_fallback:
        for name, why in _overflow_in_fp32(source, fp32_stats).items():
            blocked.setdefault(name, why)

    rounds = []
    cast_fixes: list[str] = []
    for round_index in range(config.max_rounds):
        converted, cast_fixes = _convert(source, config, set(blocked), use_ort_converter)
        fp16_stats = _scan(converted, feeds, exact_fp16=True)
        outputs_clean = all(
            fp16_stats.get(o.name, (0.0, True, 0.0))[1] or not fp32_stats.get(o.name, (0.0, True, 0.0))[1]
            for o in converted.graph.output
        )
        new = (
            {}
            if not config.auto_fallback
            else {
                k: v
                for k, v in _first_non_finite(converted, source, fp16_stats, fp32_stats, blocked).items()
                if k not in blocked
            }
        )
        rounds.append(
            {
                "round": round_index + 1,
                "fp32_nodes": len(blocked),
                "outputs_finite": outputs_clean,
                "new_fp32_nodes": sorted(new),
            }
        )
        if outputs_clean and not new:
            break
        if not new:
            break
        blocked.update(new)
    if not outputs_clean:
        bad = [o.name for o in converted.graph.output if not fp16_stats.get(o.name, (0.0, True, 0.0))[1]]
        hint = (
            "set auto_fallback=True"
            if not config.auto_fallback
            else "keep more of the model in FP32 with exclude_ops/exclude_nodes, or use int8"
        )
        raise StageError(f"fp16: outputs {bad} are NaN/Inf on the data after {len(rounds)} rounds", hint)

    reference, candidate = _session(model), _session(converted)
    report: dict[str, Any] = {
        "stage": "fp16",
        "config": config_to_dict(config),
        "converter": "onnxruntime.transformers float16 (after fusion)"
        if use_ort_converter
        else "onnxconverter-common float16",
        "fusion": fusion,
        "bytes_before": model.ByteSize(),
        "bytes_after": converted.ByteSize(),
        "fp32_nodes": dict(sorted(blocked.items())),
        "rounds": rounds,
        "fp16_check": "onnx reference evaluator (every op computed in FP16)"
        if fp16_stats["__exact__"][1]
        else "onnxruntime CPU (computes FP16 nodes in float: the FP32 range scan is what finds overflow)",
        "cast_fixes": cast_fixes,
        "fidelity": {"samples": len(feeds), "outputs": fidelity_report(compare_sessions(reference, candidate, feeds))},
        "notes": notes,
    }
    if not capabilities(config.target).fp16_native and not use_ort_converter:
        report["notes"].append(
            f"target {config.target} has no native FP16 kernels: FP16 mainly pays on GPUs; on "
            "CPUs ONNX Runtime often runs it slower than FP32"
        )
    report["seconds"] = round(time.perf_counter() - started, 2)
    return StageResult(converted, report)


__all__ = ["FP16_MAX", "Fp16", "convert_fp16"]
