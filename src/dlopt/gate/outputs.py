"""The gate's reports: text, Markdown (GitHub job summary), JUnit XML, and writing them atomically."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from dlopt.gate.result import GateResult

_MARK = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}


def _rows(result: GateResult) -> tuple[list[str], list[list[Any]]]:
    headers = ["check", "verdict", "baseline", "candidate", "change", "limit"]
    rows = []
    for c in result.checks:
        unit = {"latency": " ms", "size": " MB", "decode tokens/s": " tok/s"}.get(c.name, "")
        rows.append(
            [
                c.name,
                _MARK[c.verdict],
                "n/a" if c.baseline is None else f"{c.baseline:.4g}{unit}",
                "n/a" if c.candidate is None else f"{c.candidate:.4g}{unit}",
                c.change,
                c.limit,
            ]
        )
    return headers, rows


def _headline(result: GateResult) -> str:
    return (
        f"{_MARK[result.verdict]} (exit {result.exit_code}): {result.candidate} vs "
        f"{'stored baseline ' if result.mode == 'stored' else ''}{result.baseline}"
    )


def _context_lines(result: GateResult) -> list[str]:
    lines = []
    o = result.latency
    if o is not None:
        warm = result.warmup or {}
        lines.append(
            f"sequential test: {len(o.looks)} look(s), {o.rounds} rounds in {o.seconds:.1f} s "
            f"after {warm.get('rounds', 0)} warm-up rounds"
            + ("" if warm.get("settled", True) else " (latency never settled: capped)")
        )
    m = result.machine
    lines.append(
        f"machine: {m.get('cpu_model')}, {m.get('logical_cores')} cores, onnxruntime {m.get('onnxruntime')}, "
        f"{result.threads} thread(s), batch {result.batch}, target {result.config.target}"
    )
    lines.extend(result.notes)
    lines.extend(f"{c.name}: {c.detail}" for c in result.checks)
    lines.append(f"decision in {result.seconds:.1f} s")
    return lines


def format_gate(result: GateResult) -> str:
    """The terminal report: the checks table, what decided, and the machine."""
    from dlopt.tables import format_table

    headers, rows = _rows(result)
    return "\n".join([_headline(result), "", format_table(headers, rows), "", *_context_lines(result)])


def format_markdown(result: GateResult) -> str:
    """A GitHub-flavoured Markdown report (for $GITHUB_STEP_SUMMARY)."""
    from dlopt.tables import format_markdown_table

    headers, rows = _rows(result)
    details = [f"- {line}" for line in _context_lines(result)]
    return "\n".join(
        [f"### dlopt gate: {_headline(result)}", "", format_markdown_table(headers, rows), "", *details, ""]
    )


def junit_xml(result: GateResult) -> str:
    """One JUnit test case per check: a failed check is a <failure>; an inconclusive one is an <error>
    when the policy exits 3, a <failure> when it fails, and <skipped> when it passes."""
    failures = sum(c.verdict == "fail" for c in result.checks)
    inconclusive = [c for c in result.checks if c.verdict == "inconclusive"]
    policy = result.config.on_inconclusive
    errors = len(inconclusive) if policy == "exit-3" else 0
    failures += len(inconclusive) if policy == "fail" else 0
    skipped = len(inconclusive) if policy == "pass" else 0
    total = f"{result.seconds:.3f}"
    counts = {
        "name": "dlopt gate",
        "tests": str(len(result.checks)),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": str(skipped),
        "time": total,
    }
    suites = ET.Element("testsuites", counts)
    suite = ET.SubElement(suites, "testsuite", {**counts, "timestamp": result.created})
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("baseline", result.baseline),
        ("candidate", result.candidate),
        ("mode", result.mode),
        ("verdict", result.verdict),
        ("exit_code", result.exit_code),
        ("clock", result.clock),
        ("cpu_model", result.machine.get("cpu_model")),
        ("onnxruntime", result.machine.get("onnxruntime")),
    ):
        ET.SubElement(properties, "property", name=name, value=str(value))
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", classname="dlopt.gate", name=c.name, time=f"{c.seconds:.3f}")
        message = f"{c.name}: {c.change} (limit {c.limit})"
        if c.verdict == "fail":
            ET.SubElement(case, "failure", message=message, type="regression").text = c.detail
        elif c.verdict == "inconclusive":
            tag = {"exit-3": "error", "fail": "failure", "pass": "skipped"}[policy]
            ET.SubElement(case, tag, message=f"inconclusive: {message}", type="inconclusive").text = c.detail
        ET.SubElement(case, "system-out").text = c.detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_outputs(
    result: GateResult,
    *,
    summary: str | os.PathLike | None = None,
    junit: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    github_summary: str | None = None,
) -> list[Path]:
    """Write the requested reports. --summary FILE and the others are written atomically; the GitHub
    step summary is appended to, as GitHub expects (several steps share that file)."""
    from dlopt.fileio import write_bytes_atomic, write_json_atomic

    written = []
    if summary is not None:
        written.append(write_bytes_atomic(summary, format_markdown(result).encode()))
    elif github_summary:
        path = Path(github_summary)
        with open(path, "a", encoding="utf-8") as f:
            f.write(format_markdown(result) + "\n")
        written.append(path)
    if junit is not None:
        written.append(write_bytes_atomic(junit, junit_xml(result).encode()))
    if json_path is not None:
        written.append(write_json_atomic(json_path, result.to_dict()))
    return written
