"""The bundle's README.md (a model card) and the summary table `dlopt package` prints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlopt.manifest import SAMPLES_NAME
from dlopt.tables import format_markdown_table, format_table


def _loading_section(m: Mapping[str, Any]) -> list[str]:
    """How to load the model with the session configuration it was checked and measured with, in Python
    and C++, and why the process's first session matters (see dlopt.runtime)."""
    model = m["model"]
    recommended = m["runtime"].get("recommended_session") or {
        "session_config": model["session_config"],
        "intra_op_num_threads": 1,
        "inter_op_num_threads": 1,
    }
    entries = recommended["session_config"]
    threads = recommended["intra_op_num_threads"]
    python = "".join(f'\nso.add_session_config_entry("{k}", "{v}")' for k, v in entries.items())
    cpp = "".join(f'\nso.AddConfigEntry("{k}", "{v}");' for k, v in entries.items())
    lines = [
        "## Loading",
        "",
        f"Recommended session configuration (threads {threads}, one inter-op thread): "
        + ", ".join(f"`{k}={v}`" for k, v in entries.items())
        + ".",
        "",
        "```python",
        "import onnxruntime as ort",
        "so = ort.SessionOptions()",
        f"so.intra_op_num_threads = {threads}" + python,
        f'session = ort.InferenceSession("{model["file"]}", so)',
        "```",
        "",
        "```cpp",
        "#include <onnxruntime_cxx_api.h>",
        "Ort::Env env;",
        "Ort::SessionOptions so;",
        f"so.SetIntraOpNumThreads({threads});" + cpp,
        f'Ort::Session session(env, ORT_TSTR("{model["file"]}"), so);',
        "```",
        "",
    ]
    if "session.set_denormal_as_zero" in entries:
        lines += [
            "`session.set_denormal_as_zero` flushes denormal floats to zero (padded inputs make Softmax produce "
            "them, and each costs a slow microcode assist on x86). ONNX Runtime applies it to the session's "
            "intra-op pool threads, but to the thread that creates sessions only once per process, from the "
            "**first** session created: make this session (or a tiny one with the same entry) the process's "
            "first, and call `run()` from that thread. With one intra-op thread the calling thread does all "
            "the work. On threads of your own, set the MXCSR bits yourself (C++: "
            "`_MM_SET_FLUSH_ZERO_MODE(_MM_FLUSH_ZERO_ON); _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_ON);`).",
            "",
        ]
    return lines


def model_card(manifest: Mapping[str, Any], coverage_report_path: Path | None = None) -> str:
    """README.md of a bundle: what it is, how to load it, how it was checked, how fast it ran where."""
    m = manifest
    model = m["model"]
    lines = [
        f"# {m['name']} ({m['target']} bundle)",
        "",
        f"Built by dlopt {m['dlopt_version']} on {m['created']} from `{m['source']['file']}` "
        f"(sha256 `{m['source']['sha256'][:16]}…`). Check it with `dlopt verify <this folder>`.",
        "",
    ]
    if m.get("signature"):
        lines += [
            f"Signed: `{m['signature']['file']}` holds an Ed25519 signature of `manifest.json` by the key with "
            f"fingerprint `{m['signature']['key_fingerprint']}`; check who signed it with "
            "`dlopt verify <this folder> --trusted-key KEY.pub`.",
            "",
        ]
    lines += ["## Files", ""]
    lines.append(
        f"- `{model['file']}`: the model ({model['format'].upper()} format"
        + (
            f", ORT format version {m['runtime']['ort_format_version']}, {model['optimization_style']} "
            f"optimization style for the {model['intended_ep']} EP"
            if model["format"] == "ort"
            else ""
        )
        + f"), written with ONNX Runtime {m['runtime']['onnxruntime']}."
    )
    if model.get("operators_config"):
        lines.append(
            f"- `{model['operators_config']}`: operators for a minimal ONNX Runtime build "
            "(`--minimal_build --include_ops_by_config`)."
        )
    for art in m["artifacts"]:
        lines.append(f"- `{art['file']}`: ExecuTorch program, {art['backend']} backend, {art['precision']}.")
    lines += [
        f"- `{SAMPLES_NAME}`: sample inputs and the source model's outputs on them.",
        "- `coverage.json`: NNAPI / CoreML coverage." if m["coverage"] else "",
        "",
    ]
    lines += [
        "## Inputs and outputs",
        "",
        format_markdown_table(
            ["", "name", "dtype", "shape"],
            [["input", t["name"], t["dtype"], t["shape"]] for t in m["inputs"]]
            + [["output", t["name"], t["dtype"], t["shape"]] for t in m["outputs"]],
        ),
        "",
    ]
    opsets = ", ".join(f"{k} {v}" for k, v in m["opset"].items())
    lines += [f"Opsets: {opsets}.", ""]
    lines += _loading_section(m)
    lines += [
        "## Verification",
        "",
        f"Checked against the source ONNX model on {m['verification']['samples']} sample(s) before the bundle "
        "was written:",
        "",
        format_markdown_table(
            ["artifact", "output", "criterion", "max abs diff", "SQNR dB", "top-1 agree", "ok"],
            [
                [
                    c["artifact"],
                    c["output"],
                    _criterion_text(c["criterion"]),
                    c.get("max_abs_diff", float("nan")),
                    _num(c.get("sqnr_db")),
                    _num(c.get("top1_agreement")),
                    c["passed"],
                ]
                for c in m["verification"]["checks"]
            ],
        ),
        "",
    ]
    if m["coverage"]:
        lines += [
            "## NNAPI / CoreML coverage",
            "",
            format_markdown_table(
                ["EP", "supported nodes", "%", "partitions", "unsupported ops", "verdict"],
                [
                    [
                        ep,
                        f"{c['supported_nodes']}/{c['nodes']}",
                        c["supported_pct"],
                        c["partitions"],
                        ", ".join(c["unsupported_ops"]) or "-",
                        c["verdict"],
                    ]
                    for ep, c in m["coverage"]["eps"].items()
                ],
            ),
            "",
        ]
        lines += [f"- {a}" for a in m["coverage"]["advice"]] + [""]
    if m["metrics"]:
        lines += [
            "## Latency",
            "",
            "Measured on the machine below; these are host CPU numbers, not a phone's.",
            "",
            format_markdown_table(
                ["target", "artifact", "threads", "median ms", "p90 ms", "ratio to ORT"],
                [
                    [
                        k,
                        v["artifact"],
                        v["threads"],
                        v["latency_ms"]["median"],
                        v["latency_ms"]["p90"],
                        _ratio_text(v.get("ratio_to_ort")),
                    ]
                    for k, v in m["metrics"].items()
                ],
            ),
            "",
        ]
        machine = next(iter(m["metrics"].values()))["machine"]
        lines += [
            f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, "
            f"onnxruntime {machine['onnxruntime']}.",
            "",
        ]
        notes = sorted({v["note"] for v in m["metrics"].values()})
        lines += [f"- {n}" for n in notes] + [""]
    lines += _length_sorting_section(m.get("length_sorting"))
    if m["calibration"]:
        lines += [
            "## Calibration data",
            "",
            f"`{m['calibration']['source']}`, sha256 `{m['calibration']['sha256']}`.",
            "",
        ]
    if m["configs"]["stages"]:
        lines += ["## How the source model was made", ""]
        lines += [
            f"- {stage}: `{entry['config'].get('type', '?') if isinstance(entry['config'], dict) else '?'}` "
            f"(report `{entry['report']}`)"
            for stage, entry in m["configs"]["stages"].items()
        ] + [""]
    return "\n".join(line for line in lines).replace("\n\n\n", "\n\n")


