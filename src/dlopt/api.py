"""The public Python API: everything the CLI does, as functions. The CLI only parses and prints."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlopt.errors import DlOptError, InputError, StageError, VerificationError
from dlopt.fileio import check_output_path, guard_outputs, guard_source_spec, json_text, stage_onnx, staged_outputs


@dataclass(frozen=True)
class WrittenModel:
    model_path: Path
    report_path: Path
    report: dict[str, Any]


def report_path_for(model_path: str | os.PathLike, stage: str) -> Path:
    """Where a stage's JSON report goes: beside the model, `NAME.<stage>.json`."""
    path = Path(model_path)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.{stage}.json")


def export_model(source, output: str | os.PathLike, config=None,
                 log: Callable[[str], None] = lambda message: None) -> WrittenModel:
    """Export SOURCE (a reference model name, "file.py:build", "pkg.module:build" or a ModelSource) to
    ONNX at `output`, verified against torch; writes the model and its JSON report atomically.

    Raises VerificationError (and writes nothing) when outputs differ, unless config.allow_mismatch."""
    from dlopt.optimize.export import ExportConfig, ModelSource, export, load_source

    config = config or ExportConfig()
    out = check_output_path(output)  # fail before minutes of work, not after
    report_path = check_output_path(report_path_for(out, "export"))
    if not isinstance(source, ModelSource):
        guard_outputs([guard_source_spec(source)], [out, report_path])
        log(f"loading {source}")
        source = load_source(source)
    exporter = config.exporter or source.exporter or "dynamo"
    why = "" if config.exporter or not source.exporter else " (the model's preferred exporter)"
    log(f"exporting {source.name} with the {exporter} exporter{why}, opset {config.opset}")
    result = export(source, config, log=log)
    # The model and its report are renamed into place together: never a new model beside an old report.
    with staged_outputs() as outputs:
        model_tmp = stage_onnx(result.model, out, outputs)
        report = result.report | {"output": str(out), "bytes": model_tmp.stat().st_size}
        outputs.stage(report_path).write_text(json_text(report))
    return WrittenModel(out, report_path, report)


def quantize_model(model_path: str | os.PathLike, output: str | os.PathLike, config=None, calibration=None, *,
                   eval_data=None, log: Callable[[str], None] = lambda message: None):
    """Quantize MODEL.onnx to `output` (INT8/INT4/FP16 per config, a QuantizeConfig); writes the model
    and `NAME.quantize.json` atomically. See dlopt.optimize.quantize.quantize_file."""
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file

    return quantize_file(model_path, output, config or QuantizeConfig(), calibration, eval_data=eval_data, log=log)



# ------------------------------------------------------------------------------------------------- the other verbs
# bench, eval, gate, package, verify, keygen, models, run, cache: each checks its inputs, does the work, writes
# the files it was asked for atomically and returns a result object; nothing here prints. Heavy modules are
# imported inside the functions, so `import dlopt.api` (and the CLI) stays fast.

Log = Callable[[str], None]
Progress = Callable[[str, float], None]


def _quiet(message: str) -> None:
    pass


@dataclass(frozen=True)
class Measured:
    """A benchmark's result and the files written from it (JSON result, stored baseline)."""

    result: BenchResult
    written: tuple[Path, ...] = ()


def bench(models: Sequence[str | os.PathLike], config: BenchConfig | None = None, *,
          data: str | os.PathLike | Mapping[str, Any] | None = None, json_path: str | os.PathLike | None = None,
          baseline_path: str | os.PathLike | None = None, progress: Progress | None = None,
          started: float | None = None) -> Measured:
    """Measure MODELS (.onnx files) interleaved on `config.target`; each is reported as a ratio to the
    first with a bootstrap 95 % confidence interval (dlopt.bench.benchmark).

    `data`: real inputs, an .npz path, "model:NAME" or {input name: array} (first axis = samples).
    `json_path` receives the full result, `baseline_path` the first model's samples and this machine's
    fingerprint for `gate`; both are checked before measuring and written atomically. `started`: a
    time.perf_counter() value the budget counts from (default: now)."""
    from dlopt.bench import BenchConfig, benchmark, load_data

    config = config or BenchConfig()
    for path in (json_path, baseline_path):
        if path:
            check_output_path(path)  # before minutes of measuring, not after
    data_path = data if isinstance(data, (str, os.PathLike)) else None
    guard_outputs([*models, data_path], [json_path, baseline_path])
    arrays = data
    if data_path is not None:
        arrays = load_data(data_path, samples=max(config.batch_sizes) * 8, seq_len=config.seq_len)
    result = benchmark(models, config, data=arrays, data_source=str(data_path) if data_path else "data",
                       progress=progress, started=started)
    written = []
    if json_path:
        from dlopt.fileio import write_json_atomic

        written.append(write_json_atomic(json_path, result.to_dict()))
    if baseline_path:
        from dlopt.gate import save_baseline

        written.append(save_baseline(baseline_path, result, inputs_from_data=data is not None))
    return Measured(result, tuple(written))


