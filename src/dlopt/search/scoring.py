"""Applying a candidate and measuring it: the work `dlopt optimize` fans out (dlopt.executor).

- `apply_stages` is the one place a candidate's stage descriptions become artifacts: they are built
  into an in-memory recipe and run through dlopt.recipe, so every stage output lands in (and is taken
  from) the content-addressed stage cache, under the same keys `dlopt run` uses.
- `evaluate_candidate` (executor.map) applies a candidate and scores it on held-out data; its result,
  a failure included, is stored as its own cache entry (kind "optimize-eval"), keyed by everything that
  decides it, so a warm re-run neither transforms nor re-scores anything.
- `measure_latency` and `measure_throughput` (executor.measure) time candidates with the interleaved
  bench harness; their results are cached too, keyed by the artifacts, the harness settings and the CPU.
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from dlopt.errors import DlOptError, InputError
from dlopt.search.candidates import Candidate, StageDesc
from dlopt.stagecache import StageCache, cache_key

EVAL_FORMAT = 3  # 2: Evaluated.graph_sha256; 3: stage_reports' trim_padding
RESULT_FILE = "result.json"
# LM folders: generation timed as `dlopt bench --generate` does, from seeded prompts of this many tokens
# (the 128), greedy, this many new tokens (decode tokens/s settles well before the 128:
# half the time per round, so twice the rounds in a budget); both cut to fit the model's context.
LM_PROMPT_LEN = 128
LM_NEW_TOKENS = 64
LM_EVALUATOR = "perplexity"  # an LM folder's score: held-out perplexity over the FP32 folder's (FP32 = 1.0)


@dataclass(frozen=True)
class SearchContext:
    """What every job needs to know about the search; picklable (it crosses into workers)."""

    source: str  # a torch source spec (reference model name, file.py:build) or an absolute .onnx path
    torch_source: bool
    source_id: str  # dlopt.recipe.source_hash / artifact_hash of the source
    target: str
    calibration: Any  # a source of dlopt.data (text) or a DataSpec (layout, values, image pre-processing)
    eval_data: Any
    evaluator: str  # model:NAME:metric, FILE.py:FUNCTION, auto (the task metric) or a METRIC_TABLE name
    cache_root: str
    name: str  # the model's name in bundles and reports
    fp32_onnx: str | None = None  # the FP32 model (the export of a torch source): what fidelity compares with
    lm: bool = False  # the source is an exported LM folder: candidates are LM folders (dlopt.optimize.lm_stages)

    @property
    def cache(self) -> StageCache:
        return StageCache(self.cache_root)


@dataclass(frozen=True)
class Evaluated:
    """One candidate applied and scored (or why it could not be)."""

    name: str
    ok: bool
    reason: str | None = None  # why it could not be built or scored
    artifact: str | None = None  # the model in the stage cache
    output_sha256: str | None = None
    bytes: int | None = None
    score: float | None = None  # the evaluator's metric on held-out data
    signature: str | None = None  # op types and counts of the graph: equal graphs run the same kernels
    graph_sha256: str | None = None  # the graph's content (graph_content_hash): equal to FP32's means FP32
    seconds: float = 0.0  # transform + scoring time when it ran
    stage_keys: tuple[str, ...] = ()
    stage_reports: tuple[Mapping[str, Any], ...] = ()
    cached: bool = False  # taken from the cache: nothing was transformed or scored
    eval_key: str | None = None
    measures: dict[str, Any] | None = None  # LM folders: perplexity, FP32's, next-token agreement, tokens

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# --------------------------------------------------------------------------- drops and their unit


def drop_unit(evaluator: str) -> str:
    """The unit of --max-accuracy-drop for `evaluator`: its metric's own (dlopt.metrics.METRIC_TABLE;
    agreement metrics are fractions of FP32's answers), as in quantize and gate."""
    from dlopt.metrics import METRIC_TABLE

    metric = evaluator.split(":")[-1]
    if metric == "sqnr":
        return "noise/signal power (0.01 = 20 dB)"
    if metric == "perplexity":  # drop = ratio - 1 (dlopt.metrics): a relative increase
        return "relative perplexity increase over FP32 (0.03 = +3 %)"
    if metric in METRIC_TABLE:
        return METRIC_TABLE[metric].unit
    if metric == "auto":
        return "the task metric's unit"
    return f"{metric} units (accuracy 0.005 = half a point)"


