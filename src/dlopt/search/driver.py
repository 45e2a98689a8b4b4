"""`dlopt optimize`: search candidate recipes for a model and target, keep the Pareto front of
latency x accuracy drop x size, and deliver the best candidate within the accuracy budget as a
verified bundle with a JSON result and an HTML report.

The order of work, cheapest first:
1. FP32 (the source, exported once through the stage cache) is scored: the baseline.
2. Every candidate is applied and scored on held-out data (executor.map; cached per candidate).
   INT8 candidates that miss the budget get a second try with quantize's accuracy budget (the most
   sensitive nodes kept float).
3. Latency is measured only for candidates that can reach the front (the rule, `timing_plan`):
   within the accuracy budget, not FP32's own graph under another name (the content hash of the
   graph equals FP32's: reported as FP32, sharing FP32's timing, never chosen), and not the less
   accurate of two candidates with the same graph (same op types and counts, same size: the same
   kernels, so the same latency up to noise: two timings would differ only by noise). They
   are timed interleaved with FP32 in one bench run (executor.measure: nothing else runs meanwhile),
   one thread, thread CPU time, batch 1, on the model's real inputs.
4. The chosen candidate: fastest on the front within the budget, ties (within 1 %) to the smaller.
   For server targets its batch size and intra-op thread count are searched for the best throughput
   under --max-latency.
5. The chosen recipe plus a package stage runs through the stage cache into the bundle, which is
   then verified.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlopt.errors import InputError, VerificationError
from dlopt.search.candidates import (
    LM_MIX_TRIES,
    Candidate,
    Skipped,
    StageDesc,
    base_candidates,
    lm_block_sizes,
    lm_candidates,
    lm_mixed,
    prune_candidates,
    removal_text,
    trimmed,
    untrimmed_name,
    with_exclusions,
)
from dlopt.search.pareto import Point, choose, dominated_by, pareto_front
from dlopt.search.scoring import (
    Evaluated,
    SearchContext,
    accuracy_drop,
    apply_stages,
    cached_evaluation,
    drop_unit,
    evaluate_candidate,
    measure_latency,
    measure_throughput,
    resolved_metric,
    trim_check,
)

SCHEMA = "dlopt.optimize"
SCHEMA_VERSION = 1
OPTIMIZE_TARGETS = ("cpu",)  # the targets whose latency this machine can measure and search
SERVER_TARGETS = ("cpu", "cuda")  # batch size and thread count are searched for these
# Shares of the time budget: transforms and scoring stop being started after this share, so that
# latency, the throughput search and the bundle still fit.
TRANSFORM_SHARE = 0.7
EXCLUSION_TRIES = 2  # INT8 candidates over budget given a second try with float nodes
TRIM_GAIN_BATCHES = (1, 8)  # where padding removal applies: its gain per batch size, in the report
Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class OptimizeConfig:
    target: str = "cpu"
    max_accuracy_drop: float = 0.005  # in the evaluator's metric's own unit (dlopt.metrics: fractions for agreement)
    time_budget_s: float = 1200.0
    max_latency_ms: float | None = None  # the latency limit of a served request (batch call), wall clock
    evaluator: str | None = None  # None: the reference model's own metric, else the task metric vs FP32 (auto)
    # .onnx sources: as dlopt quantize takes it (a source text or a dlopt.data.DataSpec); reference models: their own
    calibration: Any = None
    eval_data: Any = None
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    thread_counts: tuple[int, ...] | None = None  # None: 1, 2, 4 ... up to the cores of this machine
    name: str | None = None  # the bundle's model name; None: MODEL-optimized
    overwrite: bool = False
    package_measure_s: float = 2.0
    latency_budget_s: float | None = None  # the interleaved latency run; None: 6 s + 4 s per timed model
    throughput_budget_s: float | None = None  # per (threads, batch) bench run; None: 3 s
    # prune ratios with distillation (torch sources with training data): opt in, since their training
    # takes minutes per ratio (fashion-cnn ~100 s each; MiniLM over 10 min each here, past a 20 min budget)
    search_pruning: bool = False


@dataclass(frozen=True)
class OptimizeResult:
    result: dict[str, Any]  # the JSON result (schema dlopt/schemas/optimize.schema.json)
    bundle: Path | None
    report_path: Path | None


def validate_config(config: OptimizeConfig) -> None:
    if config.target not in OPTIMIZE_TARGETS:
        raise InputError(
            f"dlopt optimize does not search --target {config.target} yet",
            f"use --target {' or '.join(OPTIMIZE_TARGETS)}; for other targets run a recipe (dlopt run)",
        )
    from dlopt.limits import MAX_MEASURE_S, MAX_TIME_BUDGET_S, check_number

    check_number(config.max_accuracy_drop, "{max_accuracy_drop=DROP}", minimum=0)
    check_number(config.time_budget_s, "the time budget (s)", minimum=0, above=True)
    MAX_TIME_BUDGET_S.check(config.time_budget_s, "the time budget")
    if config.max_latency_ms is not None:
        check_number(config.max_latency_ms, "{max_latency=MS}", minimum=0, above=True)
    check_number(config.package_measure_s, "package_measure_s", minimum=0)
    MAX_MEASURE_S.check(config.package_measure_s, "package_measure_s")
    for value in (config.latency_budget_s, config.throughput_budget_s):
        if value is not None:
            check_number(value, "a measurement budget (s)", minimum=0, above=True)
            MAX_MEASURE_S.check(value, "a measurement budget")
    if config.max_accuracy_drop < 0:
        raise InputError(f"--max-accuracy-drop {config.max_accuracy_drop} is negative", "give a drop >= 0, e.g. 0.01")
    if config.time_budget_s <= 0:
        raise InputError(f"--time-budget {config.time_budget_s:g} s is not positive", "e.g. --time-budget 20m")
    if config.max_latency_ms is not None and config.max_latency_ms <= 0:
        raise InputError(f"--max-latency {config.max_latency_ms:g} ms is not positive", "e.g. --max-latency 50")
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise InputError(f"batch sizes {list(config.batch_sizes)} must be positive", "e.g. 1,4,16")


class _Clock:
    """The search's deadline and its progress lines: '[  41s / 1200s] ...'."""

    def __init__(self, budget_s: float, log: Log) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self._log = log

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds left of the budget, never below 0 (an overrun is reported once, at the end)."""
        return max(0.0, self.budget_s - self.elapsed())

    def log(self, message: str) -> None:
        self._log(f"[{self.elapsed():5.0f}s / {self.budget_s:.0f}s] {message}")


# --------------------------------------------------------------------------- the source


def _context(model: str, config: OptimizeConfig, cache_root: Path) -> tuple[SearchContext, str]:
    """The search context for MODEL (an .onnx path, a reference model name or a torch source) and
    a description of its data."""
    from dlopt.lm import is_lm_folder
    from dlopt.manifest import artifact_hash
    from dlopt.recipe import source_hash

    if is_lm_folder(model):
        return _lm_context(model, config, cache_root)
    if model.endswith(".onnx"):
        path = Path(model).expanduser().resolve()
        if not path.is_file():
            raise InputError(
                f"model {model} does not exist", "give an .onnx file, a reference model name or file.py:build"
            )
        if config.calibration is None and config.eval_data is None:
            raise InputError(
                f"{model}: no data to calibrate and score candidates on",
                "give --calibration D (an .npz, a folder, model:NAME) and/or --eval-data D",
            )
        evaluator = config.evaluator or "auto"
        name = config.name or path.stem
        ctx = SearchContext(
            source=str(path),
            torch_source=False,
            source_id=artifact_hash(path),
            target=config.target,
            calibration=config.calibration,
            eval_data=config.eval_data,
            evaluator=evaluator,
            cache_root=str(cache_root),
            name=name,
        )
        return ctx, f"calibration {config.calibration}, evaluation {config.eval_data or 'held out of calibration'}"
    from dlopt.models import REFERENCE_MODELS, get_reference_model

    if model in REFERENCE_MODELS:
        ref = get_reference_model(model)
        if config.calibration or config.eval_data:
            raise InputError(
                f"{model} is a reference model: it calibrates and is scored on its own data",
                "drop --calibration/--eval-data, or export it and optimize the .onnx",
            )
        evaluator = config.evaluator or f"model:{ref.name}:{ref.metrics[0]}"
        ctx = SearchContext(
            source=model,
            torch_source=True,
            source_id=source_hash(model),
            target=config.target,
            calibration=f"model:{ref.name}",
            eval_data=None,
            evaluator=evaluator,
            cache_root=str(cache_root),
            name=config.name or model,
        )
        return ctx, f"its own data (calibration model:{ref.name}; scored with its evaluator, {evaluator})"
    if ":" not in model:
        raise InputError(
            f"unknown model {model!r}",
            f"give an .onnx file, file.py:build, package.module:build or one of {', '.join(REFERENCE_MODELS)}",
        )
    if config.calibration is None:
        raise InputError(f"{model}: no data to calibrate and score candidates on", "give --calibration D")
    ctx = SearchContext(
        source=model,
        torch_source=True,
        source_id=source_hash(model),
        target=config.target,
        calibration=config.calibration,
        eval_data=config.eval_data,
        evaluator=config.evaluator or "auto",
        cache_root=str(cache_root),
        name=config.name or model.rpartition(":")[0].rsplit("/", 1)[-1].removesuffix(".py"),
    )
    return ctx, f"calibration {config.calibration}"


def _lm_context(model: str, config: OptimizeConfig, cache_root: Path) -> tuple[SearchContext, str]:
    """The search context of an exported LM folder: its candidates are calibrated on --calibration text and
    scored by perplexity on --eval-data text (held out: another file) against the folder itself. Every
    input problem is found here, before any candidate runs."""
    from dlopt.genai import check_lm_folder
    from dlopt.lm import read_text_tokens
    from dlopt.manifest import artifact_hash
    from dlopt.optimize.quantize_lm import QuantizeLm
    from dlopt.search.scoring import LM_EVALUATOR, lm_text

    folder = check_lm_folder(model)  # a tokenizer and a decoder the genai config names
    path = Path(folder.path).resolve()
    if config.evaluator not in (None, LM_EVALUATOR):
        raise InputError(
            f"{model} is an LM folder: candidates are scored by held-out perplexity, not {config.evaluator}",
            "drop --evaluator (or pass --evaluator perplexity)",
        )
    if config.calibration is None:
        raise InputError(
            f"{model}: no calibration text for the 4-bit candidates (GPTQ and the 8-bit layer choice read it)",
            "pass --calibration TEXT.txt (UTF-8 text like the model's inputs)",
        )
    if config.eval_data is None:
        raise InputError(
            f"{model}: no held-out text to measure perplexity on",
            "pass --eval-data HELD_OUT.txt (UTF-8 text, never the calibration text)",
        )
    calibration, held_out = lm_text(config.calibration, "--calibration"), lm_text(config.eval_data, "--eval-data")
    if Path(calibration).resolve() == Path(held_out).resolve():
        raise InputError(
            f"--eval-data {held_out} is the calibration text: its perplexity would not be held out",
            "give another text file as --eval-data",
        )
    window = QuantizeLm().window
    tokens = read_text_tokens(path, calibration, "calibration text")
    if tokens.shape[0] < 3 * window:  # quantize_lm's least: two calibration windows and one held out
        raise InputError(
            f"the calibration text {calibration} has {tokens.shape[0]} tokens, too few for 3 windows of {window}",
            f"give at least {3 * window} tokens of text (more calibrates better: {18 * window})",
        )
    read_text_tokens(path, held_out, "held-out text")  # readable UTF-8; its length is checked on FP32's score
    import onnx

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    if any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in graph.graph.node):
        raise InputError(
            f"{model} is already quantized", "optimize the fp32 export (dlopt export --task text-generation)"
        )
    ctx = SearchContext(
        source=str(path),
        torch_source=False,
        source_id=artifact_hash(path),
        target=config.target,
        calibration=calibration,
        eval_data=held_out,
        evaluator=LM_EVALUATOR,
        cache_root=str(cache_root),
        name=config.name or path.name,
        lm=True,
    )
    return ctx, f"calibration text {calibration}, held-out text {held_out}"


# --------------------------------------------------------------------------- evaluating


def _plan_key(ctx: SearchContext, config: OptimizeConfig) -> str:
    """The key of a search's plan: what its time budget left out (see _evaluate_all)."""
    from dlopt.recipe import data_hash, host_facts
    from dlopt.stagecache import cache_key

    return cache_key(
        {
            "kind": "optimize-plan",
            "source": ctx.source_id,
            "target": ctx.target,
            "evaluator": ctx.evaluator,
            "time_budget_s": config.time_budget_s,
            "max_accuracy_drop": config.max_accuracy_drop,
            "search_pruning": config.search_pruning,
            "data": {"calibration": data_hash(ctx.calibration), "eval_data": data_hash(ctx.eval_data)},
            "host": host_facts("quantize", ctx),
        }
    )