def evaluate(model: str | os.PathLike, *, data: str | os.PathLike | None = None,
             reference_model: str | None = None, reference: str | os.PathLike | None = None,
             config: EvalConfig | None = None, json_path: str | os.PathLike | None = None) -> EvalResult:
    """Accuracy metrics of MODEL (.onnx): on `data` (an .npz with the model's inputs, optional `labels` and
    expected outputs; `config.metrics` from top1, cosine, sqnr, mse), or with `reference_model`'s own
    evaluator on its real data. `reference` (e.g. the FP32 source .onnx) is run on the same inputs and
    shown beside. `json_path` receives the result (written atomically)."""
    from dlopt.evaluate import EvalConfig, evaluate_data, evaluate_reference_model

    config = config or EvalConfig()
    if json_path:
        check_output_path(json_path)
        guard_outputs([model, data, reference], [json_path])
    if (data is None) == (reference_model is None):
        raise InputError("give either {data=FILE.npz} or {reference_model=NAME}",
                         "data evaluates on your arrays; reference_model uses a reference model's evaluator")
    if config.threads < 0:
        raise InputError(f"threads must be 0 or more, got {config.threads}", "0 uses all cores")
    if data is not None:
        result = evaluate_data(model, data, config, reference=reference)
    else:
        result = evaluate_reference_model(model, reference_model, config, reference=reference)
    if json_path:
        from dlopt.fileio import write_json_atomic

        write_json_atomic(json_path, result.to_dict())
    return result


@dataclass(frozen=True)
class Gated:
    """A gate's verdict (`result.exit_code`: 0 pass, 1 regression, 3 inconclusive) and the reports written."""

    result: GateResult
    written: tuple[Path, ...] = ()


def gate(baseline: str | os.PathLike, candidate: str | os.PathLike, config: GateConfig | None = None, *,
         evaluator: EvalSpec | None = None, data: str | os.PathLike | Mapping[str, Any] | None = None,
         summary: str | os.PathLike | None = None, junit: str | os.PathLike | None = None,
         json_path: str | os.PathLike | None = None, github_summary: str | os.PathLike | None = None,
         progress: Progress | None = None) -> Gated:
    """Gate CANDIDATE against BASELINE (a model, re-measured interleaved, or a stored baseline .json) on
    latency, and on size and accuracy where `config` sets their limits (accuracy with `evaluator`).

    `data`: real inputs to time the models on (an .npz path, "model:NAME" or arrays). Reports: a Markdown
    `summary`, a `junit` XML and the `json_path` result are written atomically; `github_summary` (the
    $GITHUB_STEP_SUMMARY file) is appended to. Raises InputError before any long work on bad input."""
    from dlopt.bench import load_data
    from dlopt.gate import GateConfig, run_gate, write_outputs

    config = config or GateConfig()
    for path in (summary, junit, json_path):
        if path:
            check_output_path(path)  # before a minute of measuring, not after
    data_path = data if isinstance(data, (str, os.PathLike)) else None
    guard_outputs([baseline, candidate, data_path, evaluator.data if evaluator else None],
                  [summary, junit, json_path, github_summary])
    arrays = data
    if data_path is not None:
        arrays = load_data(data_path, samples=8 * (config.batch or 1), seq_len=config.seq_len or 128)
    result = run_gate(baseline, candidate, config, data=arrays, evaluator=evaluator, progress=progress)
    written = write_outputs(result, summary=summary, junit=junit, json_path=json_path,
                            github_summary=str(github_summary) if github_summary else None)
    return Gated(result, tuple(written))


