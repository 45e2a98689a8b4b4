"""The text the CLI prints for the results of dlopt.api's verbs: the API returns result objects and never
prints; how they read in a terminal is the CLI's business (issue 23: api.py holds verbs only).

Tables come from dlopt.tables.format_table (a pure text module the CLI may import); the formatters a stage or
target owns for its own report (the verification summary, the mobile EP coverage rows) come through dlopt.api.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dlopt.tables import format_table

if TYPE_CHECKING:
    from dlopt.api import CacheListing, ModelEntry, PackageResult, RunResult


def package_text(result: PackageResult) -> str:
    """What `dlopt package` prints: the bundle's summary, coverage with advice, latency per target, files."""
    from dlopt.api import COVERAGE_HEADERS, coverage_table_rows, summary_table

    manifest = result.manifest
    if manifest["model"]["format"] == "genai":
        return lm_package_text(result)
    lines = [summary_table(manifest)]
    if manifest["coverage"]:
        report = json.loads((result.bundle / manifest["coverage"]["file"]).read_text())
        lines += ["", format_table(COVERAGE_HEADERS, coverage_table_rows(report))]
        lines += [f"advice: {line}" for line in report["advice"]]
    if manifest["metrics"]:
        rows = [
            [
                k,
                v["artifact"],
                v["threads"],
                v["clock"],
                v["latency_ms"]["median"],
                v["latency_ms"]["p90"],
                f"{v['ratio_to_ort']['estimate']:.3f}" if "ratio_to_ort" in v else "-",
            ]
            for k, v in manifest["metrics"].items()
        ]
        lines += [
            "",
            format_table(["target", "artifact", "threads", "clock", "median ms", "p90 ms", "ratio to ORT"], rows),
        ]
        if manifest["target"] == "mobile":
            lines.append(
                "note: mobile latency is ONNX Runtime's CPU kernels on this host with a phone-like thread "
                "count, not a phone"
            )
    files = ", ".join(f"{f['path']} ({f['bytes'] / 1e6:.2f} MB)" for f in manifest["files"])
    lines.append(f"wrote {result.bundle}: {files}")
    return "\n".join(lines)


def _reference_agreement(reference: dict[str, object], tokens: int) -> str:
    text = f"first {reference['equal_prefix']}/{tokens} tokens"
    gap = reference.get("logit_gap_where_they_part")
    return text if gap is None else f"{text}, then its logit gap {gap:.2f}"


def lm_package_text(result: PackageResult) -> str:
    """What `dlopt package` prints for an LM bundle: the samples, their agreement, the speed, the files."""
    m = result.manifest
    g = m["generation"]
    headers = ["sample", "prompt", "greedy output", "re-checked"] + (["= reference"] if g["reference"] else [])
    rows = []
    for i, (s, c) in enumerate(zip(g["samples"], m["verification"]["checks"])):
        text = s["text"].replace("\n", " ")
        rows.append(
            [i + 1, s["prompt"][:40], text[:60] + ("…" if len(text) > 60 else ""), f"{c['equal']}/{c['steps']} tokens"]
            + ([_reference_agreement(s["reference"], len(s["tokens"]))] if g["reference"] else [])
        )
    lines = [format_table(headers, rows)]
    for name, v in m["metrics"].items():
        line = (
            f"{name}: prefill {v['prefill_ms']:.1f} ms, first token {v['time_to_first_token_ms']:.1f} ms, decode "
            f"{v['decode_tokens_per_s']:.1f} tok/s, peak RSS +{v['peak_rss_added_mb']:.0f} MB ({v['threads']} "
            f"thread(s), prompt {v['prompt_len']}, {v['new_tokens']} new tokens, {v['clock']} clock)"
        )
        if "ratio_to_reference" in v:
            r = v["ratio_to_reference"]["decode_per_token"]
            line += (
                f"; decode time per token x{r['estimate']:.3f} (95% CI {r['low']:.3f}-{r['high']:.3f}) of the "
                f"reference's {v['reference_decode_tokens_per_s']:.1f} tok/s, interleaved"
            )
        lines.append(line)
        lines.append(f"CPU: {v['machine'].get('cpu_model')}")
    if g["executorch"]:
        lines.append(f"ExecuTorch (XNNPACK): {g['executorch']}")
    size = sum(f["bytes"] for f in m["files"])
    lines.append(
        f"wrote {result.bundle}/ ({len(m['files'])} files, {size / 1e6:.1f} MB); chat with it: see its "
        "README.md; check it with: dlopt verify " + str(result.bundle)
    )
    return "\n".join(lines)


def models_text(entries: Sequence[ModelEntry]) -> str:
    """What `dlopt models` prints: one row per model, then each evaluation's metrics."""
    rows = [
        [
            s["name"],
            s["parameters_millions"],
            s["fp32_megabytes"],
            s["inputs"],
            ", ".join(s["metrics"]),
            "yes" if s["installed"] else "missing: " + ", ".join(s["missing"]),
        ]
        for s in (e.summary for e in entries)
    ]
    lines = [format_table(["model", "params (M)", "fp32 MB", "inputs", "metrics", "installed"], rows)]
    for e in entries:
        if e.evaluation is not None:
            ev = e.evaluation
            lines.append(
                f"\n{e.name} (torch FP32): built in {ev.build_seconds:.1f} s, evaluated in {ev.evaluate_seconds:.1f} s"
            )
            lines.append(format_table(["metric", "value"], list(ev.metrics.items())))
    return "\n".join(lines)


def run_text(result: RunResult) -> str:
    """What `dlopt run` prints: one row per stage (ran or cached, seconds, cache key, output hash)."""
    rows = [
        [
            r.stage.index,
            r.stage.kind,
            "cached" if r.cached else "ran",
            f"{r.seconds:.2f}",
            r.key[:12],
            r.output_sha256[:12],
        ]
        for r in result.stages
    ]
    return format_table(["#", "stage", "status", "seconds", "cache key", "output sha256"], rows)


def age_text(seconds: float) -> str:
    """A cache entry's age as `dlopt cache ls` shows it: 2.5d, 3.0h, 12.0m or 40s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cache_text(listing: CacheListing) -> str:
    """What `dlopt cache ls` prints: key, stage, size, age and source of each entry, and the total."""
    now = time.time()
    rows = [
        [e.key[:12], e.kind, f"{e.bytes / 1e6:.2f} MB", age_text(now - e.created), e.info.get("source", "?")]
        for e in listing.entries
    ]
    return (
        format_table(["key", "stage", "size", "age", "source"], rows)
        + f"\n{len(listing.entries)} entries, {listing.bytes / 1e6:.2f} MB in {listing.root}"
    )
