"""dlopt bench: latency of one or more models on a target, measured interleaved, with ratios and CIs."""

from __future__ import annotations

import click

from dlopt.cli._common import COUNT, DATA_SOURCES_HELP, NON_NEGATIVE_INT, data_options, echo_err, input_shape_option
from dlopt.console import progress_bar  # noqa: F401  (importable from here, as before)

EXIT_RESERVE_S = 0.4


def _startup_s() -> float:
    """Seconds this process ran before the command began (interpreter, imports: 0.2-0.6 s on a busy
    machine), from /proc (Linux; 0 elsewhere). 0 in a process that started long before the command
    (a test runner invoking it in-process): there the budget counts from the command's start."""
    import os
    from pathlib import Path

    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    return age if 0.0 <= age < 5.0 else 0.0


@click.command("bench", short_help="Measure latency of models on a target: interleaved, with ratios and 95% CIs.")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--target", default="cpu", show_default=True, help="Execution target: cpu or cuda.")
@click.option("--threads", type=COUNT, default=1, show_default=True, help="ONNX Runtime intra-op threads.")
@click.option("--batch", "batch", default=None, help="Batch sizes, comma-separated (e.g. 1,8,32). [default: 1]")
@click.option(
    "--seq-len",
    type=COUNT,
    default=128,
    show_default=True,
    help="Length of dynamic axes other than the batch axis and an image's height/width (token inputs).",
)
@click.option(
    "--budget",
    default="30s",
    show_default=True,
    help="Wall time of the whole run: loading, warm-up, timed rounds, statistics.",
)
@click.option("--rounds", type=COUNT, default=None, help="Run exactly this many timed rounds per batch size instead.")
@click.option(
    "--clock",
    type=click.Choice(["auto", "cpu", "wall"]),
    default="auto",
    show_default=True,
    help="Which clock the ratios and throughput use (both are always reported). auto = cpu for "
    "one thread on the CPU target, else wall.",
)
@click.option(
    "--ratio-method",
    type=click.Choice(["round-median", "round-geomean", "median-ratio"]),
    default="round-median",
    show_default=True,
    help="How the ratio to the first model is estimated.",
)
@click.option(
    "--data",
    default=None,
    help=f"Real inputs instead of generated ones: {DATA_SOURCES_HELP} (model:NAME here: a reference "
    "model's real data, padded sentences, photos). Timed one batch of --batch samples per call, batch "
    "after batch.",
)
@click.option(
    "--graph-opt",
    type=click.Choice(["disable", "basic", "extended", "all"]),
    default="all",
    show_default=True,
    help="ONNX Runtime graph optimization level.",
)
@click.option("--cuda-graph", is_flag=True, help="cuda target: capture the model in a CUDA graph and replay it.")
@click.option("--device-id", type=NON_NEGATIVE_INT, default=0, show_default=True, help="GPU index for the cuda target.")
@click.option(
    "--allow-fallback",
    is_flag=True,
    help="If the target cannot run here, measure on the CPU instead, labelled as such (default: error).",
)
@click.option(
    "--seed", type=NON_NEGATIVE_INT, default=0, show_default=True, help="Seed of generated inputs and the bootstrap."
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the full result (every sample) as JSON (schema: dlopt/schemas/bench.schema.json).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--profile",
    is_flag=True,
    help="After timing, show where the time goes: ONNX Runtime's kernel profile summed by op type.",
)
@click.option(
    "--save-baseline",
    "baseline_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also store the FIRST model's samples and this machine's fingerprint as a baseline for "
    "`dlopt gate --baseline FILE` (schema: dlopt/schemas/baseline.schema.json).",
)
@click.option(
    "--generate",
    is_flag=True,
    help="MODELS are exported LM folders (dlopt export --task text-generation): time greedy generation "
    "with onnxruntime-genai: prefill ms, time to first token, decode tokens/s, peak RSS "
    "(schema: dlopt/schemas/bench_generate.schema.json).",
)
@click.option("--prompt-len", type=int, default=128, show_default=True, help="--generate: prompt tokens.")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="--generate: tokens generated.")
@input_shape_option
@data_options
def command(
    models,
    target,
    threads,
    batch,
    seq_len,
    budget,
    rounds,
    clock,
    ratio_method,
    data,
    graph_opt,
    cuda_graph,
    device_id,
    allow_fallback,
    seed,
    json_path,
    no_progress,
    profile,
    baseline_path,
    generate,
    prompt_len,
    new_tokens,
    input_shapes,
    declared,
):
    """Measure the latency of MODELS (.onnx files) on a target and compare them.

    Several models are measured interleaved (A B C A B C ...), so all of them see the same machine
    states, and each is reported as a ratio to the FIRST model with a bootstrap 95% confidence
    interval: the median over rounds of (model time / first model's time in that round).

    Warm-up runs until latencies settle (not a fixed count). Per model: median, p90, p99, mean, std,
    min, throughput (items/s) per batch size, size on disk, load time, first-run time, memory added.
    Inputs are generated from each model's input metadata (seeded; free sizes that the model runs
    on, or --input-shape), or real ones are read with --data (an .npz, or model:NAME), timed one batch
    at a time at each --batch size.

    Clocks: thread CPU time (cpu) counts only the time the calling thread ran, so time spent
    descheduled while other jobs run does not inflate it. With --threads 1 on the CPU the whole model
    runs on that thread, and on shared machines this clock is far steadier than wall time (spreads
    of 2 % against 35-60 % were seen on a busy 2-core box; under heavy load wall medians were 3.6x
    the CPU medians): it is the default there. With more threads, pool threads' work is invisible to
    it, and on a GPU the thread only waits: wall time is the default there.

    \b
    Examples:
      dlopt bench model_fp32.onnx model_int8.onnx
      dlopt bench m.onnx --batch 1,8,32 --budget 60s --json bench.json
      dlopt bench m.onnx --target cuda --batch 1,32 --cuda-graph
      dlopt bench lm/ lm4/ --generate --prompt-len 128 --new-tokens 128
    """
    import time

    # the budget covers the whole command: its start-up, and after the measurement the tables, the JSON
    # and the process's exit (freeing the sessions, the interpreter's teardown: 0.2-0.4 s on a busy box)
    started = time.perf_counter() - _startup_s() - EXIT_RESERVE_S
    from dlopt.api import BenchConfig, bench, format_bench, parse_batch_sizes, parse_duration

    if generate:
        from dlopt.api import GenerateConfig, InputError, bench_generate, format_generate

        # options of ONNX-file benchmarks that generation does not take: refused, not silently ignored
        other = {
            "--target": target != "cpu",
            "--data": data is not None,
            "--profile": profile,
            "--save-baseline": baseline_path is not None,
            "--cuda-graph": cuda_graph,
            "--input-shape": bool(input_shapes),
        }
        for flag, given in other.items():
            if given:
                raise InputError(
                    f"--generate does not take {flag}",
                    "drop it (generation runs on the CPU with seeded random prompts)",
                )
        generate_config = GenerateConfig(
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            threads=threads,
            batch_sizes=parse_batch_sizes(batch or "1"),
            budget_s=parse_duration(budget),
            rounds=rounds,
            clock=clock,
            ratio_method=ratio_method,
            seed=seed,
        )
        with progress_bar(enabled=not no_progress) as progress:
            generated = bench_generate(models, generate_config, json_path=json_path, progress=progress, started=started)
        click.echo(format_generate(generated.result))
        if json_path:
            echo_err(f"wrote {json_path}")
        return

    config = BenchConfig(
        target=target,
        threads=threads,
        batch_sizes=parse_batch_sizes(batch or "1"),
        seq_len=seq_len,
        budget_s=parse_duration(budget),
        rounds=rounds,
        clock=clock,
        ratio_method=ratio_method,
        graph_opt_level=graph_opt,
        cuda_graph=cuda_graph,
        device_id=device_id,
        allow_fallback=allow_fallback,
        seed=seed,
        profile=profile,
        input_shapes=input_shapes,
    )
    with progress_bar(enabled=not no_progress) as progress:
        measured = bench(
            models,
            config,
            data=declared.specs(data)[0],
            json_path=json_path,
            baseline_path=baseline_path,
            progress=progress,
            started=started,
        )
    result = measured.result
    if result.target["fell_back"]:
        echo_err(f"warning: target {target!r} is not available here; measured on the CPU (--allow-fallback)")
    click.echo(format_bench(result))
    if json_path:
        echo_err(f"wrote {json_path}")
    if baseline_path:
        echo_err(f"wrote baseline {baseline_path} ({result.models[0].label})")