def package_model(model: str | os.PathLike, output: str | os.PathLike, config: PackageConfig | None = None, *,
                  data: str | os.PathLike | Mapping[str, Any] | None = None, sign_key: str | os.PathLike | None = None,
                  log: Log = _quiet) -> PackageResult:
    """Package MODEL (.onnx) into the bundle folder `output` for `config.target`, verified before it is
    written (dlopt.package.package). `data`: sample inputs (an .npz path or arrays) instead of generated
    ones; `sign_key`: an Ed25519 private key (`keygen`) that signs the manifest."""
    from dlopt.package import PackageConfig, package

    feeds = data
    if isinstance(data, (str, os.PathLike)):
        from dlopt.bench import load_data

        guard_outputs([data], [output])  # package() guards the model, calibration and torch source
        feeds = load_data(data)
    return package(model, output, config or PackageConfig(), data=feeds, sign_key=sign_key, log=log)


def package_text(result: PackageResult) -> str:
    """What `dlopt package` prints: the bundle's summary, coverage with advice, latency per target, files."""
    import json

    from dlopt.package import summary_table
    from dlopt.report import format_table
    from dlopt.targets.mobile import COVERAGE_HEADERS, coverage_table_rows

    manifest = result.manifest
    lines = [summary_table(manifest)]
    if manifest["coverage"]:
        report = json.loads((result.bundle / manifest["coverage"]["file"]).read_text())
        lines += ["", format_table(COVERAGE_HEADERS, coverage_table_rows(report))]
        lines += [f"advice: {line}" for line in report["advice"]]
    if manifest["metrics"]:
        rows = [[k, v["artifact"], v["threads"], v["clock"], v["latency_ms"]["median"], v["latency_ms"]["p90"],
                 f"{v['ratio_to_ort']['estimate']:.3f}" if "ratio_to_ort" in v else "-"]
                for k, v in manifest["metrics"].items()]
        lines += ["", format_table(["target", "artifact", "threads", "clock", "median ms", "p90 ms", "ratio to ORT"],
                                   rows)]
        if manifest["target"] == "mobile":
            lines.append("note: mobile latency is ONNX Runtime's CPU kernels on this host with a phone-like thread "
                         "count, not a phone")
    files = ", ".join(f"{f['path']} ({f['bytes'] / 1e6:.2f} MB)" for f in manifest["files"])
    lines.append(f"wrote {result.bundle}: {files}")
    return "\n".join(lines)


def verify(bundle: str | os.PathLike, *, check_outputs: bool = True, trusted_key: str | os.PathLike | None = None,
           atol: float | None = None, rtol: float | None = None) -> VerifyResult:
    """Re-check BUNDLE (written by `package_model`): every file's sha256, no file missing or added, and
    unless `check_outputs` is False the model's outputs against the source's stored ones within
    `atol`/`rtol` (default 1e-4/1e-3; a criterion in the manifest can only tighten them). With
    `trusted_key` (a public key from `keygen`) the manifest must carry that key's signature.

    Returns the result whether or not it passed (`result.passed`); `verification_error(result)` is the
    error to raise for a failure. Raises InputError when BUNDLE is not a folder or the key is unreadable."""
    from dlopt.verify import Tolerance, verify_bundle

    defaults = Tolerance()
    tolerance = Tolerance(atol=defaults.atol if atol is None else atol, rtol=defaults.rtol if rtol is None else rtol,
                          explicit=atol is not None or rtol is not None)
    return verify_bundle(bundle, check_outputs=check_outputs, trusted_key=trusted_key, tolerance=tolerance)


@dataclass(frozen=True)
class KeyPair:
    private_key: Path
    public_key: Path
    fingerprint: str  # sha256 of the public key, what a manifest's signer record names


def keygen(*, output: str | os.PathLike | None = None, private: str | os.PathLike | None = None,
           public: str | os.PathLike | None = None) -> KeyPair:
    """Write a new Ed25519 key pair as PEM files, the private one with mode 0600: into the folder
    `output` (as dlopt-signing.key / .pub), or to the files `private` and `public`. Existing files are
    never overwritten. Sign bundles with the private key, verify them with the public one."""
    from dlopt.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_key_pair

    if output is not None and (private or public):
        raise InputError("{output=DIR} and {private=KEY}/{public=PUB} both given",
                         "give {output=DIR}, or both {private=KEY} and {public=PUB}")
    if output is None and not (private and public):
        raise InputError("no key paths given", "give {output=DIR}, or both {private=KEY} and {public=PUB}")
    if output is not None:
        folder = Path(output)
        if not folder.is_dir():
            raise InputError(f"key folder {folder} does not exist", "create it first")
        private, public = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    fingerprint = generate_key_pair(private, public)
    return KeyPair(Path(private), Path(public), fingerprint)


