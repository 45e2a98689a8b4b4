"""The human summary `dlopt quantize` prints from a report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dlopt.optimize.quantize.heldout import feed_description


def quantize_text(report: Mapping[str, Any]) -> str:
    """The human summary every run prints."""
    from dlopt.tables import format_table

    lines = [
        f"size: {report['bytes_before'] / 1e6:.2f} MB -> {report['bytes_after'] / 1e6:.2f} MB "
        f"({report['bytes_before'] / max(report['bytes_after'], 1):.2f}x smaller)"
    ]
    recipe = report.get("recipe")
    if recipe:
        lines.append(
            f"recipe: int8 {recipe['mode']} ({recipe['quant_format']}), activations {recipe['activation_type']},"
            f" weights {recipe['weight_type']} {'per-channel' if recipe['per_channel'] else 'per-tensor'}"
            f"{', reduce_range' if recipe['reduce_range'] else ''}"
            f"{', calibration ' + recipe['method'] if recipe['mode'] == 'static' else ''}"
            f"{', GPTQ rounding' if recipe.get('weight_rounding') == 'gptq' else ''}"
            f"{', bias correction' if recipe.get('bias_correction') else ''}"
        )
        lines += [f"  - {r}" for r in recipe["reasons"]]
    elif report.get("precision") == "int4" and report.get("layers"):
        lines += _int4_recipe_lines(report)
    else:
        lines.append(f"recipe: {report.get('precision')}")
    for step in (report.get("normalization") or {}).get("steps", []):
        state = "applied" if step["applied"] else f"not applied ({step.get('reason', '')})"
        lines.append(
            f"graph normalization {step['step']}: {state}"
            + (f" ({step['moved']} tensors)" if step["applied"] and "moved" in step else "")
            + (f" (opset {step['from']} -> {step['to']})" if step["applied"] and "to" in step else "")
        )
    pre = report.get("preprocess")
    if pre:
        for step in pre["steps"]:
            state = "applied" if step["applied"] else f"skipped ({step.get('reason', '')})"
            extra = f" {step['fused']}" if step.get("fused") else ""
            lines.append(f"pre-processing {step['step']}: {state}{extra}")
    wo = report.get("weight_only")
    if wo:
        lines.append(
            f"weight-only int8 ({'per-channel' if wo['per_channel'] else 'per-tensor'}): {wo['weights']} "
            f"weights of {', '.join(f'{k} {v}' for k, v in wo['nodes'].items())}, "
            f"{wo['float_bytes'] / 1e6:.2f} MB -> {wo['int8_bytes'] / 1e6:.2f} MB; compute stays float"
        )
    q = report.get("quantized_nodes", {})
    lines.append("quantized nodes: " + (", ".join(f"{k} {v}" for k, v in q.items()) or "none"))
    if report.get("nodes_excluded"):
        lines.append(f"kept in float: {', '.join(report['nodes_excluded'])}")
    for mixed in report.get("mixed_range_outputs") or []:
        lines.append(f"mixed-range output: {mixed['why']} (float: {', '.join(mixed['kept_float'])})")
    forms = report.get("node_forms")
    if forms:
        lines.append(f"node forms: {forms['decision']}")

        def us(value) -> str:
            return "-" if value is None else f"{value:.0f}"

        rows = [
            [
                k,
                len(t["nodes"]),
                us(t["float_us"]),
                us(t["int8_us"]),
                "-" if t["ratio"] is None else f"{t['ratio']:.2f}",
                f"{t['ci'][0]:.2f}-{t['ci'][1]:.2f}" if t.get("ci") else "-",
                t.get("source", "timed"),
                "float" if forms["kept"] and k in forms["float_classes"] else "int8",
            ]
            for k, t in forms["classes"].items()
        ]
        if rows:
            lines.append(
                format_table(
                    [
                        "node class",
                        "nodes",
                        "float us",
                        "int8 us",
                        "int8/float",
                        "float speed-up CI",
                        "decided",
                        "runs as",
                    ],
                    rows,
                )
            )
    kernels = report.get("kernel_choice")
    if kernels and kernels["sites"]:
        lines.append(f"kernel choice: {kernels['decision']}")

    def fidelity_table(outputs: Mapping[str, Mapping[str, Any]]) -> str:
        rows = [
            [name, m["sqnr_db"], m["cosine_mean"], m["cosine_min"], m.get("top1_agreement", "-")]
            for name, m in outputs.items()
        ]
        return format_table(["output", "SQNR dB", "cos mean", "cos min", "top-1 agree"], rows)

    fid = report.get("fidelity")
    if fid:
        lines.append(f"fidelity vs FP32 on {fid['samples']} {fid['data']} samples{_holdout_text(report)}:")
        lines.append(fidelity_table(fid["outputs"]))
        for name, m in fid["outputs"].items():
            if m.get("sqnr_db_by_group"):
                lines.append(
                    f"  {name} SQNR by channel group: "
                    + ", ".join(f"{g} {_number(v)} dB" for g, v in m["sqnr_db_by_group"].items())
                )
        task = fid.get("task_metric")
        if task is not None:
            parts = ", ".join(
                f"{k} {_number(v)}"
                for k, v in task["components"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
            lines.append(
                f"task metric: {task['metric']} = {_number(task['value'])} (floor {_number(task['floor'])})"
                f"{'; ' + parts if parts else ''}; chosen because {task['why']}"
                + (f"; {task['note']}" if task.get("note") else "")
            )
            bounds = task.get("uncertainty")
            if bounds:
                lines.append(
                    f"  on other samples of the kind ({bounds['method']}): "
                    + ", ".join(
                        f"{task['judged_by'] if k == 'value' else k} {_number(e['estimate'])}, "
                        f"{2 * bounds['confidence'] - 1:.0%} interval [{_number(e['interval'][0])}, "
                        f"{_number(e['interval'][1])}]"
                        for k, e in bounds["checks"].items()
                    )
                    + f"; the verdict judges the one-sided {bounds['confidence'] * 100:g}% bound"
                    + (
                        " (raised: floor recovery compared its candidates on these samples)"
                        if report.get("floor_recovery")
                        else ""
                    )
                )
    exact = report.get("fidelity_exact_arithmetic")
    if exact:
        lines.append(f"note: {exact['why']}:")
        lines.append(fidelity_table(exact["outputs"]))
    speed = report.get("speed_check")
    if speed:
        ci = speed.get("speedup_ci")
        figure = (
            f"{speed['speedup']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}] ({speed.get('confidence', 0.95):.0%} CI)"
            if ci
            else f"{speed['speedup']:.2f}x"
        )
        rough = "rough figure, " if speed.get("rough") or not ci else ""
        lines.append(
            f"speed (quick check: {rough}{speed['rounds']} rounds of dlopt bench's sampler, inputs "
            f"{feed_description(speed['input_shapes'], speed.get('padding'))}, one thread, thread CPU time, "
            f"{report.get('cpu_label', 'this CPU')}): {speed['float_ms']:.3g} ms FP32 -> "
            f"{speed['quantized_ms']:.3g} ms, {figure}"
            f"{' (slower than FP32 on this CPU)' if speed['speedup'] < 0.95 else ''}; "
            "dlopt bench measures longer, batch sizes and real data"
        )
    session = report.get("session")
    if session:
        entries = ", ".join(f"{k}={v}" for k, v in session["session_config"].items())
        lines.append(f"sessions: {entries}; denormals {session['denormals']}")
    budget = report.get("budget")
    if budget:
        lines.append(
            f"accuracy budget ({budget['evaluator']}): FP32 {budget['baseline']:.4f}, allowed drop "
            f"{budget['max_drop']}: {'met' if budget['met'] else 'NOT met'}"
        )
        rows = [
            [
                c["excluded_count"],
                c["score"],
                c["drop"],
                c["latency_ms"],
                c["bytes"] / 1e6,
                "yes" if c["within_budget"] else "no",
                "<-" if c.get("chosen") else "",
            ]
            for c in budget["candidates"]
        ]
        lines.append(format_table(["float nodes", "score", "drop", "ms (1 thread)", "MB", "in budget", "chosen"], rows))
    recovery = report.get("floor_recovery")
    if recovery:
        lines.append(
            f"below the fidelity floor: nodes kept in float until the {recovery['evaluator']} reached "
            f"{recovery['baseline']:g}: {'met' if recovery['met'] else 'NOT met'}"
        )
        rows = [
            [
                c["excluded_count"],
                c["score"],
                c["latency_ms"],
                "yes" if c["within_budget"] else "no",
                "<-" if c.get("chosen") else "",
            ]
            for c in recovery["candidates"]
        ]
        lines.append(format_table(["float nodes", "margin over floor", "ms (1 thread)", "meets floor", "chosen"], rows))
    v = report.get("verdict")
    if v:
        floor = f"fidelity floor: every float output >= {v['floor_sqnr_db']:g} dB SQNR on the {v['data']} samples"
        if v.get("metric") is not None and v.get("judged_by") != "sqnr":
            from dlopt.metrics import higher_is_better  # the metric table's direction (probability: <= its floor)

            direction = ">=" if higher_is_better(v["metric"]) is not False else "<="
            decided = " decides" if v.get("decided_by") == "bound" else ""
            bound = (
                f" (one-sided {v['confidence'] * 100:g}% bound {_number(v['metric_bound'])}{decided})"
                if v.get("metric_bound") is not None
                else ""
            )
            floor = (
                f"fidelity floor: {v['metric']} {_number(v['metric_value'])}{bound} {direction} "
                f"{v['metric_floor']:g} on the {v['samples']} {v['data']} samples"
            )
        elif v.get("metric") not in (None, "sqnr"):
            floor += f" ({v['metric']} could not be judged on these samples)"
        if v["passed"]:
            lines.append(
                f"{floor}: met"
                + (f" (kept in float to get there: {', '.join(v['recovered_nodes'])})" if v["recovered_nodes"] else "")
            )
            if v.get("confirmed") is False:  # the estimate decided and clears the floor; its bound does not
                lines.append(
                    f"note: not confirmed at {v['confidence'] * 100:g}%: on other samples of the kind it may read as "
                    f"low as {_number(v['metric_bound'])}; more held-out samples (--eval-data, --eval-samples) "
                    "narrow the bound, and --strict-verdict refuses a model whose bound is below the floor"
                )
        else:
            lines.append(f"{floor}: FAILED")
            lines.append(
                format_table(
                    ["check", "measured", "required", "why"],
                    [[f["check"], f["measured"], f["required"], f["why"]] for f in v["failures"]],
                )
            )
    return "\n".join(lines)


def _int4_recipe_lines(report: Mapping[str, Any]) -> list[str]:
    """int4's recipe line says how many linear layers are 4-bit, and each one that is not, and why: a
    model whose only linear layer stayed 8-bit must not read as an int4 model."""
    layers, fields = report["layers"], (report.get("scheme") or {}).get("config", {}).get("fields", {})
    four, total = layers["four_bit"], layers["linear"]
    grid = (
        f"{report.get('algorithm', '')}, blocks of {fields['block_size']}, "
        f"{'symmetric' if fields.get('symmetric') else 'asymmetric'}"
        if fields
        else report.get("algorithm", "")
    )
    tables = len(report.get("embeddings_quantized") or [])
    lines = [
        f"recipe: int4 weight-only ({grid}): {four} of {total} linear layer{'s' if total != 1 else ''} at 4 bits"
        + (f", {tables} embedding table{'s' if tables != 1 else ''} at 4 bits" if tables else "")
    ]
    for entry in layers["kept"]:
        bits = "8 bits" if entry["bits"] == 8 else "float"
        lines.append(f"  - kept at {bits}: {entry['node']}, {entry['why']}")
    if four == 0:
        lines.append(
            "  no linear layer is 4-bit, so this is not a 4-bit model; a recipe stage "
            '(kind = "int4-weight-only" with keep_last = 0, keep_first = 0 or sensitive_fraction = 0, '
            "as the reasons above say) puts those layers at 4 bits"
        )
    return lines


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _holdout_text(report: Mapping[str, Any]) -> str:
    held = report.get("holdout") or {}
    indices = held.get("held_out_indices") or []
    if held.get("data") == "held-out" and indices:
        return (
            f" (samples {indices[0]}-{indices[-1]} of {held['source']}, held out: calibrated on the first "
            f"{held['calibration_samples']})"
        )
    if held.get("data") == "eval-data":
        return f" ({held['source']}; not used to calibrate)"
    return ""
