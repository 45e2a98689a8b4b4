"""The entry point: `quantize` runs a scheme (or resolves a `quantize` request to one) on a model, with
normalization, pre-processing, the accuracy budget, recovery below the floor and the kernel choices."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from dlopt.data import CalibrationData
from dlopt.errors import InputError
from dlopt.optimize.int4 import Int4WeightOnly
from dlopt.optimize.normalize import NormalizeConfig, normalize
from dlopt.optimize.preprocess import PreprocessConfig, check_feeds, preprocess
from dlopt.optimize.quantize.heldout import (
    fidelity_floor,
    fidelity_sample_count,
    quantize_summary,
    split_holdout,
    verdict,
    warn_if_slower,
)
from dlopt.optimize.quantize.int8 import check_exclusions, quantize_int8
from dlopt.optimize.quantize.int8_recipe import Int8Recipe, choose_recipe, host_kernels_inexact, resolve_scheme
from dlopt.optimize.quantize.schemes import (
    RECOVERY_MAX_FLOAT_SHARE,
    SCHEME_KINDS,
    Int8Scheme,
    Int8Static,
    QuantizeConfig,
    Scheme,
    selection_confidence,
    validate_config,
)
from dlopt.optimize.quantize.smoothquant import smooth_activations
from dlopt.optimize.quantize_scheme import QuantizeScheme
from dlopt.runtime import initialize as initialize_runtime
from dlopt.stage import StageResult, config_to_dict


# -- the entry point --------------------------------------------------------------------------------------
def quantize(
    model,
    config: Scheme | QuantizeConfig = QuantizeConfig(),
    data: CalibrationData | None = None,
    *,
    eval_data: CalibrationData | None = None,
    progress: bool = False,
    log=lambda message: None,
) -> StageResult:
    """Quantize an onnx.ModelProto (never modified) with a scheme config (Int8Dynamic, Int8Static,
    Int8WeightOnly, Int4WeightOnly, Fp16), or a `quantize` request (QuantizeConfig) that resolves to
    one here, for this model and the data at hand. The report holds the scheme (`report["scheme"]`:
    which one, and why), the recipe, sizes, quantized nodes by op type, fidelity against the float model
    on samples held out from calibration (`eval_data` when given, else the last samples of `data`) and
    the verdict: whether every float output is at or above the fidelity floor (and a budget, if any,
    was met), with the nodes kept in float to get there (int8). A failed verdict is reported, not
    raised: `report['verdict']['passed']`; quantize_file and the CLI act on it."""
    if isinstance(config, QuantizeConfig):
        validate_config(config)
    elif type(config) not in SCHEME_KINDS:
        raise InputError(
            f"quantize takes a scheme config or a QuantizeConfig, not {type(config).__name__}",
            f"use one of {', '.join(c.__name__ for c in SCHEME_KINDS)}",
        )
    evaluator = getattr(config, "evaluator", None)
    if evaluator and ".py:" in evaluator:  # the user's metric: a missing or broken file fails before any work
        from dlopt.metrics import load_evaluator

        load_evaluator(evaluator)
    if config.trim_padding == "on":  # said before the quantization's minutes, not after them
        from dlopt.optimize.trim_padding import plan

        reason = plan(model).reason
        if reason:
            raise InputError(f"--trim-padding on: {reason}", "use --trim-padding auto or off for this model")
    decisions = _decision_store(config)  # a report to replay is read before any work
    started = time.perf_counter()
    # before ORT's own sessions (its calibrator, its transformer optimizer), which would otherwise be the
    # process's first and leave denormals unflushed on this thread for the checks and timings below
    initialize_runtime()
    if isinstance(data, CalibrationData):
        data.bind(model)
        if config.calibration_samples is not None:
            data.limit = min(data.limit or config.calibration_samples, config.calibration_samples)
    if isinstance(eval_data, CalibrationData):
        eval_data.bind(model)
    data, held_out, holdout = split_holdout(data, eval_data, config, fidelity_sample_count(model, config))
    if holdout["warning"]:
        log(f"warning: {holdout['warning']}")
    request = config if isinstance(config, QuantizeConfig) else None
    reasons: tuple[str, ...] = ()
    if isinstance(config, QuantizeConfig):
        config, reasons = resolve_scheme(config, model, has_data=data is not None)
    scheme = {
        "kind": SCHEME_KINDS[type(config)],
        "config": config_to_dict(config),
        "resolved_from": "quantize" if request is not None else None,
        "reasons": list(reasons),
    }
    if request is not None and config.precision != "int8":
        log(f"scheme: {scheme['kind']} ({reasons[0]})")
    floor = fidelity_floor(config)
    check_exclusions(model, config)
    if not isinstance(config, Int8Scheme):
        source = model
        if isinstance(config, Int4WeightOnly):  # MatMulNBits too quantizes initializers only: no opset 13 needed
            from dlopt.optimize.int4 import quantize_int4

            source = normalize(model, NormalizeConfig(min_opset=0, input_shapes=config.input_shapes), data).model
            result = quantize_int4(source, config, data)
        else:
            from dlopt.optimize.fp16 import convert_fp16

            result = convert_fp16(source, config, data)
        report = {
            **{k: v for k, v in result.report.items() if k != "config"},
            "precision": config.precision,
            "config": config_to_dict(request or config),
            "scheme": scheme,
        }
        result_model, report["kernel_choice"] = _choose_kernels(result.model, config, log, decisions)
        result_model, report["trim_padding"] = _trim_padding(model, result_model, config, held_out, data, log)
        report.update(quantize_summary(model, result_model, data, config, feeds=held_out, holdout=holdout))
        report["verdict"] = verdict(report, floor)
        warn_if_slower(report, log)
        return StageResult(result_model, report)

    check_exclusions(model, config)
    # Constant-node weights to initializers, opset >= 13: what ORT's quantizers assume, each step checked
    normalized = normalize(model, NormalizeConfig(input_shapes=config.input_shapes), data)
    if normalized.report["steps"]:
        log(
            "graph normalization: "
            + ", ".join(s["step"] + ("" if s["applied"] else " (not applied)") for s in normalized.report["steps"])
        )
    recipe = choose_recipe(
        normalized.model,
        config,
        has_data=data is not None,
        normalization=normalized.report,
        mode_reason=reasons[0] if reasons else None,
    )
    for reason in recipe.reasons:
        log(f"recipe: {reason}")
    prepared, pre_report = normalized.model, None
    if config.preprocess:
        log(
            "pre-processing: "
            + ("transformer fusions, " if recipe.fuse_transformer else "")
            + "constant folding, shape inference (each checked against its input)"
        )
        pre = preprocess(
            prepared,
            PreprocessConfig(
                transformer_fusion="auto" if recipe.fuse_transformer else "off",
                gemm_to_matmul=recipe.mode == "dynamic",
                input_shapes=config.input_shapes,
            ),
            data,
        )
        prepared, pre_report = pre.model, pre.report
        check_exclusions(prepared, config)  # a fusion may have absorbed an excluded node
    fusion_report = None
    if config.preprocess and config.fuse_activations:
        prepared, fusion_report = _fuse_activations(prepared, config, recipe, data, log)
        if recipe.mode == "static" and config.per_channel:
            prepared, fusion_report["equalization"] = _equalize_hardswish(prepared, config, data, log)
    smooth_report = None
    if recipe.smoothing is not None and data is not None:
        log(f"SmoothQuant: measuring activation ranges on {config.smoothing_samples} samples")
        prepared, smooth_report = smooth_activations(
            prepared, data, alpha=recipe.smoothing, samples=config.smoothing_samples, exclude=config.exclude_nodes
        )
    quantized, details = quantize_int8(prepared, config, recipe, data, progress=progress)
    ranges = details.pop("ranges")
    layer_stats = details.pop("layer_stats")
    from dlopt.optimize.accuracy_budget import floor_evaluator, meet_budget

    budget = None
    if config.max_accuracy_drop is not None:
        budget = meet_budget(
            model,
            prepared,
            quantized,
            config,
            recipe,
            data,
            ranges=ranges,
            layer_stats=layer_stats,
            eval_feeds=held_out,
            log=log,
        )
        quantized = budget.pop("model")
        details["nodes_excluded"] = budget["chosen"]["excluded"]
    exact = host_kernels_inexact(recipe)
    recovery = None
    judged = config  # the config the verdict reads: its confidence raised where recovery compared candidates
    if config.recover:
        # the floor, on the held-out samples, in the arithmetic the target runs (see quantize_summary)
        feeds = held_out or check_feeds(model, data, fidelity_sample_count(model, config), config.input_shapes)
        evaluator = floor_evaluator(model, feeds, config, graph_opt_level="disable" if exact else "all", selected=False)
        score = evaluator.score(quantized)
        if score < 0:
            log(
                f"fidelity: {evaluator.name.split(' margin')[0]} is {-score:.3g} below its floor on {len(feeds)} "
                f"{holdout['data']} samples: keeping the nodes that add the most noise in float until it holds"
            )
            # the candidates are compared on these samples: each is judged at the confidence their number leaves,
            # and so is the verdict on the one kept (RECOVERY_COMPARISONS)
            judged = dataclasses.replace(config, verdict_confidence=selection_confidence(config.verdict_confidence))
            evaluator = floor_evaluator(model, feeds, judged, graph_opt_level="disable" if exact else "all")
            base = dataclasses.replace(config, exclude_nodes=tuple(details["nodes_excluded"]))
            recovery = meet_budget(
                model,
                prepared,
                quantized,
                base,
                recipe,
                data,
                ranges=ranges,
                layer_stats=layer_stats,
                evaluator=evaluator,
                max_drop=0.0,
                max_float_share=RECOVERY_MAX_FLOAT_SHARE,
                log=log,
            )
            quantized = recovery.pop("model")
            details["nodes_excluded"] = recovery["chosen"]["excluded"]
    node_forms = None
    if isinstance(config, Int8Static) and recipe.mode == "static" and _timed_here(config.target):
        quantized, node_forms = _choose_node_forms(
            prepared, quantized, config, recipe, data, ranges, layer_stats, details, log, decisions
        )
    report = {
        "precision": "int8",
        "config": config_to_dict(request or config),
        "scheme": scheme,
        "recipe": dataclasses.asdict(recipe) | {"reasons": list(recipe.reasons)},
        "normalization": normalized.report,
        "preprocess": pre_report,
        "activation_fusion": fusion_report,
        "smoothing": smooth_report,
        **details,
    }
    if budget is not None:
        report["budget"] = budget
    if recovery is not None:
        report["floor_recovery"] = recovery
    if node_forms is not None:
        report["node_forms"] = node_forms
    quantized, report["kernel_choice"] = _choose_kernels(quantized, config, log, decisions)
    quantized, report["gelu_form"] = _choose_gelu_form(model, quantized, config, held_out, data, log, decisions)
    quantized, report["trim_padding"] = _trim_padding(model, quantized, config, held_out, data, log)
    report.update(
        quantize_summary(
            model,
            quantized,
            data,
            judged,
            feeds=held_out,
            holdout=holdout,
            exact_arithmetic=exact,
            selected=recovery is not None,
        )
    )
    if "fidelity_exact_arithmetic" in report:
        log(f"note: {report['fidelity_exact_arithmetic']['why']}")
    report["verdict"] = verdict(report, floor)
    warn_if_slower(report, log)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return StageResult(quantized, report)


def _decision_store(config):
    """Where the timed kernel choices come from: the report named by --node-forms / --layernorm
    (FILE.quantize.json, replayed without timing), else the decision cache (dlopt.optimize.kernel_decisions)."""
    from dlopt.optimize.kernel_decisions import DecisionStore, is_replay, load_replay

    named = [v for v in (getattr(config, "node_forms", "auto"), config.layernorm_form) if is_replay(v)]
    if not named:
        return DecisionStore()
    return DecisionStore(replay=load_replay(named[0]), replay_source=named[0])


def _choose_node_forms(
    prepared,
    quantized,
    config: Int8Static,
    recipe: Int8Recipe,
    data,
    ranges,
    layer_stats,
    details: dict[str, Any],
    log,
    decisions,
) -> tuple[Any, dict[str, Any]]:
    """INT8 or float per node class, timed here or replayed (dlopt.optimize.kernel_choice.choose_node_forms).
    Speed decides only where accuracy allows: nodes the accuracy budget kept float stay float, and speed
    can only add float nodes (a float node computes what the source computes)."""
    from dlopt.optimize.kernel_choice import NodeFormConfig, choose_node_forms

    excluded = list(details.get("nodes_excluded") or [])
    requantized: dict[str, Any] = {}

    def requantize(names: list[str]):
        model, more = quantize_int8(
            prepared, config, recipe, data, exclude_nodes=excluded + names, ranges=ranges, layer_stats=layer_stats
        )
        requantized.update({k: v for k, v in more.items() if k not in ("ranges", "layer_stats")})
        return model

    feeds = check_feeds(prepared, data, 1)[0]
    result = choose_node_forms(
        prepared, quantized, feeds, requantize, NodeFormConfig(forms=config.node_forms), store=decisions
    )
    if result.report["classes"] or config.node_forms == "int8":
        log(f"node forms: {result.report['decision']}")
    if result.report["kept"]:
        details.update(requantized)  # shielded nodes, weight refinement: those of the model kept
        details["nodes_excluded"] = sorted(set(excluded) | set(result.report["float_nodes"]))
    if config.node_forms == "int8":
        return result.model, result.report
    # an RGB stem's 3 input channels keep ORT off its symmetric int8 conv kernel: padded to 4 where that
    # times faster here (exact: zero channel, zero weights); its decision is replayed with the others
    from dlopt.optimize.pad_channels import choose_channel_padding, summary_line

    padding = choose_channel_padding(result.model, feeds, store=decisions)
    line = summary_line(padding.report)
    if line:
        log(line)
    report = dict(result.report)
    report["channel_padding"] = padding.report
    report["decisions"] = list(report.get("decisions", [])) + padding.report["decisions"]
    return padding.model, report


def _choose_kernels(model, config: QuantizeScheme, log, decisions) -> tuple[Any, dict[str, Any] | None]:
    """Equivalent graph forms timed on this host (or replayed), only for a target whose kernels run here
    (cpu): a phone or a GPU runs other kernels than the ones measurable here."""
    if not _timed_here(config.target):
        return model, None
    from dlopt.optimize.kernel_choice import KernelChoiceConfig, choose_layernorm_form
    from dlopt.optimize.kernel_decisions import is_replay

    # a report (named by --layernorm or --node-forms) is replayed by `decisions`; fused/unfused are as asked
    form = "auto" if is_replay(config.layernorm_form) else config.layernorm_form
    result = choose_layernorm_form(model, KernelChoiceConfig(layernorm=form), store=decisions)
    if result.report["sites"]:
        log(f"kernel choice: {result.report['decision']}")
    return result.model, result.report


def _choose_gelu_form(
    source, model, config: QuantizeScheme, held_out, data, log, decisions
) -> tuple[Any, dict[str, Any] | None]:
    """GELU's tanh form (FastGelu) where it times faster here (or is replayed) and keeps the fidelity to
    the float source on the held-out samples (dlopt.optimize.gelu_form); only where the target's kernels
    run here."""
    if not _timed_here(config.target):
        return model, None
    from dlopt.inputs import take_samples
    from dlopt.optimize.gelu_form import GeluFormConfig, choose_gelu_form

    feeds = held_out or take_samples(data, config.fidelity_samples)
    result = choose_gelu_form(model, GeluFormConfig(), reference=source, feeds=feeds, store=decisions)
    if result.report["sites"]:
        log(f"GELU form: {result.report['decision']}")
    return result.model, result.report


def _fuse_activations(model, config, recipe: Int8Recipe, data, log) -> tuple[Any, dict[str, Any]]:
    """Decomposed hard-swish, SiLU and GELU as single ops before calibration (dlopt.optimize.fuse_activations),
    each kind checked against the unfused graph on the calibration data."""
    from dlopt.optimize.fuse_activations import FuseActivations, fuse_activations, summary_line

    result = fuse_activations(
        model, FuseActivations(static_int8=recipe.mode == "static", input_shapes=config.input_shapes), data
    )
    line = summary_line(result.report)
    if line:
        log(line)
    check_exclusions(result.model, config)  # a fusion may have absorbed an excluded node
    return result.model, result.report


def _equalize_hardswish(model, config, data, log) -> tuple[Any, dict[str, Any]]:
    """Per-tensor activation scales lose the small channels of a BatchNorm-folded backbone: each Conv ->
    hard-swish -> depthwise Conv site has its channel ranges equalized (dlopt.optimize.equalize_hardswish),
    checked against the float graph on the calibration data. Static INT8 with per-channel weights only
    (they absorb the rescaled filters exactly)."""
    from dlopt.optimize.equalize_hardswish import EqualizeHardSwish, equalize_hardswish, summary_line

    result = equalize_hardswish(model, EqualizeHardSwish(input_shapes=config.input_shapes), data)
    line = summary_line(result.report)
    if line:
        log(line)
    return result.model, result.report


def _trim_padding(source, model, config: QuantizeScheme, held_out, data, log) -> tuple[Any, dict[str, Any]]:
    """Padding removal on the quantized model (dlopt.optimize.trim_padding), checked on the held-out samples
    (else samples of the calibration data) padded: the float source must not depend on the padding, and
    the quantized model must keep its fidelity to the source once trimmed. Last,
    because its prefix comes before every node: the fidelity and speed checks below see the final model."""
    from dlopt.inputs import take_samples
    from dlopt.optimize.trim_padding import TrimPadding, summary_line, trim_padding

    samples = held_out or take_samples(data, config.fidelity_samples)
    result = trim_padding(model, TrimPadding(mode=config.trim_padding), samples, reference=source)
    line = summary_line(result.report)
    if line:
        log(line)
    return result.model, result.report


def _timed_here(target: str) -> bool:
    """Whether this host runs target's own kernels, so that forms timed here are the target's (cpu)."""
    from dlopt.targets import capabilities

    return capabilities(target).kernels_measurable_here