@dataclass(frozen=True)
class ModelEntry:
    """One reference model as `models` lists it; `evaluation` when it was evaluated."""

    name: str
    summary: dict[str, Any]  # ReferenceModel.summary(): size, inputs, metrics, installed, missing
    evaluation: Fp32Evaluation | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.summary | ({"evaluation": self.evaluation.to_dict()} if self.evaluation else {})


def models(names: Sequence[str] = (), *, evaluate: bool = False, log: Log = _quiet) -> list[ModelEntry]:
    """The reference models that ship with dlopt (all, or `names`), each with its size, inputs, metrics and
    the packages it misses. With `evaluate`, each named model is built in torch (FP32) and its evaluator
    run on its real data (seconds to a minute each)."""
    from dlopt.models import REFERENCE_MODELS, get_reference_model

    if evaluate and not names:
        raise InputError("{evaluate} needs model names",
                         f"name the models to evaluate, e.g. fashion-cnn (models: {', '.join(REFERENCE_MODELS)})")
    refs = [get_reference_model(n) for n in names] if names else list(REFERENCE_MODELS.values())
    return [ModelEntry(ref.name, ref.summary(), ref.evaluate_fp32(log) if evaluate else None) for ref in refs]


def models_text(entries: Sequence[ModelEntry]) -> str:
    """What `dlopt models` prints: one row per model, then each evaluation's metrics."""
    from dlopt.report import format_table

    rows = [[s["name"], s["parameters_millions"], s["fp32_megabytes"], s["inputs"], ", ".join(s["metrics"]),
             "yes" if s["installed"] else "missing: " + ", ".join(s["missing"])] for s in (e.summary for e in entries)]
    lines = [format_table(["model", "params (M)", "fp32 MB", "inputs", "metrics", "installed"], rows)]
    for e in entries:
        if e.evaluation is not None:
            ev = e.evaluation
            lines.append(f"\n{e.name} (torch FP32): built in {ev.build_seconds:.1f} s, "
                         f"evaluated in {ev.evaluate_seconds:.1f} s")
            lines.append(format_table(["metric", "value"], list(ev.metrics.items())))
    return "\n".join(lines)


def _cache(cache_dir: str | os.PathLike | None) -> StageCache:
    from dlopt.stagecache import StageCache, default_cache_dir

    return StageCache(cache_dir or default_cache_dir())


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The stage cache's folder: `cache_dir`, else $DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages."""
    return _cache(cache_dir).root


def run(recipe: str | os.PathLike, output: str | os.PathLike, *, force: str | None = None, overwrite: bool = False,
        cache_dir: str | os.PathLike | None = None, log: Log = _quiet) -> RunResult:
    """Run RECIPE (TOML: a source model, its data, a target and [[stage]] tables) and write the last stage's
    artifact to `output` (an .onnx model, or a bundle folder when the last stage is package). Each stage's
    output is cached by content in `cache_dir` (default $DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages);
    `force` (a stage kind or 1-based index) redoes that stage and every one after it."""
    from dlopt.recipe import load_recipe, run_recipe

    return run_recipe(load_recipe(recipe), output, cache=_cache(cache_dir), force=force, overwrite=overwrite, log=log)


def run_text(result: RunResult) -> str:
    """What `dlopt run` prints: one row per stage (ran or cached, seconds, cache key, output hash)."""
    from dlopt.report import format_table

    rows = [[r.stage.index, r.stage.kind, "cached" if r.cached else "ran", f"{r.seconds:.2f}", r.key[:12],
             r.output_sha256[:12]] for r in result.stages]
    return format_table(["#", "stage", "status", "seconds", "cache key", "output sha256"], rows)


@dataclass(frozen=True)
class CacheListing:
    """The stage cache's folder and its entries (oldest first)."""

    root: Path
    entries: tuple[Entry, ...]

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)


@dataclass(frozen=True)
class CachePruned:
    root: Path
    removed: tuple[Entry, ...]
    left: tuple[Entry, ...]