def accuracy_drop(evaluator: str, baseline: float, score: float) -> float:
    """How much worse `score` is than the FP32 `baseline`, in the metric's own unit (dlopt.metrics.metric_drop)."""
    from dlopt.metrics import metric_drop

    # rounded: an accuracy over 1000 items moves in steps of 0.001, and 0.735 - 0.730 is 0.0050000000000000044
    # in floating point, which must not fail a budget of 0.005
    return round(metric_drop(evaluator, baseline, score), 9)


# --------------------------------------------------------------------------- applying stages

TORCH_STAGES = ("prune", "distill")


def build_recipe(ctx: SearchContext, stages: Sequence[StageDesc]):
    """The candidate as a dlopt.recipe.Recipe: its torch stages (prune, distill), the source's export
    (torch sources), then its ONNX stages."""
    from dlopt.recipe import Recipe, StageSpec, build_config

    torch_stages = [d for d in stages if d.kind in TORCH_STAGES]  # on the torch source, before its export
    descs = (
        torch_stages
        + ([StageDesc("export")] if ctx.torch_source else [])
        + [d for d in stages if d.kind not in TORCH_STAGES]
    )
    specs = tuple(
        StageSpec(
            i,
            d.kind,
            build_config(d.kind, dict(d.config), where=f"{ctx.name} stage {i} ({d.kind})", target=ctx.target),
            None,
        )
        for i, d in enumerate(descs, 1)
    )
    return Recipe(
        path=Path(f"{ctx.name}.optimize"),
        source=ctx.source,
        target=ctx.target,
        calibration=ctx.calibration,
        eval_data=None if ctx.lm else ctx.eval_data,  # LM: the search scores held-out text itself (score_lm)
        name=ctx.name,
        stages=specs,
    )


def apply_stages(
    ctx: SearchContext,
    stages: Sequence[StageDesc],
    output: Path | None = None,
    *,
    overwrite: bool = False,
    log=lambda message: None,
):
    """Run the source's export and `stages` through the stage cache (the one function that applies a
    candidate; stage kinds and configs are those of a recipe). Returns (artifact path, RunResult or
    None): the last stage's output in the cache; with `output`, also delivered there (a bundle when
    the last stage is package). An .onnx source with no stages is its own artifact."""
    from dlopt.recipe import run_recipe
    from dlopt.stage import get_stage

    recipe = build_recipe(ctx, stages)
    if not recipe.stages:
        return Path(ctx.source), None
    folder = get_stage(recipe.stages[-1].kind).makes == "lm"
    with tempfile.TemporaryDirectory(prefix="dlopt-optimize-") as tmp:
        out = Path(output) if output is not None else Path(tmp) / ("lm" if folder else "model.onnx")
        result = run_recipe(recipe, out, cache=ctx.cache, overwrite=overwrite, log=log)
    last = result.stages[-1].entry
    return last.path / last.info["artifact"], result


# --------------------------------------------------------------------------- scoring


@functools.lru_cache(maxsize=4)
def _evaluator(ctx: SearchContext):
    """The evaluator of dlopt.optimize.accuracy_budget (one per worker process and search)."""
    from dlopt.optimize.accuracy_budget import build_evaluator  # quantize's own accuracy evaluators

    if ctx.evaluator.startswith("model:"):
        return build_evaluator(ctx.evaluator, None, None)
    from dlopt.fileio import load_onnx

    original = load_onnx(ctx.fp32_onnx or ctx.source)
    return build_evaluator(ctx.evaluator, original, heldout_feeds(ctx, original))


def resolved_metric(ctx: SearchContext) -> dict[str, str] | None:
    """For --evaluator auto: the task metric chosen from FP32's outputs on the held-out data, and why
    (the evaluator every candidate is scored with; built once per process, so free after FP32's score)."""
    if ctx.evaluator != "auto":
        return None
    evaluator = _evaluator(ctx)
    return {"name": evaluator.name, "reason": evaluator.reason, "drop_unit": drop_unit(evaluator.name)}


def heldout_feeds(ctx: SearchContext, model) -> list[dict[str, Any]] | None:
    """Where a fidelity evaluator scores: --eval-data, else the samples quantize holds out of
    --calibration (the last 20 %: never calibrated on), else None (generated inputs)."""
    from dlopt.data import load_data
    from dlopt.optimize.quantize.heldout import split_holdout
    from dlopt.optimize.quantize.schemes import QuantizeConfig

    config = QuantizeConfig()  # its defaults and held-out split
    data = load_data(ctx.calibration, model) if ctx.calibration else None
    held = load_data(ctx.eval_data, model, limit=config.fidelity_samples) if ctx.eval_data else None
    _, feeds, _ = split_holdout(data, held, config)
    return feeds


