"""The self-contained HTML report of a `dlopt optimize` run: an inline SVG plot of the candidates
(latency ratio x accuracy drop, marker area ~ size; the front in FRONT_COLOR), the
table, and every candidate's recipe and the reason it was chosen, kept, dropped or skipped. No script,
no stylesheet or font from the network: it opens the same offline."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from dlopt.search.candidates import removal_text, untrimmed_name

FRONT_COLOR = "#d62728"  # front markers (the tests look for this colour in a browser screenshot)
CHOSEN_COLOR = "#2ca02c"
OTHER_COLOR = "#8c8c8c"
PLOT_W, PLOT_H = 720, 420
MARGIN = {"left": 70, "right": 20, "top": 20, "bottom": 50}


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, fmt: str = ".3g") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def _scale(lo: float, hi: float, a: float, b: float):
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    return (lambda v: a + (v - lo) / (hi - lo) * (b - a)), lo, hi


def plot_svg(candidates: Sequence[Mapping[str, Any]], chosen: str | None) -> str:
    """x: latency / FP32 (one thread, batch 1); y: accuracy drop in the metric's unit; area ~ size."""
    timed = [c for c in candidates if c.get("latency_ratio") is not None and c.get("drop_points") is not None]
    left, right, top, bottom = MARGIN["left"], PLOT_W - MARGIN["right"], MARGIN["top"], PLOT_H - MARGIN["bottom"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_W}" height="{PLOT_H}" '
        f'viewBox="0 0 {PLOT_W} {PLOT_H}" role="img" aria-label="Pareto front">',
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="#ffffff" stroke="#444444"/>',
    ]
    if not timed:
        parts.append(
            f'<text x="{(left + right) / 2}" y="{(top + bottom) / 2}" text-anchor="middle">'
            "no candidate was timed</text></svg>"
        )
        return "".join(parts)
    sx, x0, x1 = _scale(min(c["latency_ratio"] for c in timed), max(c["latency_ratio"] for c in timed), left, right)
    sy, y0, y1 = _scale(min(c["drop_points"] for c in timed), max(c["drop_points"] for c in timed), bottom, top)
    biggest = max(c.get("bytes") or 1 for c in timed)
    for k in range(5):  # ticks
        xv, yv = x0 + (x1 - x0) * (k + 0.5) / 5, y0 + (y1 - y0) * (k + 0.5) / 5
        parts.append(
            f'<line x1="{sx(xv):.1f}" y1="{bottom}" x2="{sx(xv):.1f}" y2="{bottom + 5}" stroke="#444444"/>'
            f'<text x="{sx(xv):.1f}" y="{bottom + 18}" font-size="11" text-anchor="middle">{xv:.3g}</text>'
            f'<line x1="{left - 5}" y1="{sy(yv):.1f}" x2="{left}" y2="{sy(yv):.1f}" stroke="#444444"/>'
            f'<text x="{left - 8}" y="{sy(yv) + 4:.1f}" font-size="11" text-anchor="end">{yv:.3g}</text>'
        )
    parts.append(
        f'<text x="{(left + right) / 2}" y="{PLOT_H - 10}" font-size="12" text-anchor="middle">'
        "latency / FP32 (one thread, batch 1, thread CPU time) - lower is faster</text>"
        f'<text x="16" y="{(top + bottom) / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 16 {(top + bottom) / 2})">accuracy drop</text>'
    )
    # No line joins the front's markers: the front is three-dimensional (size too), so neighbours in
    # this projection need not be neighbours on the front.
    for c in sorted(timed, key=lambda c: bool(c.get("on_front"))):  # front markers drawn on top
        radius = 6 + 10 * math.sqrt((c.get("bytes") or 1) / biggest)
        color = FRONT_COLOR if c.get("on_front") else OTHER_COLOR
        x, y = sx(c["latency_ratio"]), sy(c["drop_points"])
        ring = f' stroke="{CHOSEN_COLOR}" stroke-width="4"' if c["name"] == chosen else ' stroke="#ffffff"'
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{color}"{ring}>'
            f"<title>{_esc(c['name'])}: {c['latency_ratio']:.3f} x FP32, drop {c['drop_points']:.3g}, "
            f"{(c.get('bytes') or 0) / 1e6:.2f} MB</title></circle>"
            + (
                f'<text x="{x - radius - 3:.1f}" y="{y - 3:.1f}" font-size="11" text-anchor="end">'
                if x > left + 0.75 * (right - left)
                else f'<text x="{x + radius + 3:.1f}" y="{y - 3:.1f}" font-size="11">'
            )
            + f"{_esc(c['name'])}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(candidates: Sequence[Mapping[str, Any]]) -> str:
    head = ["candidate", "status", "drop", "score", "latency / FP32 [95 % CI]", "median ms", "MB", "cached"]
    rows = []
    for c in candidates:
        ci = c.get("latency_ci")
        latency = (
            "-"
            if c.get("latency_ratio") is None
            else (f"{c['latency_ratio']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        )
        cells = [
            c["name"],
            c["status"],
            _num(c.get("drop_points")),
            _num(c.get("score"), ".5g"),
            latency,
            _num(c.get("median_ms")),
            _num((c["bytes"] or 0) / 1e6 if c.get("bytes") else None, ".2f"),
            "yes" if c.get("cached") else "no",
        ]
        rows.append("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in cells) + "</tr>")
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{_esc(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _server(server: Mapping[str, Any] | None) -> str:
    if not server:
        return "<p>No batch-size / thread search (not a server target, or nothing was chosen).</p>"
    if server.get("skipped"):
        return f"<p>Batch-size / thread search skipped: {_esc(server['skipped'])}</p>"
    best = server.get("best")
    lines = [
        f"<p>{_esc(server.get('why'))}: "
        + (
            f"<b>batch {best['batch']}, {best['threads']} thread(s)</b>, {best['items_per_s']:.1f} items/s, "
            f"median {best['median_ms']:.3g} ms, p90 {best['p90_ms']:.3g} ms"
            if best
            else "none"
        )
        + f" (wall clock, {_esc(server.get('data'))}; {_esc(server.get('cpu'))})</p>",
        "<table><thead><tr><th>threads</th><th>batch</th><th>items/s</th><th>median ms</th><th>p90 ms</th>"
        "<th>input shapes</th></tr></thead><tbody>",
    ]
    for r in server.get("rows", []):
        lines.append(
            f"<tr><td>{r['threads']}</td><td>{r['batch']}</td><td>{_num(r.get('items_per_s'), '.1f')}</td>"
            f"<td>{_num(r.get('median_ms'))}</td><td>{_num(r.get('p90_ms'))}</td>"
            f"<td>{_esc(r.get('input_shapes'))}</td></tr>"
        )
    lines.append("</tbody></table>")
    return "".join(lines)


def _trim_html(trim: Mapping[str, Any] | None) -> str:
    """The per-batch gain of padding removal as a table (latency / FP32 per candidate and batch size), with
    the lines of trim_lines around it."""
    lines = trim_lines(trim)
    if not lines:
        return "<p>Not considered.</p>"
    batches = ((trim or {}).get("gain") or {}).get("batches") or []
    table = ""
    if batches:
        names = [r["name"] for r in batches[0]["rows"]]
        head = ["candidate"] + [f"batch {b['batch']}: latency / FP32 [95 % CI]" for b in batches]
        body = "".join(
            "<tr><td>"
            + _esc(n)
            + "</td>"
            + "".join(
                f"<td>{r['ratio']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] ({_speed(r['ratio'])})</td>"
                for b in batches
                for r in b["rows"]
                if r["name"] == n
            )
            + "</tr>"
            for n in names
        )
        table = (
            "<table><thead><tr>"
            + "".join(f"<th>{_esc(h)}</th>" for h in head)
            + "</tr></thead><tbody>"
            + body
            + "</tbody></table>"
        )
    return "<p>" + _esc(lines[0]) + "</p>" + table + "".join(f"<p>{_esc(line)}</p>" for line in lines[1:])


def _recipes(candidates: Sequence[Mapping[str, Any]]) -> str:
    items = []
    for c in candidates:
        recipe = json.dumps(c.get("recipe") or [], indent=1)
        items.append(
            f"<details><summary><b>{_esc(c['name'])}</b> - {_esc(c['status'])}: {_esc(c.get('reason'))}"
            f"</summary><p>{_esc(c.get('why'))}</p><pre>{_esc(recipe)}</pre></details>"
        )
    return "".join(items)


def _speed(ratio: float) -> str:
    if ratio == 1.0:  # the reference itself (FP32, the first model of the run)
        return "the reference"
    return f"{1 / ratio:.2f}x faster" if ratio < 1 else f"{ratio:.2f}x slower"


def trim_lines(trim: Mapping[str, Any] | None) -> list[str]:
    """Padding removal in a search: why it was not tried, or the trimmed candidates and their gain per
    batch size (latency / FP32 on the padded inputs), with the shapes and, where batches mix real lengths,
    sorting them by length. Plain text lines, for the printed table and the HTML page alike."""
    if not trim:
        return []
    if not trim.get("applies"):
        return [f"padding removal: not tried: {trim.get('reason')}"]
    check = trim.get("check") or {}
    why_not = (
        f" (not packed: {check['pack_reason']})" if trim.get("form") == "slice" and check.get("pack_reason") else ""
    )
    lines = [
        (
            f"padding removal: {trim.get('mask')} {removal_text(trim.get('form'), trim.get('sliced_inputs') or [])}"
            f"{why_not}; FP32 trimmed vs untrimmed cosine "
            f"{_num(check.get('equivalence_cosine'), '.6f')} (>= {trim.get('min_cosine_required')}) on "
            f"{check.get('feeds')} held-out batches padded further"
        )
    ]
    gain = trim.get("gain") or {}
    if gain.get("skipped"):
        return lines + [f"padding removal per batch size: {gain['skipped']}"]
    for b in gain.get("batches", ()):
        shapes = ", ".join(f"{k}{v}" for k, v in b["input_shapes"].items())
        padding = f", {100 * b['padding']:.0f} % padding" if b.get("padding") else ""
        lines.append(
            f"batch {b['batch']} ({shapes} padded{padding}; {b['rounds']} rounds): "
            + ", ".join(
                f"{r['name']} {r['ratio']:.3f}x [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] ({_speed(r['ratio'])})"
                for r in b["rows"][1:]
            )
            + " (latency / FP32)"
        )
        ls = b.get("length_sorting")
        for row in (ls or {}).get("latency", ()):
            if untrimmed_name(row["model"]) is not None:
                r, first = row["ratio_sorted_to_given"], row.get("ratio_sorted_to_first")
                lines.append(
                    f"batch {b['batch']}, sorted by length: {row['model']} {r['estimate']:.3f}x "
                    f"[{r['low']:.3f}, {r['high']:.3f}] of its time as given ({ls['tokens_sorted']:.1f} vs "
                    f"{ls['tokens_as_given']:.1f} tokens per sample of {ls['padded_length']})"
                    + (
                        f"; {first['estimate']:.3f}x [{first['low']:.3f}, {first['high']:.3f}] of FP32's as "
                        f"given ({_speed(first['estimate'])})"
                        if first
                        else ""
                    )
                )
    if gain.get("batches"):
        lines.append(
            f"  ({gain.get('clock')}, {gain.get('threads')} thread, {gain.get('data')}; CPU: {gain.get('cpu')})"
        )
    return lines


def render_report(result: Mapping[str, Any]) -> str:
    """The whole HTML page for a result dict (dlopt/schemas/optimize.schema.json)."""
    latency = result.get("latency") or {}
    chosen = result.get("chosen")
    title = f"dlopt optimize {result['model']} ({result['target']})"
    summary = (
        f"<p>Chosen: <b>{_esc(chosen) if chosen else 'nothing within budget'}</b>; accuracy budget "
        f"{result['max_accuracy_drop']:g} {_esc(result['drop_unit'])} of {_esc(result['evaluator'])} "
        f"(FP32 {_num(result.get('baseline_score'), '.5g')}); front: {_esc(', '.join(result['front']))}; "
        f"bundle: {_esc(result.get('bundle'))} ({'verified' if result.get('verified') else 'not verified'}).</p>"
        f"<p>Latency: {_esc(latency.get('clock'))}, {_esc(latency.get('threads'))} thread, batch "
        f"{_esc(latency.get('batch'))}, inputs {_esc(latency.get('input_shapes'))} ({_esc(latency.get('data'))}), "
        f"{_esc(latency.get('rounds'))} interleaved rounds"
        f"{' (from the cache, measured ' + _esc(latency.get('measured')) + ')' if latency.get('cached') else ''}; "
        f"CPU: {_esc(result['cpu'])}. Search: {result['seconds']:.1f} s of a {result['time_budget_s']:.0f} s "
        f"budget, executor {_esc(result['executor'].get('kind'))} ({_esc(result['executor'].get('workers'))} "
        f"workers); {result['cache']['evaluations_cached']} evaluations from the cache, "
        f"{result['cache']['evaluations_run']} run.</p>"
    )
    style = (
        "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
        "pre{background:#f4f4f4;padding:6px}details{margin:4px 0}"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{style}</style>'
        f"</head><body><h1>{_esc(title)}</h1>{summary}<h2>Pareto front</h2>"
        f'<div id="plot">{plot_svg(result["candidates"], chosen)}</div>'
        f"<p>Red: on the front (latency x accuracy x size); grey: timed but dominated; green ring: chosen; "
        f"marker area ~ model size.</p><h2>Candidates</h2>{_table(result['candidates'])}"
        f"<h2>Padding removal</h2>{_trim_html(result.get('trim_padding'))}"
        f"<h2>Serving (batch size x threads)</h2>{_server(result.get('server'))}"
        f"<h2>Recipes and reasons</h2>{_recipes(result['candidates'])}</body></html>\n"
    )


OVERRUN_TOLERANCE = 0.10  # a search may end this share past its time budget without a word


def overrun_text(result: Mapping[str, Any]) -> str | None:
    """Why a search ran more than 10 % past its --time-budget, else None. Candidates stop being started in
    time, but every search still exports and scores the FP32 source, times what it keeps (10 s at least)
    and writes a verified bundle: a budget shorter than those is overrun, and this line says by what."""
    seconds, budget = result["seconds"], result["time_budget_s"]
    if seconds <= budget * (1 + OVERRUN_TOLERANCE):
        return None
    phases = result.get("phases_s", {})
    needed = [
        (phases.get("source_s"), "the FP32 source (export and scoring)"),
        (phases.get("latency_s"), "timing the candidates (10 s at least)"),
        (phases.get("bundle_s"), "the verified bundle"),
    ]
    spent = [(s, what) for s, what in needed if s]
    floor = sum(s for s, _ in spent)
    return (
        f"time budget: overran, {seconds:.1f} s of {budget:g} s: what every search does took "
        + ", ".join(f"{s:.1f} s for {what}" for s, what in spent)
        + f"; a budget of {max(budget, floor) * 1.5:.0f} s or more fits them"
    )


def _tail_lines(result: Mapping[str, Any]) -> list[str]:
    lines = []
    overrun = overrun_text(result)
    if overrun:
        lines.append(overrun)
    lines.append(
        f"chosen: {result['chosen']} -> {result['bundle']} ({'verified' if result['verified'] else 'NOT verified'})"
        f"; {result['seconds']:.1f} s; evaluations cached {result['cache']['evaluations_cached']}, "
        f"run {result['cache']['evaluations_run']}" + (f"; report {result['report']}" if result["report"] else "")
    )
    return lines


def _lm_optimize_text(result: Mapping[str, Any]) -> str:
    """An LM folder's table: held-out perplexity and its rise over FP32 (the drop), decode tokens/s, the
    decode time per token against FP32's (what the front and the choice use), prefill and size."""
    from dlopt.tables import format_table

    def num(v, fmt=".3g"):
        return "-" if v is None else format(v, fmt)

    rows = []
    for c in result["candidates"]:
        ci = c.get("latency_ci")
        drop = c.get("drop_points")
        rows.append(
            [
                c["name"],
                c["status"],
                num(c.get("perplexity"), ".3f"),
                "-" if drop is None else f"{drop * 100:+.2f} %",
                num(c.get("decode_tokens_per_s"), ".1f"),
                "-" if c["latency_ratio"] is None else f"{c['latency_ratio']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
                num(c.get("prefill_ms"), ".1f"),
                num(c["bytes"] / 1e6 if c["bytes"] else None, ".2f"),
                "yes" if c["cached"] else "no",
            ]
        )
    latency = result["latency"]
    head = ["candidate", "status", "perplexity", "vs FP32", "decode tok/s", "decode time/FP32 [95% CI]",
            "prefill ms", "MB", "cached"]  # fmt: skip
    lines = [
        format_table(head, rows),
        f"front (decode tok/s x perplexity x size): {', '.join(result['front'])}; budget: perplexity +"
        f"{result['max_accuracy_drop'] * 100:g} % over FP32 on the held-out text",
        f"generation: {latency.get('clock')}, {latency.get('threads')} thread, batch {latency.get('batch')}, "
        f"{latency.get('rounds')} rounds, {latency.get('data')}; CPU: {result['cpu']}",
    ]
    return "\n".join(lines + _tail_lines(result))


def optimize_text(result: Mapping[str, Any]) -> str:
    """The table `dlopt optimize` prints: every candidate, the front, how latency was measured, the choice."""
    from dlopt.tables import format_table

    def num(v, fmt=".3g"):
        return "-" if v is None else format(v, fmt)

    if result.get("evaluator") == "perplexity" and any("decode_tokens_per_s" in c for c in result["candidates"]):
        return _lm_optimize_text(result)
    rows = []
    for c in result["candidates"]:
        ci = c.get("latency_ci")
        rows.append(
            [
                c["name"],
                c["status"],
                num(c["drop_points"]),
                "-" if c["latency_ratio"] is None else f"{c['latency_ratio']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
                num(c["median_ms"]),
                num(c["bytes"] / 1e6 if c["bytes"] else None, ".2f"),
                "yes" if c["cached"] else "no",
            ]
        )
    latency = result["latency"]
    lines = [
        format_table(["candidate", "status", "drop (pts)", "latency/FP32 [95% CI]", "ms", "MB", "cached"], rows),
        f"front: {', '.join(result['front'])}",
        f"latency: {latency.get('clock')}, {latency.get('threads')} thread, batch {latency.get('batch')}, "
        f"inputs {latency.get('input_shapes')} ({latency.get('data')}); CPU: {result['cpu']}",
    ]
    lines += trim_lines(result.get("trim_padding"))
    server = result.get("server") or {}
    best = server.get("best")
    if best:
        lines.append(
            f"serving: batch {best['batch']}, {best['threads']} thread(s): {best['items_per_s']:.1f} items/s, "
            f"p90 {best['p90_ms']:.3g} ms ({server['why']})"
        )
    elif server:
        lines.append(f"serving: {server.get('skipped') or server.get('why')}")
    return "\n".join(lines + _tail_lines(result))