def _length_sorting_section(sorting: Mapping[str, Any] | None) -> list[str]:
    """Batches of mixed real lengths as given vs sorted by length: the tokens a model trimmed to each batch's
    longest real length computes, and this model's latency on both orders (measured in the same rounds)."""
    if not sorting:
        return []
    shapes = ", ".join(f"`{k}` {v}" for k, v in sorting["input_shapes"].items())
    row = sorting["latency"][0]
    ratio = row["ratio_sorted_to_given"]
    confidence = round(100 * ratio["confidence"])
    return [
        "## Sorting requests by length",
        "",
        (
            f"Batches of {sorting['batch']} from {sorting['data']} ({shapes}, padded to {sorting['padded_length']}; "
            f"mean real length {sorting['mean_real_length']:.1f}), one thread, {row['clock']} clock, "
            f"{sorting['rounds']} interleaved rounds on {sorting['machine'].get('cpu_model')}:"
        ),
        "",
        format_markdown_table(
            ["order", "tokens per sample after trimming", "median ms per batch", f"ratio ({confidence}% CI)"],
            [
                ["as given", f"{sorting['tokens_as_given']:.1f}", f"{row['median_ms_as_given']:.3g}", "1 (base)"],
                [
                    "sorted by length",
                    f"{sorting['tokens_sorted']:.1f}",
                    f"{row['median_ms_sorted']:.3g}",
                    f"{ratio['estimate']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]",
                ],
            ],
        ),
        "",
        (
            "A model trimmed to each batch's longest real length (`trim-padding`) computes fewer tokens when a server "
            "batches requests of similar length; a model that is not trimmed computes every padded position either "
            "way (its ratio stays near 1)."
        ),
        "",
    ]


def _criterion_text(criterion: Mapping[str, float]) -> str:
    if "min_sqnr_db" in criterion:
        return f"SQNR >= {criterion['min_sqnr_db']:g} dB"
    return f"atol {criterion['atol']:g}, rtol {criterion['rtol']:g}"


def _num(value):
    return "-" if value is None else value


def _ratio_text(ratio):
    if not ratio:
        return "-"
    return f"{ratio['estimate']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"


def summary_table(manifest: Mapping[str, Any]) -> str:
    rows = [
        [
            c["artifact"],
            c["output"],
            _criterion_text(c["criterion"]),
            c.get("max_abs_diff", float("nan")),
            "inf (identical)" if c.get("sqnr_db") is None and c.get("max_abs_diff") == 0 else _num(c.get("sqnr_db")),
            _num(c.get("top1_agreement")),
            c["passed"],
        ]
        for c in manifest["verification"]["checks"]
    ]
    return format_table(["artifact", "output", "criterion", "max abs diff", "SQNR dB", "top-1 agree", "ok"], rows)