def score_model(ctx: SearchContext, path: str | Path) -> float:
    """The evaluator's metric for the model at `path` on the held-out data (one thread per session)."""
    if ctx.lm:
        return float(score_lm(ctx, path)["perplexity_ratio"])
    return float(_evaluator(ctx).score(str(path)))


def lm_text(spec: Any, what: str) -> str:
    """A text source of an LM search (a path, or a dlopt.data.DataSpec naming one) as a path."""
    from dlopt.data import source_path

    path = source_path(spec) if spec is not None else None
    if path is None:
        raise InputError(f"{what} {spec} is not a text file", f"give {what} as a UTF-8 .txt file")
    return str(path)


@functools.lru_cache(maxsize=8)
def score_lm(ctx: SearchContext, path: str | Path) -> dict[str, Any]:
    """An LM folder's held-out perplexity against the FP32 source folder's, on --eval-data text
    (dlopt.lm.heldout_fidelity: windows of 512 tokens, or the context; one thread)."""
    from dlopt.lm import heldout_fidelity

    return heldout_fidelity(path, ctx.source, lm_text(ctx.eval_data, "--eval-data"), threads=1)


def model_file(artifact: str | Path) -> Path:
    """The ONNX file of an artifact: itself, or an LM folder's model.onnx."""
    path = Path(artifact)
    return path / "model.onnx" if path.is_dir() else path


def _graph(artifact: str | Path):
    """The artifact's graph without its weights. An LM folder's is read with onnx.load, not
    dlopt.fileio.load_onnx: its fused ops (SimplifiedLayerNormalization in the onnx domain) are ONNX
    Runtime's contrib ops, which load_onnx refuses in a plain .onnx."""
    import onnx

    from dlopt.fileio import load_onnx

    path = Path(artifact)
    return onnx.load(str(model_file(path)), load_external_data=False) if path.is_dir() else load_onnx(path, False)


def graph_signature(path: Path) -> str:
    """The sorted op types and counts of the graph: two candidates with the same signature and size
    run the same kernels, so their latencies differ only by noise."""
    from dlopt.graphfacts import op_counts

    counts = op_counts(_graph(path))
    return json.dumps(dict(sorted(counts.items())), separators=(",", ":"))


def graph_content_hash(path: Path) -> str:
    """SHA-256 of what the graph computes: its nodes (op type, domain, inputs, outputs, attributes),
    initializers (values, external data included), graph inputs and outputs and opsets. Not node or
    graph names, doc strings, value_info (a quantizer's shape inference adds it) nor the model's
    metadata (a stage stamps its own): a candidate whose hash equals FP32's is FP32 whatever recipe
    made it (a quantizer that kept every node float, a kernel choice that reverted them all)."""
    import hashlib

    from onnx import numpy_helper

    from dlopt.fileio import load_onnx

    if Path(path).is_dir():  # an LM folder: its decoder's bytes (onnx.load refuses hard-linked external data)
        from dlopt.fileio import external_data_files
        from dlopt.manifest import sha256_file

        file = model_file(path)
        names = [file.name, *external_data_files(_graph(path))]
        return hashlib.sha256("\0".join(f"{n}:{sha256_file(file.parent / n)}" for n in names).encode()).hexdigest()
    model = load_onnx(path)
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        for part in parts:
            digest.update(part if isinstance(part, bytes) else repr(part).encode())
            digest.update(b"\0")

    for opset in sorted((o.domain, o.version) for o in model.opset_import):
        add("opset", *opset)
    _hash_graph(model.graph, add, numpy_helper)
    return digest.hexdigest()