def _load_plan(ctx: SearchContext, key: str) -> dict[str, str]:
    import json

    entry = ctx.cache.get(key)
    if entry is None:
        return {}
    try:
        return dict(json.loads((entry.path / "result.json").read_text())["skipped"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _store_plan(ctx: SearchContext, key: str, skipped: Sequence[Skipped]) -> None:
    import json

    with ctx.cache.building(key) as staging:
        (staging / "result.json").write_text(json.dumps({"skipped": {s.name: s.reason for s in skipped}}, indent=1))
        ctx.cache.commit(
            key,
            staging,
            {
                "kind": "optimize-plan",
                "inputs": {"kind": "optimize-plan"},
                "artifact": "result.json",
                "source": ctx.source,
                "recipe": f"dlopt optimize {ctx.name}",
                "report": {},
            },
        )


def _evaluate_all(
    executor,
    ctx: SearchContext,
    candidates: Sequence[Candidate],
    clock: _Clock,
    deadline_s: float,
    planned: dict[str, str] | None = None,
) -> tuple[dict[str, Evaluated], list[Skipped]]:
    """Cached evaluations first (no work), then the rest in chunks of the executor's width, started
    only while they can finish before `deadline_s` (the slowest of those done so far is the estimate).
    `planned`: what an earlier run of this same search (same time budget) skipped for time; skipped
    again, so that a warm re-run repeats the search it is cached from instead of extending it."""
    results: dict[str, Evaluated] = {}
    todo = []
    skipped: list[Skipped] = []
    for c in candidates:
        found = cached_evaluation(ctx, c)
        if found is not None:
            results[c.name] = found
            clock.log(f"{c.name}: cached ({'ok' if found.ok else 'failed'})")
        elif planned and c.name in planned:
            skipped.append(
                Skipped(
                    c.name,
                    f"{planned[c.name]} (in the first run of this search; another --time-budget searches further)",
                    tuple(c.recipe()),
                )
            )
        else:
            todo.append(c)
    width = max(1, int(executor.describe().get("workers") or 1))
    spent: list[float] = []
    while todo:
        estimate = max(spent, default=0.0)  # the slowest so far: a chunk runs to its end once started
        rounds = -(-len(todo) // width)
        # all at once when all of them fit (workers never wait for a chunk's slowest), else one chunk
        chunk, todo = (
            (todo, []) if spent and clock.elapsed() + estimate * rounds <= deadline_s else (todo[:width], todo[width:])
        )
        if clock.elapsed() + estimate > deadline_s:
            for c in chunk + todo:
                skipped.append(
                    Skipped(
                        c.name,
                        f"the time budget: transforms stop at {deadline_s:.0f} s of "
                        f"{clock.budget_s:.0f} s (up to {estimate:.0f} s each so far)",
                        tuple(c.recipe()),
                    )
                )
            clock.log(f"time budget: skipping {', '.join(c.name for c in chunk + todo)}")
            break
        clock.log(f"applying and scoring {', '.join(c.name for c in chunk)}")
        parallel = [c for c in chunk if not c.times_kernels]
        done = dict(zip((c.name for c in parallel), executor.map(evaluate_candidate, [(ctx, c) for c in parallel])))
        for c in chunk:
            if c.times_kernels:  # alone on a node of the target's class: see Candidate.times_kernels
                done[c.name] = executor.measure(evaluate_candidate, (ctx, c), target_class=ctx.target)
        for c, r in ((c, done[c.name]) for c in chunk):
            results[c.name] = r
            spent.append(r.seconds)
            clock.log(
                f"{c.name}: {'score ' + format(r.score, '.4g') if r.ok else 'failed: ' + str(r.reason)[:160]} "
                f"({r.seconds:.0f} s)"
            )
    return results, skipped


def timing_plan(rows: dict[str, dict[str, Any]], max_drop: float) -> list[str]:
    """Which candidates are timed: the rule of the module docstring. Sets each other row's status and
    reason; returns the names to time (FP32 first)."""
    eligible = []
    fp32_graph = rows["fp32"].get("graph_sha256") if "fp32" in rows else None
    for name, row in rows.items():
        if row["status"] != "scored":
            continue
        if name != "fp32" and fp32_graph is not None and row.get("graph_sha256") == fp32_graph:
            # timing the same graph twice gives two numbers that differ by noise (2.7 % once), and an
            # "int8" candidate that wins on noise ships FP32 under another name
            row["precision"], row["status"], row["reason"] = (
                "fp32",
                "fp32-graph",
                (
                    f"its graph is the FP32 graph (content hash {fp32_graph[:12]}): reported as FP32, with FP32's "
                    f"timing, and never chosen in its place"
                ),
            )
            continue
        if row["drop_points"] > max_drop:
            row["status"], row["reason"] = (
                "over-budget",
                (f"accuracy drop {row['drop_points']:.3g} > {max_drop:g}: cannot be chosen, so not timed"),
            )
        else:
            eligible.append(name)
    timed: list[str] = []
    for name in sorted(eligible, key=lambda n: (n != "fp32", rows[n]["drop_points"], rows[n]["bytes"])):
        row = rows[name]
        twin = next(
            (
                t
                for t in timed
                if rows[t]["signature"] == row["signature"]
                and abs(rows[t]["bytes"] - row["bytes"]) <= 0.01 * rows[t]["bytes"]
            ),
            None,
        )
        if twin is not None and name != "fp32":
            row["status"], row["reason"] = (
                "same-graph",
                (
                    f"the same graph as {twin} (op types, counts and size): the same kernels and latency up to "
                    f"noise, with a drop no smaller ({row['drop_points']:.3g} vs "
                    f"{rows[twin]['drop_points']:.3g} points): "
                    "dominated, not timed"
                ),
            )
            continue
        timed.append(name)
    return timed


def _server_search(
    executor, ctx: SearchContext, row: dict[str, Any], config: OptimizeConfig, clock: _Clock, reserve_s: float
) -> dict[str, Any]:
    threads = config.thread_counts or tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= (os.cpu_count() or 1))
    per_run_s = config.throughput_budget_s or 3.0
    needed = per_run_s * len(config.batch_sizes) * len(threads)  # at most: larger batches stop when they do not pay
    if clock.left() - reserve_s < needed:
        return {
            "skipped": f"the time budget: {clock.left():.0f} s left, about {needed + reserve_s:.0f} s needed "
            "for the batch/thread search and the bundle"
        }
    clock.log(f"throughput search for {row['name']}: batch {list(config.batch_sizes)} x threads {list(threads)}")
    body = executor.measure(
        measure_throughput,
        ctx,
        row["artifact"],
        row["output_sha256"],
        config.batch_sizes,
        threads,
        per_run_s,
        config.max_latency_ms,
        target_class=ctx.target,
    )
    limit = config.max_latency_ms
    allowed = [r for r in body["rows"] if r.get("items_per_s") and (limit is None or r["p90_ms"] <= limit)]
    best = max(allowed, key=lambda r: (r["items_per_s"], -r["threads"], -r["batch"]), default=None)
    why = (
        (
            "the highest throughput"
            + (f" with p90 latency <= {limit:g} ms" if limit is not None else " (no --max-latency given)")
        )
        if best
        else (f"no batch size and thread count keeps p90 latency <= {limit:g} ms")
    )
    return {**body, "max_latency_ms": limit, "best": best, "why": why}


# --------------------------------------------------------------------------- the search


def _search_onnx(
    executor,
    ctx: SearchContext,
    config: OptimizeConfig,
    base: Evaluated,
    fp32: Candidate,
    clock: _Clock,
    deadline: float,
    planned: dict[str, str],
    drop_of: Callable[[Evaluated], float | None],
) -> tuple[dict[str, Evaluated], list[Skipped], dict[str, Candidate], dict[str, Any]]:
    """The candidates of an ONNX model or torch source (base_candidates, INT8 float-node retries, trimmed
    forms, prune ratios), applied and scored. Returns the evaluations (FP32's first), what was skipped,
    the candidates by name and the padding-removal check."""
    from dlopt.fileio import load_onnx
    from dlopt.graphfacts import looks_like_transformer

    max_drop = config.max_accuracy_drop
    assert base.artifact is not None, "optimize refuses an FP32 source it could not score"
    transformer = looks_like_transformer(load_onnx(base.artifact, load_external_data=False))
    trim = trim_check(ctx, str(base.artifact), str(base.output_sha256))  # base.ok: both are set
    clock.log(_trim_line(trim))
    candidates = base_candidates(target=ctx.target, transformer=transformer, untrimmed=trim["applies"])[1:]
    if trim["applies"]:  # FP32 trimmed first: it needs no quantization, and the time budget drops the last first
        candidates = [_trimmed(trim, fp32), *candidates]
    evaluated, skipped = _evaluate_all(executor, ctx, candidates, clock, deadline, planned)
    evaluated = {"fp32": base, **evaluated}
    all_candidates = {c.name: c for c in [fp32, *candidates]}

    # an INT8 candidate scored over the budget (one that ran but has no score has no drop to compare)
    over_drops = {
        c.name: drop
        for c in candidates
        if c.precision == "int8"
        and c.name in evaluated
        and evaluated[c.name].ok
        and (drop := drop_of(evaluated[c.name])) is not None
        and drop > max_drop
    }
    over = sorted((c for c in candidates if c.name in over_drops), key=lambda c: over_drops[c.name])
    if over:
        retries = [
            with_exclusions(c, max_drop_metric=max_drop, evaluator=ctx.evaluator) for c in over[:EXCLUSION_TRIES]
        ]
        more, more_skipped = _evaluate_all(executor, ctx, retries, clock, deadline, planned)
        evaluated.update(more)
        skipped += more_skipped
        all_candidates.update({c.name: c for c in retries})
    else:
        skipped.append(
            Skipped(
                "int8 float-node exclusions",
                "no INT8 candidate missed the accuracy budget: keeping nodes in float could only make one slower",
            )
        )
    if trim["applies"]:  # after the retries: a retry within budget gets its trimmed form too
        variants, not_trimmed = _trimmed_variants(
            trim,
            [all_candidates[n] for n in evaluated if n != "fp32" and untrimmed_name(n) is None],
            evaluated,
            drop_of,
            max_drop,
        )
        more, more_skipped = _evaluate_all(executor, ctx, variants, clock, deadline, planned)
        evaluated.update(more)
        skipped += more_skipped + not_trimmed
        all_candidates.update({c.name: c for c in variants})
    else:
        skipped.append(Skipped("trim-padding", f"padding removal does not apply: {trim['reason']}"))
    pruned, not_pruned = prune_candidates(ctx.source, torch_source=ctx.torch_source, asked=config.search_pruning)
    skipped += not_pruned
    if pruned:  # last: the costliest (training), so the time budget drops them first
        more, more_skipped = _evaluate_all(executor, ctx, pruned, clock, deadline, planned)
        evaluated.update(more)
        skipped += more_skipped
        all_candidates.update({c.name: c for c in pruned})
    return evaluated, skipped, all_candidates, trim


def _search_lm(
    executor,
    ctx: SearchContext,
    config: OptimizeConfig,
    base: Evaluated,
    fp32: Candidate,
    clock: _Clock,
    deadline: float,
    planned: dict[str, str],
    drop_of: Callable[[Evaluated], float | None],
) -> tuple[dict[str, Evaluated], list[Skipped], dict[str, Candidate], dict[str, Any]]:
    """The candidates of an exported LM folder: every int4 scheme x block size (lm_candidates, cheapest
    first), then the mixed 4/8-bit forms of the LM_MIX_TRIES lowest-drop ones, their size budget
    LM_MIX_HEADROOM over their measured all-4-bit size. Returns what _search_onnx does (no padding removal:
    a decoder's prompt has no padding)."""
    import onnx

    graph = onnx.load(str(Path(ctx.source) / "model.onnx"), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    rows = [dims[n.input[1]][0] for n in graph.node if n.op_type == "MatMul" and len(dims.get(n.input[1], [])) == 2]
    blocks, not_divided = lm_block_sizes(rows)
    candidates = lm_candidates(blocks)
    evaluated, skipped = _evaluate_all(executor, ctx, candidates, clock, deadline, planned)
    skipped += not_divided
    evaluated = {"fp32": base, **evaluated}
    all_candidates = {c.name: c for c in [fp32, *candidates]}
    scored = [(drop, c) for c in candidates if c.name in evaluated and (drop := drop_of(evaluated[c.name])) is not None]
    mixes = [
        lm_mixed(c, int(evaluated[c.name].bytes or 0)) for _, c in sorted(scored, key=lambda dc: dc[0])[:LM_MIX_TRIES]
    ]
    if mixes:
        more, more_skipped = _evaluate_all(executor, ctx, mixes, clock, deadline, planned)
        evaluated.update(more)
        skipped += more_skipped
        all_candidates.update({c.name: c for c in mixes})
    left = [c.name for _, c in sorted(scored, key=lambda dc: dc[0])[LM_MIX_TRIES:]]
    if left:
        skipped.append(
            Skipped(
                "mixed 4/8-bit forms",
                f"not tried for {', '.join(left)}: mixed forms are tried for the {LM_MIX_TRIES} lowest-drop "
                "all-4-bit candidates",
            )
        )
    trim = {"applies": False, "reason": "an LM folder: generation prompts carry no padding", "cached": False}
    return evaluated, skipped, all_candidates, trim


def optimize(
    model: str,
    output: str | os.PathLike,
    config: OptimizeConfig = OptimizeConfig(),
    *,
    executor,
    cache,
    report_path: str | os.PathLike | None = None,
    log: Log = lambda message: None,
) -> OptimizeResult:
    """Search, choose, bundle and report (see the module docstring). `executor`: dlopt.executor;
    `cache`: a dlopt.stagecache.StageCache shared by every worker. Raises InputError on bad input,
    VerificationError (after writing the report) when nothing is within budget or the bundle fails."""
    from dlopt.fileio import check_output_path
    from dlopt.package import check_bundle_path
    from dlopt.runtime import cpu_label, initialize

    validate_config(config)
    out = Path(output)
    check_bundle_path(out, config.overwrite)
    report_out = check_output_path(report_path) if report_path else None
    _guard_outputs(model, config, out, report_out, Path(cache.root))
    initialize()
    clock = _Clock(config.time_budget_s, log)
    ctx, data_text = _context(model, config, Path(cache.root))
    max_drop = config.max_accuracy_drop
    clock.log(
        f"optimizing {model} for {ctx.target} (drop budget {max_drop:g} in {drop_unit(ctx.evaluator)} of "
        f"{ctx.evaluator}; data: {data_text}; {cpu_label()})"
    )

    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    fp32 = Candidate("fp32", "fp32", (), "the source itself: the reference every ratio is against")
    if ctx.torch_source:
        clock.log("fp32: exporting (a cached stage after the first run)")
        exported, _ = apply_stages(ctx, ())  # export errors are the user's to see, not a failed candidate
        ctx = dataclasses.replace(ctx, fp32_onnx=str(exported))
    base = evaluate_candidate((ctx, fp32))
    phases["source_s"] = time.perf_counter() - t0  # part of evaluate_s: what every search does first
    if not base.ok or base.score is None or base.artifact is None or base.output_sha256 is None:
        raise InputError(f"{model}: the FP32 source could not be scored: {base.reason}", "check the model and its data")
    base_score = base.score
    clock.log(f"fp32: {ctx.evaluator} = {base.score:.5g}" + (" (cached)" if base.cached else ""))
    metric = resolved_metric(ctx)  # auto: say which task metric the budget is on, and why
    if metric is not None:
        clock.log(
            f"auto: the task metric is {metric['name']} ({metric['reason']}); the drop budget "
            f"{max_drop:g} is in {metric['drop_unit']}"
        )

    def drop_of(r: Evaluated) -> float | None:
        return accuracy_drop(ctx.evaluator, base_score, r.score) if r.ok and r.score is not None else None

    deadline = TRANSFORM_SHARE * config.time_budget_s
    plan_key = _plan_key(ctx, config)
    planned = _load_plan(ctx, plan_key)
    search = _search_lm if ctx.lm else _search_onnx
    evaluated, skipped, all_candidates, trim = search(
        executor, ctx, config, base, fp32, clock, deadline, planned, drop_of
    )
    if not planned:
        _store_plan(ctx, plan_key, [s for s in skipped if s.reason.startswith("the time budget")])
    phases["evaluate_s"] = time.perf_counter() - t0

    rows: dict[str, dict[str, Any]] = {}
    for name, r in evaluated.items():
        c = all_candidates[name]
        row: dict[str, Any] = {
            "name": name,
            "precision": c.precision,
            "why": c.why,
            "recipe": c.recipe(),
            "cached": r.cached,
            "seconds": r.seconds,
            "score": r.score,
            "drop_points": drop_of(r),
            "bytes": r.bytes,
            "artifact": r.artifact,
            "output_sha256": r.output_sha256,
            "signature": r.signature,
            "graph_sha256": r.graph_sha256,
            "stage_keys": list(r.stage_keys),
            "latency_ratio": None,
            "latency_ci": None,
            "median_ms": None,
            "on_front": False,
            "status": "scored" if r.ok else "failed",
            "reason": r.reason,
            "trim_padding": _trim_of(c, r),
        }
        if ctx.lm:
            row.update(perplexity=(r.measures or {}).get("perplexity"), decode_tokens_per_s=None, prefill_ms=None)
            row["next_token_agreement"] = (r.measures or {}).get("next_token_agreement")
        rows[name] = row

    # latency, only for what can reach the front
    t0 = time.perf_counter()
    timed = timing_plan(rows, max_drop)
    if ctx.lm:  # a generation round (prompt + new tokens) takes seconds; capped by the budget as given, not by
        # the time left, so that a re-run asks for the same measurement and finds it in the cache
        latency_budget = config.latency_budget_s or min(18.0 + 12.0 * len(timed), max(10.0, config.time_budget_s * 0.3))
    else:
        latency_budget = config.latency_budget_s or min(6.0 + 4.0 * len(timed), max(10.0, clock.left() * 0.3))
    clock.log(f"timing {', '.join(timed)} interleaved ({latency_budget:.0f} s, one thread, thread CPU time)")
    latency = executor.measure(
        measure_latency,
        ctx,
        [(n, rows[n]["artifact"], rows[n]["output_sha256"]) for n in timed],
        latency_budget,
        target_class=ctx.target,
    )
    for name in timed:
        m = latency["models"][name]
        rows[name].update(
            latency_ratio=m["ratio"],
            latency_ci=[m["ratio_low"], m["ratio_high"]],
            median_ms=m["median_ms"],
            status="timed",
        )
        if ctx.lm:  # generation: decode tokens/s and prefill beside the decode-time ratio
            rows[name].update(decode_tokens_per_s=m["decode_tokens_per_s"], prefill_ms=m["prefill_ms"])
    for row in rows.values():
        if row["status"] == "fp32-graph":  # FP32's graph: FP32's one timing
            row.update({k: rows["fp32"][k] for k in ("latency_ratio", "latency_ci", "median_ms")})
    phases["latency_s"] = time.perf_counter() - t0

    points = [Point(n, rows[n]["latency_ratio"], rows[n]["drop_points"], rows[n]["bytes"]) for n in timed]
    front = pareto_front(points)
    eligible = [
        p for p in points if config.max_latency_ms is None or rows[p.name]["median_ms"] <= config.max_latency_ms
    ]
    picked = choose(eligible, max_drop) if eligible else None
    for p in points:
        row = rows[p.name]
        if p in front:
            row["on_front"], row["status"] = True, "front"
            row["reason"] = "on the Pareto front (no other candidate is as fast, as accurate and as small)"
        else:
            by = dominated_by(p, points)
            assert by is not None, "a point off the front is dominated"
            row["status"], row["reason"] = (
                "dominated",
                (
                    f"dominated by {by.name}: latency {by.latency:.3f} vs {p.latency:.3f} x FP32, "
                    f"drop {by.drop:.3g} vs "
                    f"drop {p.drop:.3g}, {by.size / 1e6:.2f} vs {p.size / 1e6:.2f} MB"
                ),
            )
        if config.max_latency_ms is not None and row["median_ms"] > config.max_latency_ms:
            row["reason"] += (
                f"; its batch-1 latency {row['median_ms']:.3g} ms exceeds --max-latency {config.max_latency_ms:g}"
            )
    if picked is not None:
        rows[picked.name]["status"] = "chosen"
        rows[picked.name]["reason"] = "the fastest on the front within the accuracy budget" + (
            " (latencies within 1 % are ties, decided by size)" if len(front) > 1 else ""
        )

    t0 = time.perf_counter()
    trim_gain = _trim_gain(executor, ctx, rows, front, trim, config, clock) if trim["applies"] else None
    phases["trim_gain_s"] = time.perf_counter() - t0

    server = None
    t0 = time.perf_counter()
    if picked is not None and ctx.lm:
        server = {
            "skipped": "an LM folder: generation is timed at batch 1, one thread; "
            "dlopt bench --generate --batch B --threads N measures other settings"
        }
    elif picked is not None and ctx.target in SERVER_TARGETS:
        server = _server_search(executor, ctx, rows[picked.name], config, clock, reserve_s=60.0)
    phases["throughput_s"] = time.perf_counter() - t0

    # the bundle, verified
    bundle, verified, bundle_error = None, None, None
    t0 = time.perf_counter()
    if picked is not None:
        clock.log(f"writing {picked.name} as a bundle to {out}")
        package = StageDesc(
            "package-lm" if ctx.lm else "package",
            {"target": ctx.target, "measure_s": config.package_measure_s, "name": f"{ctx.name}-{picked.name}"},
        )
        apply_stages(ctx, (*all_candidates[picked.name].stages, package), output=out, overwrite=config.overwrite)
        from dlopt.verify import verify_bundle

        check = verify_bundle(out)
        verified = check.passed
        bundle = out
        if not verified:
            bundle_error = "; ".join(check.problems())
        clock.log(f"bundle {'verified' if verified else 'FAILED verification'}: {out}")
    phases["bundle_s"] = time.perf_counter() - t0

    result = _result(
        model,
        ctx,
        config,
        base,
        rows,
        skipped,
        front,
        picked,
        latency,
        server,
        executor,
        cache,
        bundle,
        verified,
        clock,
        phases,
        report_out,
        metric,
    )
    if not ctx.lm:  # an LM folder's prompts carry no padding: nothing to report
        result["trim_padding"] = {**{k: v for k, v in trim.items() if k != "cached"}, "gain": trim_gain}
    from dlopt.search.html_report import overrun_text

    overrun = overrun_text(result)
    if overrun:
        clock.log(overrun)
    if report_out is not None:
        from dlopt.fileio import staged_outputs
        from dlopt.search.html_report import render_report

        with staged_outputs() as outputs:
            outputs.stage(report_out).write_text(render_report(result))
    if picked is None:
        raise VerificationError(
            f"no candidate of {model} is within the budget (drop <= {max_drop:g} in "
            f"{drop_unit(ctx.evaluator)}"
            + (f", batch-1 latency <= {config.max_latency_ms:g} ms" if config.max_latency_ms else "")
            + ")",
            "raise --max-accuracy-drop or --max-latency; see the report's reasons",
        )
    if not verified:
        raise VerificationError(f"the bundle {out} failed verification: {bundle_error}", "report this model")
    return OptimizeResult(result, bundle, report_out)


def _trim_line(trim: dict[str, Any]) -> str:
    if not trim["applies"]:
        return f"trim-padding: not tried: {trim['reason']}"
    check = trim["check"]
    return (
        f"trim-padding: applies ({trim['mask']} {removal_text(trim.get('form'), trim['sliced_inputs'])}; "
        "trimmed vs untrimmed "
        f"FP32 cosine {check['equivalence_cosine']:.6f} >= {trim['min_cosine_required']:g} on {check['feeds']} "
        "held-out batches, padded further and mixed): trimmed candidates join the search"
    )


def _trimmed_variants(
    trim: dict[str, Any],
    candidates: Sequence[Candidate],
    evaluated: dict[str, Evaluated],
    drop_of: Callable[[Evaluated], float | None],
    max_drop: float,
) -> tuple[list[Candidate], list[Skipped]]:
    """The trimmed form of every candidate scored within the accuracy budget; those over it or
    failed are listed once: trimming leaves a model's accuracy where it was, so their trimmed forms could
    not be chosen either."""
    drops = {c.name: drop_of(evaluated[c.name]) for c in candidates}
    within = [c for c in candidates if (drop := drops[c.name]) is not None and drop <= max_drop]
    left = [c.name for c in candidates if c not in within]
    skipped = (
        [
            Skipped(
                "trimmed forms",
                "not tried for " + ", ".join(left) + ": over the accuracy budget or failed "
                "untrimmed (trimming does not make a model more accurate)",
            )
        ]
        if left
        else []
    )
    return [_trimmed(trim, c) for c in within], skipped


def _trimmed(trim: dict[str, Any], candidate: Candidate) -> Candidate:
    check = trim["check"]
    return trimmed(
        candidate,
        f"FP32 trimmed vs untrimmed cosine {check['equivalence_cosine']:.4f} on "
        f"{check['feeds']} held-out padded batches",
        trim.get("form"),
    )


def _trim_of(candidate: Candidate, result: Evaluated) -> dict[str, Any] | None:
    """A trimmed candidate's padding removal: applied, and its trimmed vs untrimmed cosine on the stage's samples."""
    if untrimmed_name(candidate.name) is None:
        return None
    summaries = [
        s["trim_padding"] for s in result.stage_reports if s.get("kind") == "trim-padding" and s.get("trim_padding")
    ]
    return {**summaries[-1], "untrimmed": untrimmed_name(candidate.name)} if summaries else None


def _trim_gain(
    executor,
    ctx: SearchContext,
    rows: dict[str, dict[str, Any]],
    front: Sequence[Point],
    trim: dict[str, Any],
    config: OptimizeConfig,
    clock: _Clock,
) -> dict[str, Any]:
    """Padding removal's gain per batch size (TRIM_GAIN_BATCHES) on the real inputs with their real lengths:
    FP32 (the reference), FP32 trimmed, and the fastest trimmed candidate on the front with its untrimmed
    form, timed interleaved in one bench run at each batch size (one thread, thread CPU time)."""
    timed = {n for n, r in rows.items() if r["latency_ratio"] is not None and r["status"] != "fp32-graph"}
    on_front = sorted((p for p in front if untrimmed_name(p.name) is not None), key=lambda p: p.latency)
    names = ["fp32"] + [n for n in ("fp32+trim",) if n in timed]
    if on_front:
        best = on_front[0].name
        names += [n for n in (untrimmed_name(best), best) if n in timed and n not in names]
    if len(names) < 2:
        return {"skipped": "no trimmed candidate was timed (over the accuracy budget, failed or skipped)"}
    # batch 8 of FP32 at the padded length is slow (MiniLM: ~0.3 s a call, each model twice with the sorted
    # order): 4 s per model and batch size gave 3 rounds under load, too few for a CI
    budget = config.latency_budget_s or min(10.0 * len(names) * len(TRIM_GAIN_BATCHES), max(20.0, clock.left() * 0.3))
    clock.log(
        f"padding removal per batch size: {', '.join(names)} at batch {list(TRIM_GAIN_BATCHES)} "
        f"({budget:.0f} s, interleaved)"
    )
    body = executor.measure(
        measure_latency,
        ctx,
        [(n, rows[n]["artifact"], rows[n]["output_sha256"]) for n in names],
        budget,
        TRIM_GAIN_BATCHES,
        target_class=ctx.target,
    )
    return {
        "models": names,
        "clock": body["clock"],
        "threads": body["threads"],
        "data": body["data"],
        "cpu": body["cpu"],
        "cached": body["cached"],
        "notes": body.get("notes", []),
        "batches": [
            {
                "batch": b["batch"],
                "input_shapes": b["input_shapes"],
                "rounds": b["rounds"],
                "padding": b["padding"],
                "length_sorting": b["length_sorting"],
                "rows": [
                    {
                        "name": n,
                        "precision": rows[n]["precision"],
                        "trimmed": untrimmed_name(n) is not None,
                        "median_ms": b["models"][n]["median_ms"],
                        "ratio": b["models"][n]["ratio"],
                        "ci": [b["models"][n]["ratio_low"], b["models"][n]["ratio_high"]],
                    }
                    for n in names
                ],
            }
            for b in body.get("batches", ())
        ],
    }


def _guard_outputs(model: str, config: OptimizeConfig, out: Path, report_out: Path | None, cache_root: Path) -> None:
    """Refuse, before any work, a bundle, report or cache that is, contains or lies inside an input (the
    model, its data, a factory's file), each other, or the cache: the report is written after the bundle
    was verified, so inside the bundle it would be a file its manifest does not list."""
    from dlopt.fileio import guard_outputs, guard_source_spec

    source = Path(model) if model.endswith(".onnx") or Path(model).is_dir() else guard_source_spec(model)
    from dlopt.data import source_path

    data = [p for p in map(source_path, (config.calibration, config.eval_data)) if p is not None]
    guard_outputs([source, *data], [out, report_out], cache=cache_root)
    if report_out is not None:
        bundle, report = out.resolve(), report_out.resolve()
        if report == bundle or bundle in report.parents:
            raise InputError(
                f"--report {report_out} lies inside the bundle {out}",
                "write the report outside the bundle: its manifest lists every file the bundle holds",
            )


def _result(
    model,
    ctx,
    config,
    base,
    rows,
    skipped,
    front,
    picked,
    latency,
    server,
    executor,
    cache,
    bundle,
    verified,
    clock,
    phases,
    report_out,
    metric=None,
) -> dict[str, Any]:
    from dlopt.runtime import cpu_label

    candidates = list(rows.values()) + [
        {
            "name": s.name,
            "precision": None,
            "why": None,
            "recipe": list(s.recipe),
            "cached": False,
            "seconds": 0.0,
            "score": None,
            "drop_points": None,
            "bytes": None,
            "artifact": None,
            "output_sha256": None,
            "signature": None,
            "graph_sha256": None,
            "stage_keys": [],
            "latency_ratio": None,
            "latency_ci": None,
            "median_ms": None,
            "on_front": False,
            "status": "skipped",
            "reason": s.reason,
            "trim_padding": None,
        }
        for s in skipped
    ]
    evaluated = [r for r in rows.values()]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "name": ctx.name,
        "target": ctx.target,
        "evaluator": ctx.evaluator,
        "drop_unit": metric["drop_unit"] if metric else drop_unit(ctx.evaluator),
        "metric": metric,
        "max_accuracy_drop": config.max_accuracy_drop,
        "max_latency_ms": config.max_latency_ms,
        "baseline_score": base.score,
        "cpu": cpu_label(),
        "time_budget_s": config.time_budget_s,
        "seconds": round(clock.elapsed(), 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "executor": executor.describe(),
        "cache": {
            "root": str(cache.root),
            "evaluations_cached": sum(r["cached"] for r in evaluated),
            "evaluations_run": sum(not r["cached"] for r in evaluated),
        },
        "latency": {k: v for k, v in latency.items() if k != "models"},
        "candidates": candidates,
        "front": [p.name for p in front],
        "chosen": picked.name if picked else None,
        "server": server,
        "bundle": str(bundle) if bundle else None,
        "verified": verified,
        "report": str(report_out) if report_out else None,
    }