def cache_ls(cache_dir: str | os.PathLike | None = None) -> CacheListing:
    """The cached stage outputs of `run`, oldest first."""
    cache = _cache(cache_dir)
    return CacheListing(cache.root, tuple(cache.entries()))


def cache_text(listing: CacheListing) -> str:
    """What `dlopt cache ls` prints: key, stage, size, age and source of each entry, and the total."""
    import time

    from dlopt.report import format_table
    from dlopt.stagecache import age_text

    now = time.time()
    rows = [[e.key[:12], e.kind, f"{e.bytes / 1e6:.2f} MB", age_text(now - e.created), e.info.get("source", "?")]
            for e in listing.entries]
    return (format_table(["key", "stage", "size", "age", "source"], rows)
            + f"\n{len(listing.entries)} entries, {listing.bytes / 1e6:.2f} MB in {listing.root}")


def cache_prune(*, older_than: str | float | None = None, max_size: str | int | None = None, all: bool = False,
                cache_dir: str | os.PathLike | None = None) -> CachePruned:
    """Remove cached stage outputs: those older than `older_than` (seconds, or text such as "7d", "12h"),
    then the oldest until the rest fit in `max_size` (bytes, or text such as "2GB"), or `all` of them."""
    from dlopt.stagecache import parse_age, parse_size

    everything = all  # the keyword mirrors the CLI's --all; the builtin is not used below
    if not (older_than or max_size or everything):
        raise InputError("nothing to prune by", "pass {older_than=AGE}, {max_size=SIZE} or {all}")
    cache = _cache(cache_dir)
    removed = cache.prune(older_than_s=parse_age(older_than) if isinstance(older_than, str) else older_than,
                          max_bytes=parse_size(max_size) if isinstance(max_size, str) else max_size,
                          everything=everything)
    return CachePruned(cache.root, tuple(removed), tuple(cache.entries()))


# Config classes, result types and formatters the callers of these functions need, re-exported by name and
# imported on first use (PEP 562), so that importing dlopt.api stays as fast as the CLI's start-up needs.
_LAZY = {
    "BenchConfig": "dlopt.bench", "BenchResult": "dlopt.bench", "parse_duration": "dlopt.bench",
    "parse_batch_sizes": "dlopt.bench", "format_bench": "dlopt.bench:format_result",
    "EvalConfig": "dlopt.evaluate", "EvalResult": "dlopt.evaluate", "format_eval": "dlopt.evaluate",
    "validate_metrics": "dlopt.evaluate",
    "GateConfig": "dlopt.gate", "GateResult": "dlopt.gate", "EvalSpec": "dlopt.gate", "format_gate": "dlopt.gate:format_text",
    "PackageConfig": "dlopt.package", "PackageResult": "dlopt.package",
    "Tolerance": "dlopt.verify", "VerifyResult": "dlopt.verify", "format_verify": "dlopt.verify:format_result",
    "origin_text": "dlopt.verify", "verification_error": "dlopt.verify", "verified_text": "dlopt.verify",
    "RunResult": "dlopt.recipe", "StageCache": "dlopt.stagecache", "Entry": "dlopt.stagecache",
    "Fp32Evaluation": "dlopt.models", "ImagePreprocess": "dlopt.images",
    "reset_written": "dlopt.fileio", "written_paths": "dlopt.fileio",  # what an interrupted command had written
    "ExportConfig": "dlopt.optimize.export", "DEFAULT_OPSET": "dlopt.optimize.export",
}

if TYPE_CHECKING:
    from dlopt.bench import BenchConfig, BenchResult
    from dlopt.evaluate import EvalConfig, EvalResult
    from dlopt.gate import EvalSpec, GateConfig, GateResult
    from dlopt.models import Fp32Evaluation
    from dlopt.package import PackageConfig, PackageResult
    from dlopt.recipe import RunResult
    from dlopt.stagecache import Entry, StageCache
    from dlopt.verify import VerifyResult


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value


__all__ = ["CacheListing", "CachePruned", "DlOptError", "Gated", "InputError", "KeyPair", "Measured", "ModelEntry",
           "StageError", "VerificationError", "WrittenModel", "bench", "cache_ls", "cache_prune", "cache_root", "cache_text",
           "evaluate", "export_model", "gate", "keygen", "models", "models_text", "package_model", "package_text",
           "quantize_model", "report_path_for", "run", "run_text", "verify", *_LAZY]