def _hash_graph(graph, add, numpy_helper) -> None:
    for value in (*graph.input, *graph.output):
        value = type(value).FromString(value.SerializeToString())
        value.ClearField("doc_string")
        add("io", value.SerializeToString(deterministic=True))
    for tensor in sorted(graph.initializer, key=lambda t: t.name):
        array = numpy_helper.to_array(tensor)
        add("init", tensor.name, str(array.dtype), array.shape, array.tobytes())
    for node in graph.node:
        add("node", node.domain, node.op_type, tuple(node.input), tuple(node.output))
        for attribute in sorted(node.attribute, key=lambda a: a.name):
            if attribute.g.node or attribute.graphs:  # a subgraph (If, Loop, Scan): hashed the same way
                for sub in [attribute.g] if attribute.g.node else list(attribute.graphs):
                    add("subgraph", attribute.name)
                    _hash_graph(sub, add, numpy_helper)
            else:
                add("attr", attribute.SerializeToString(deterministic=True))


# --------------------------------------------------------------------------- the cached evaluation


def eval_key_inputs(ctx: SearchContext, candidate: Candidate) -> dict[str, Any]:
    """Everything that decides a candidate's evaluation, without running it: the source, the full
    recipe, the data, the evaluator and the host facts (dlopt.recipe.host_facts)."""
    from dlopt.recipe import data_hash, host_facts, source_hash

    recipe = ([{"kind": "export"}] if ctx.torch_source else []) + candidate.recipe()
    inputs = {
        "kind": "optimize-eval",
        "eval_format": EVAL_FORMAT,
        "source": ctx.source_id,
        "recipe": recipe,
        "target": ctx.target,
        "evaluator": ctx.evaluator,
        "data": {"calibration": data_hash(ctx.calibration), "eval_data": data_hash(ctx.eval_data)},
        "host": host_facts("quantize", SimpleNamespace(target=ctx.target)),
    }
    if ".py:" in ctx.evaluator:  # the user's metric file: its bytes decide the score
        inputs["evaluator_sha256"] = source_hash(ctx.evaluator)
    return inputs


def cached_evaluation(ctx: SearchContext, candidate: Candidate) -> Evaluated | None:
    """The stored evaluation of `candidate`, if any and its artifact is still in the cache."""
    key = cache_key(eval_key_inputs(ctx, candidate))
    entry = ctx.cache.get(key)
    if entry is None:
        return None
    try:
        data = json.loads((entry.path / RESULT_FILE).read_text())
        stored: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        result = Evaluated(**stored)
    except (OSError, ValueError, TypeError):
        return None
    if result.artifact is not None:
        artifact = Path(result.artifact)
        if not artifact.exists():
            return None  # its model was pruned from the cache: evaluate again
        if artifact.parent.parent == ctx.cache.root and ctx.cache.get(artifact.parent.name) is None:
            return None  # its model's entry no longer holds the bytes it was written with: apply it again
    return _replace(result, cached=True, eval_key=key)


def _replace(result: Evaluated, **changes: Any) -> Evaluated:
    from dataclasses import replace

    return replace(result, **changes)


