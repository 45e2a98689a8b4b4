"""The tables `dlopt bench` prints from a BenchResult."""

from __future__ import annotations

from dlopt.bench.data import padding_note
from dlopt.bench.results import BenchResult


def format_bench(result: BenchResult) -> str:
    """The latency table (one row per model and batch size) and the models table, as text."""
    from dlopt.tables import format_table

    clock = result.clock
    other = "wall" if clock == "cpu" else "cpu"
    confidence = int(round(result.config.confidence * 100))
    headers = [
        "model",
        "batch",
        f"median ms ({clock})",
        "p90",
        "p99",
        "mean",
        "std",
        "min",
        f"median ms ({other})",
        "items/s",
        "ratio",
        f"{confidence}% CI",
    ]
    rows = []
    for b in result.batches:
        for m, r in zip(result.models, b.models):
            s = r.summaries[clock]
            ratio = r.ratios[clock]
            rows.append(
                [
                    m.label,
                    b.batch,
                    s.median * 1e3,
                    s.p90 * 1e3,
                    s.p99 * 1e3,
                    s.mean * 1e3,
                    s.std * 1e3,
                    s.min * 1e3,
                    r.summaries[other].median * 1e3,
                    f"{b.batch / s.median:.1f}" if s.median > 0 else "nan",
                    "1 (base)" if ratio is None else f"{ratio.estimate:.3f}",
                    "" if ratio is None else f"[{ratio.low:.3f}, {ratio.high:.3f}]",
                ]
            )
    # Memory a model added: its session, plus the buffers of its first run at the first batch size.
    first = result.batches[0].models
    show_device = any(m.device_added_bytes is not None for m in result.models)
    model_headers = (
        ["model", "size MB", "load ms", "first run ms", "RSS +MB"]
        + (["device +MB"] if show_device else [])
        + ["runs on", "providers"]
    )
    model_rows = []
    for m, r in zip(result.models, first):
        row = [
            m.label,
            m.size_bytes / 1e6,
            m.handle.load_s * 1e3,
            r.first_run_s * 1e3,
            (m.rss_added_bytes + r.rss_added_bytes) / 1e6,
        ]
        if show_device:
            mine, its = m.device_added_bytes, r.device_added_bytes
            row.append((mine + its) / 1e6 if mine is not None and its is not None else "n/a")
        row += [m.handle.runs_on, ",".join(p.replace("ExecutionProvider", "") for p in m.handle.active_providers)]
        model_rows.append(row)
    t = result.target
    lines = [
        f"target {t['name']} on {t['device']}, {result.config.threads} thread(s), graph optimization "
        f"{result.config.graph_opt_level}" + (", CUDA graph" if result.config.cuda_graph else ""),
        f"clock: {clock} ({result.clock_reason})",
        f"CPU: {result.machine.get('cpu_model')}, {result.machine.get('cpu_isa')}",
    ]
    session = t.get("session")
    if session:
        entries = ", ".join(f"{k}={v}" for k, v in session["session_config"].items())
        lines.append(f"session config: {entries}; denormals {session['denormals']}")
    if t["fell_back"]:
        lines.append(f"WARNING: {t['name']} is not available here; these are CPU numbers (--allow-fallback)")
    for b in result.batches:
        for m, r in zip(result.models[1:], b.models[1:]):
            ratio = r.ratios[clock]
            assert ratio is not None, "None only for the first model"
            speed = f"{1 / ratio.estimate:.2f}x faster" if ratio.estimate < 1 else f"{ratio.estimate:.2f}x slower"
            verdict = "" if ratio.low > 1 or ratio.high < 1 else " (the CI includes 1: no difference shown)"
            lines.append(
                f"batch {b.batch}: {m.label} takes {ratio.estimate:.3f}x the time of {result.models[0].label} "
                f"(95% CI {ratio.low:.3f}-{ratio.high:.3f}, {speed}){verdict}"
            )
    for b in result.batches:
        shapes = ", ".join(f"{k}{list(v)}" for k, v in b.input_shapes.items())
        grouped = (
            f" (each sample the mean of {b.runs_per_sample} runs, {b.samples} samples)" if b.runs_per_sample > 1 else ""
        )
        source = (
            f"{b.data_batches} real batch(es) from {result.data_source}, one per call in turn"
            if b.data_batches
            else "generated"
        )
        lines.append(
            f"batch {b.batch}: {b.rounds} interleaved rounds in {b.seconds:.1f} s{grouped}; warm-up "
            f"{b.warmup.rounds} rounds, {'settled' if b.warmup.settled else 'NOT settled (capped)'}; "
            f"inputs {shapes} ({source}{padding_note(b.padding)})"
        )
        if b.length_sorting:
            ls = b.length_sorting
            lines.append(
                f"batch {b.batch}: the data's real lengths differ (mean {ls['mean_real_length']:.1f} of "
                f"{ls['padded_length']}): a model trimmed to each batch's longest real length (dlopt quantize "
                f"--trim-padding) computes {ls['tokens_as_given']:.1f} tokens per sample in this order, "
                f"{ls['tokens_sorted']:.1f} with requests sorted by length "
                f"({ls['tokens_as_given'] / ls['tokens_sorted']:.2f}x fewer), against {ls['padded_length']} "
                "padded"
            )
            lines += [
                f"batch {b.batch}: sorted by length, {row['model']} takes "
                f"{_interval_text(row['ratio_sorted_to_given'])}"
                f" the time of the same batches as given ({row['median_ms_sorted']:.3g} vs "
                f"{row['median_ms_as_given']:.3g} ms a batch, {row['clock']} clock; batches "
                + ", ".join(f"{k}{v}" for k, v in ls["input_shapes"].items())
                + " before trimming)"
                for row in ls.get("latency", ())
            ]
        if result.config.rounds is None and b.rounds < result.config.min_rounds:
            lines.append(
                f"batch {b.batch}: only {b.rounds} rounds fit in the budget: the CI is wide; give a longer --budget"
            )
    return "\n".join(
        [
            format_table(headers, rows),
            "",
            format_table(model_headers, model_rows),
            "",
            *lines,
            f"peak RSS of this process: {result.peak_rss_bytes / 1e6:.0f} MB",
            *_profile_tables(result),
        ]
    )


def _interval_text(ratio) -> str:
    return f"{ratio['estimate']:.3f}x ({round(100 * ratio['confidence'])}% CI {ratio['low']:.3f}-{ratio['high']:.3f})"


def _profile_tables(result: BenchResult, top: int = 8) -> list[str]:
    """With --profile: per batch size and model, the op types that took the most kernel time."""
    from dlopt.tables import format_table

    out = []
    for b in result.batches:
        for m, r in zip(result.models, b.models):
            if not r.profile:
                continue
            rows = [[t.op_type, t.nodes, t.ms_per_run, f"{100 * t.share:.1f}"] for t in r.profile[:top]]
            rest = r.profile[top:]
            if rest:
                rows.append(
                    [
                        f"({len(rest)} other op types)",
                        sum(t.nodes for t in rest),
                        sum(t.ms_per_run for t in rest),
                        f"{100 * sum(t.share for t in rest):.1f}",
                    ]
                )
            title = (
                f"where the time goes: {m.label}, batch {b.batch} (ONNX Runtime's kernel profile, "
                f"{result.config.profile_runs - 2} runs; wall time per run)"
            )
            out += ["", title, format_table(["op type", "nodes", "ms / run", "% of kernel time"], rows)]
    return out