def evaluate_candidate(job: tuple[SearchContext, Candidate]) -> Evaluated:
    """Apply one candidate and score it (a module-level function: it runs in executor workers).
    Deterministic failures (a verification, stage or input error) are cached like results."""
    from dlopt.manifest import artifact_hash
    from dlopt.runtime import initialize

    ctx, candidate = job
    found = cached_evaluation(ctx, candidate)
    if found is not None:
        return found
    initialize()
    started = time.perf_counter()
    inputs = eval_key_inputs(ctx, candidate)
    key = cache_key(inputs)
    try:
        artifact, run = apply_stages(ctx, candidate.stages)
        score = score_model(ctx, artifact)
        measures = _lm_measures(score_lm(ctx, artifact)) if ctx.lm else None
        stage_runs = run.stages if run is not None else ()
        result = Evaluated(
            name=candidate.name,
            ok=True,
            artifact=str(artifact),
            output_sha256=stage_runs[-1].output_sha256 if stage_runs else artifact_hash(artifact),
            bytes=_artifact_bytes(artifact),
            score=score,
            signature=graph_signature(artifact),
            graph_sha256=graph_content_hash(artifact),
            stage_keys=tuple(r.key for r in stage_runs),
            stage_reports=tuple(_stage_summary(r.entry.info) for r in stage_runs),
            measures=measures,
        )
    except DlOptError as e:
        # a failed quantize keeps its best effort beside a scratch output that is gone by now: not worth naming
        reason = re.sub(
            r"; the best effort was kept as .*?, nothing was written to the output path", "", _one_line(e.message)
        )
        result = Evaluated(name=candidate.name, ok=False, reason=reason)
    except Exception as e:  # noqa: BLE001 - a library failing on one candidate must not end the search
        return Evaluated(
            name=candidate.name,
            ok=False,
            reason=f"{type(e).__name__}: {_one_line(str(e))}",
            seconds=time.perf_counter() - started,
        )  # not cached: it may not happen again
    result = _replace(result, seconds=round(time.perf_counter() - started, 2), eval_key=key)
    cache = ctx.cache
    with cache.building(key) as staging:
        (staging / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=1))
        cache.commit(
            key,
            staging,
            {
                "kind": "optimize-eval",
                "inputs": inputs,
                "artifact": RESULT_FILE,
                "output_sha256": result.output_sha256,
                "source": ctx.source,
                "recipe": f"dlopt optimize {ctx.name}: {candidate.name}",
                "report": {"ok": result.ok, "score": result.score, "reason": result.reason},
            },
        )
    return result


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _lm_measures(found: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("perplexity", "fp32_perplexity", "perplexity_ratio", "next_token_agreement", "tokens", "windows", "window")
    return {k: found[k] for k in keys if k in found}


def _artifact_bytes(artifact: Path) -> int:
    """The model's bytes: the .onnx file and its external data (an LM folder's model.onnx and .data)."""
    from dlopt.fileio import external_data_files

    external = external_data_files(_graph(artifact))
    artifact = model_file(artifact)
    return artifact.stat().st_size + sum((artifact.parent / n).stat().st_size for n in external)


def _stage_summary(info: Mapping[str, Any]) -> dict[str, Any]:
    report = info.get("report") or {}
    summary = {"kind": info.get("kind"), "cache_key": info.get("key")}
    recipe = report.get("recipe")
    if isinstance(recipe, Mapping):
        summary["recipe_reasons"] = list(recipe.get("reasons", []))
    verdict = report.get("verdict")
    if isinstance(verdict, Mapping):
        summary["fidelity_passed"] = verdict.get("passed")
    trim = report.get("trim_padding")
    if isinstance(trim, Mapping):
        summary["trim_padding"] = trim_summary(trim)
    return summary


def trim_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """A trim-padding report (the stage's, or quantize's trim_padding) in a few figures: applied or why
    not, and the trimmed vs untrimmed model's lowest mean cosine over its outputs on the padded samples."""
    equivalence = report.get("equivalence") or {}
    cosines = [
        v["mean_cosine"] for v in (equivalence.get("outputs") or {}).values() if v.get("mean_cosine") is not None
    ]
    return {
        "applied": bool(report.get("applied")),
        "reason": report.get("reason"),
        "form": report.get("form"),
        "pack_reason": report.get("pack_reason"),
        "equivalence_cosine": min(cosines) if cosines else None,
        "feeds": equivalence.get("feeds"),
        "input_shapes": [list(s) for s in equivalence.get("input_shapes") or []],
    }


def trim_check(ctx: SearchContext, fp32_path: str, fp32_sha256: str) -> dict[str, Any]:
    """Whether padding removal applies to the FP32 model: the trim-padding stage in mode auto on the
    held-out inputs (heldout_feeds), each padded further and batched with mixed lengths; every output's
    mean cosine, trimmed vs untrimmed, must be at least the stage's floor (0.999). Cached per model and data."""
    from dlopt.fileio import load_onnx
    from dlopt.recipe import data_hash
    from dlopt.stage import StageContext, get_stage

    # trim_check_format 2: the check records the form (pack or slice)
    key = cache_key(
        {
            "kind": "optimize-trim-check",
            "eval_format": EVAL_FORMAT,
            "trim_check_format": 2,
            "model": fp32_sha256,
            "data": {"calibration": data_hash(ctx.calibration), "eval_data": data_hash(ctx.eval_data)},
        }
    )
    found = _cached_json(ctx, key)
    if found is not None:
        return found
    stage = get_stage("trim-padding")
    model = load_onnx(fp32_path)
    config = stage.config(mode="auto")
    report = stage.apply(model, config, StageContext()).report  # without data: whether the graph allows it
    if report.get("mask") is not None and (report.get("reason") or "").startswith("no held-out inputs"):
        try:
            report = stage.apply(model, config, StageContext(eval_data=heldout_feeds(ctx, model))).report
        except Exception as e:  # noqa: BLE001 - e.g. the untrimmed model itself fails on inputs padded further
            report = {
                **report,
                "reason": f"the check on held-out inputs padded further failed: {_one_line(str(e))[:300]}",
            }
    body = {
        "applies": bool(report.get("applied")),
        "reason": report.get("reason"),
        "mask": report.get("mask"),
        "form": report.get("form"),
        "sliced_inputs": report.get("sliced_inputs", []),
        "padded_back_outputs": report.get("padded_back_outputs", []),
        "check": trim_summary(report),
        "min_cosine_required": config.min_cosine,
        "cached": False,
    }
    _store_json(ctx, key, "optimize-trim-check", body)
    return body


# --------------------------------------------------------------------------- latency


def bench_data(ctx: SearchContext, samples: int = 64) -> tuple[dict[str, Any] | None, str]:
    """Real inputs to time on: the reference model's own (dlopt bench --data model:NAME), else the files
    given as --eval-data or --calibration, read as declared (dlopt.data); else None (generated inputs),
    with a description."""
    from dlopt.bench import load_data
    from dlopt.data import as_spec, data_arrays

    if ctx.evaluator.startswith("model:"):
        name = ctx.evaluator.split(":")[1]
        return load_data(f"model:{name}", samples=samples), f"model:{name} ({samples} real samples)"
    for spec in (ctx.eval_data, ctx.calibration):
        data = as_spec(spec)
        if data is not None and data.is_path:
            try:
                return data_arrays(data, ctx.fp32_onnx or ctx.source, samples=samples), str(data)
            except InputError as e:  # samples of different shapes cannot be batched: time generated ones
                return None, f"generated inputs ({data} cannot be batched: {e.message})"
    return None, "generated inputs (give an .npz as --eval-data for real ones)"


def _latency_key(ctx: SearchContext, what: str, hashes: Sequence[str], settings: Mapping[str, Any]) -> str:
    from dlopt.bench import machine_fingerprint
    from dlopt.recipe import data_hash

    return cache_key(
        {
            "kind": f"optimize-{what}",
            "eval_format": EVAL_FORMAT,
            "models": list(hashes),
            "settings": dict(settings),
            "data": data_hash(ctx.eval_data) if ctx.eval_data else ctx.evaluator,
            "machine": machine_fingerprint(int(settings.get("threads", 1))),
        }
    )


def _cached_json(ctx: SearchContext, key: str) -> dict[str, Any] | None:
    entry = ctx.cache.get(key)
    if entry is None:
        return None
    try:
        return json.loads((entry.path / RESULT_FILE).read_text()) | {"cached": True}
    except (OSError, ValueError):
        return None


def _store_json(ctx: SearchContext, key: str, kind: str, body: Mapping[str, Any]) -> None:
    with ctx.cache.building(key) as staging:
        (staging / RESULT_FILE).write_text(json.dumps(body, indent=1))
        ctx.cache.commit(
            key,
            staging,
            {
                "kind": kind,
                "inputs": {"kind": kind},
                "artifact": RESULT_FILE,
                "source": ctx.source,
                "recipe": f"dlopt optimize {ctx.name}",
                "report": {},
            },
        )


def measure_latency(
    ctx: SearchContext, models: Sequence[tuple[str, str, str]], budget_s: float, batches: Sequence[int] = (1,)
) -> dict[str, Any]:
    """Time `models` ((name, path, sha256), the FP32 source first) interleaved in one bench run: one
    thread, thread CPU time, at each of `batches` (batch 1 by default), on the model's real inputs.
    Returns per model the ratio to the first (estimate and 95 % CI) and the median ms, with the input
    shapes and the CPU label: of the first batch size at the top level, and of each in `batches`
    (where a batch mixes real lengths, with bench's as given vs sorted by length figures)."""
    from dlopt.bench import BenchConfig, benchmark
    from dlopt.runtime import cpu_label

    if ctx.lm:
        return measure_generation(ctx, models, budget_s)
    settings: dict[str, Any] = {"threads": 1, "clock": "cpu", "batch": batches[0], "budget_s": round(budget_s, 1)}
    if tuple(batches) != (1,):
        settings["batches"] = list(batches)
    key = _latency_key(ctx, "latency", [h for _, _, h in models], settings)
    found = _cached_json(ctx, key)
    if found is not None:
        return found
    data, data_text = bench_data(ctx)
    available = (
        (getattr(data, "count", None) or min((len(v) for v in data.values() if np.ndim(v)), default=0))
        if data
        else None
    )
    notes = []
    if available is not None and any(b > available for b in batches):
        notes.append(f"{data_text} holds {available} sample(s): batch sizes above it are not measured")
        batches = [b for b in batches if b <= available] or [1]
    config = BenchConfig(
        target="cpu", threads=1, clock="cpu", batch_sizes=tuple(batches), budget_s=budget_s, min_rounds=10
    )
    result = benchmark([p for _, p, _ in models], config, data=data, data_source=data_text)
    per_batch = []
    for batch in result.batches:
        rows = {}
        for (name, _, _), run in zip(models, batch.models):
            ratio = run.ratios["cpu"]
            rows[name] = {
                "median_ms": run.summaries["cpu"].median * 1e3,
                "ratio": ratio.estimate if ratio is not None else 1.0,
                "ratio_low": ratio.low if ratio is not None else 1.0,
                "ratio_high": ratio.high if ratio is not None else 1.0,
            }
        sorting = None
        if batch.length_sorting:  # bench's labels are file names: the candidates' names instead
            labels = {m.label: name for m, (name, _, _) in zip(result.models, models)}
            sorting = {
                **batch.length_sorting,
                "latency": [
                    {**row, "model": labels.get(row["model"], row["model"])}
                    for row in batch.length_sorting.get("latency", ())
                ],
            }
        per_batch.append(
            {
                "batch": batch.batch,
                "models": rows,
                "rounds": batch.rounds,
                "padding": batch.padding,
                "input_shapes": {k: list(v) for k, v in batch.input_shapes.items()},
                "length_sorting": sorting,
            }
        )
    first = per_batch[0]
    body = {
        "models": first["models"],
        "input_shapes": first["input_shapes"],
        "rounds": first["rounds"],
        "clock": "thread CPU time",
        "threads": 1,
        "batch": first["batch"],
        "data": data_text,
        "cpu": cpu_label(),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cached": False,
    }
    if tuple(batches) != (1,):
        body["batches"], body["notes"] = per_batch, notes
    _store_json(ctx, key, "optimize-latency", body)
    return body


def lm_generation_shape(folder: str | Path) -> tuple[int, int]:
    """(prompt tokens, new tokens) of the generation timed for an LM folder: LM_PROMPT_LEN and
    LM_NEW_TOKENS, cut to fit its context (a quarter for the prompt at most)."""
    from dlopt.lm import read_genai_config

    context = int(read_genai_config(folder)["model"]["context_length"])
    prompt = max(1, min(LM_PROMPT_LEN, context // 4))
    return prompt, max(1, min(LM_NEW_TOKENS, context - prompt))


def measure_generation(ctx: SearchContext, models: Sequence[tuple[str, str, str]], budget_s: float) -> dict[str, Any]:
    """Time greedy generation of the LM folders `models` ((name, path, sha256), FP32 first) interleaved in
    one run of dlopt.bench.generate (onnxruntime-genai, one thread, thread CPU time, batch 1, seeded
    prompts): per model the decode time per token as a ratio to the first (estimate and 95 % CI), its
    median ms, decode tokens/s and the prefill ms. The ratio is what the Pareto front and the choice use
    (lower is faster: 1 / the tokens/s ratio)."""
    from dlopt.bench.generate import GenerateConfig, benchmark_generate
    from dlopt.runtime import cpu_label

    prompt, new = lm_generation_shape(ctx.source)
    settings = {"threads": 1, "clock": "cpu", "batch": 1, "budget_s": round(budget_s, 1), "prompt": prompt, "new": new}
    key = _latency_key(ctx, "generation", [h for _, _, h in models], settings)
    found = _cached_json(ctx, key)
    if found is not None:
        return found
    config = GenerateConfig(prompt_len=prompt, new_tokens=new, threads=1, clock="cpu", budget_s=budget_s)
    result = benchmark_generate([p for _, p, _ in models], config)
    batch = result.batches[0]
    rows = {}
    for (name, _, _), run in zip(models, batch.models):
        decode = run.summaries["decode_per_token"]["cpu"].median
        ratio = run.ratios["decode_per_token"]["cpu"]
        rows[name] = {
            "median_ms": decode * 1e3,
            "ratio": ratio.estimate if ratio is not None else 1.0,
            "ratio_low": ratio.low if ratio is not None else 1.0,
            "ratio_high": ratio.high if ratio is not None else 1.0,
            "decode_tokens_per_s": 1.0 / decode if decode > 0 else None,
            "prefill_ms": run.summaries["prefill"]["cpu"].median * 1e3,
        }
    body = {
        "models": rows,
        "input_shapes": {"input_ids": [1, prompt]},
        "rounds": batch.rounds,
        "clock": "thread CPU time",
        "threads": 1,
        "batch": 1,
        "data": f"seeded random prompts of {prompt} tokens, {new} new tokens greedy (onnxruntime-genai); "
        "latency = decode ms per token",
        "cpu": cpu_label(),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cached": False,
    }
    _store_json(ctx, key, "optimize-generation", body)
    return body


def measure_throughput(
    ctx: SearchContext,
    path: str,
    sha256: str,
    batches: Sequence[int],
    threads: Sequence[int],
    budget_s: float,
    max_latency_ms: float | None = None,
) -> dict[str, Any]:
    """Throughput (items/s) and wall-clock latency (median, p90) of one model at each intra-op thread
    count and batch size (wall clock: pool threads' work is invisible to a thread's CPU clock). Batch
    sizes are tried in increasing order, each in its own bench run of `budget_s`; the next is not
    tried when this one gained less than 5 % throughput over the last, went over `max_latency_ms`
    (p90), or would need more than `budget_s` for a few calls (its latency grows with the batch)."""
    from dlopt.bench import BenchConfig, benchmark
    from dlopt.runtime import cpu_label

    settings = {
        "threads": max(threads),
        "clock": "wall",
        "batches": list(batches),
        "thread_counts": list(threads),
        "budget_s": round(budget_s, 1),
        "max_latency_ms": max_latency_ms,
    }
    key = _latency_key(ctx, "throughput", [sha256], settings)
    found = _cached_json(ctx, key)
    if found is not None:
        return found
    data, data_text = bench_data(ctx, samples=max(64, 2 * max(batches)))
    available = min((len(v) for v in data.values()), default=0) if data else None
    notes = []
    if available is not None and any(b > available for b in batches):
        notes.append(f"{data_text} holds {available} sample(s): batch sizes above it are not measured")
        batches = [b for b in batches if b <= available] or [1]
    rows = []
    for t in threads:
        last: dict[str, Any] | None = None
        for b in sorted(batches):
            if last is not None:
                projected_ms = last["median_ms"] * b / last["batch"]
                why = (
                    "throughput gained < 5 %"
                    if last["gain"] < 1.05
                    else f"p90 {last['p90_ms']:.3g} ms > {max_latency_ms:g} ms"
                    if max_latency_ms is not None and last["p90_ms"] > max_latency_ms
                    else f"about {projected_ms:.0f} ms a call: too few calls in {budget_s:g} s"
                    if projected_ms * 8 > budget_s * 1e3
                    else None
                )
                if why:
                    notes.append(f"{t} thread(s): batch {b} and above not measured ({why} at batch {last['batch']})")
                    break
            config = BenchConfig(
                target="cpu", threads=t, clock="wall", batch_sizes=(b,), budget_s=budget_s, min_rounds=3
            )
            try:
                result = benchmark([path], config, data=data, data_source=data_text)
            except InputError as e:  # e.g. a model with a fixed batch axis
                notes.append(f"{t} thread(s), batch {b}: {_one_line(e.message)}")
                break
            run = result.batches[0]
            s = run.models[0].summaries["wall"]
            row: dict[str, Any] = {
                "threads": t,
                "batch": run.batch,
                "median_ms": s.median * 1e3,
                "p90_ms": s.p90 * 1e3,
                "items_per_s": run.batch / s.median if s.median > 0 else None,
                "input_shapes": {k: list(v) for k, v in run.input_shapes.items()},
            }
            rows.append(row)
            gain = (row["items_per_s"] or 0) / last["items_per_s"] if last and last["items_per_s"] else float("inf")
            last = {**row, "gain": gain}
    body = {
        "rows": rows,
        "notes": notes,
        "clock": "wall",
        "data": data_text,
        "cpu": cpu_label(),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cached": False,
    }
    _store_json(ctx, key, "optimize-throughput", body)
    return body


__all__ = [
    "Evaluated",
    "SearchContext",
    "accuracy_drop",
    "apply_stages",
    "build_recipe",
    "drop_unit",
    "evaluate_candidate",
    "graph_content_hash",
    "lm_generation_shape",
    "measure_generation",
    "measure_latency",
    "measure_throughput",
    "score_lm",
    "score_model",
]
