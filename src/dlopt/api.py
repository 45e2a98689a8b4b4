"""The public Python API: everything the CLI does, as functions. The CLI only parses and prints."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlopt.errors import DlOptError, InputError, StageError, VerificationError
from dlopt.fileio import WrittenModel, check_output_path, guard_outputs, report_path_for


def export_model(
    source, output: str | os.PathLike, config=None, log: Callable[[str], None] = lambda message: None
) -> WrittenModel:
    """Export SOURCE (a reference model name, "file.py:build", "pkg.module:build" or a ModelSource) to
    ONNX at `output`, verified against torch; writes the model and its JSON report atomically
    (dlopt.optimize.export.export_file).

    Raises VerificationError (and writes nothing) when outputs differ, unless config.allow_mismatch."""
    from dlopt.optimize.export import export_file

    return export_file(source, output, config, log=log)


def export_lm(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config=None,
    *,
    log: Callable[[str], None] = lambda message: None,
):
    """Export a decoder LM for generation (--task text-generation): SOURCE is a Hugging Face causal-LM
    folder or "smollm2"; `output` a new folder that onnxruntime-genai loads as it is (model.onnx with a KV
    cache, genai_config.json, tokenizer, export.json). Verified against transformers over the prefill and
    decode steps; VerificationError (nothing written) on a mismatch. Returns an LmExport (folder, report)."""
    from dlopt.optimize.export_lm import ExportLm, export_text_generation

    if str(source) != "smollm2":
        guard_outputs([source], [output])
    return export_text_generation(source, output, config or ExportLm(), log=log)


@dataclass(frozen=True)
class MeasuredGeneration:
    """A generation benchmark's result and the JSON file written from it."""

    result: GenerateResult
    written: tuple[Path, ...] = ()


def bench_generate(
    models: Sequence[str | os.PathLike],
    config: GenerateConfig | None = None,
    *,
    json_path: str | os.PathLike | None = None,
    progress: Progress | None = None,
    started: float | None = None,
) -> MeasuredGeneration:
    """Measure greedy generation of exported LM folders (prefill, time to first token, decode tokens/s,
    peak RSS) with onnxruntime-genai, interleaved; each is a ratio to the first, per phase, with bootstrap
    CIs (dlopt.bench.generate). `json_path` receives the full result (schema bench_generate.schema.json)."""
    from dlopt.bench.generate import GenerateConfig, benchmark_generate

    if json_path:
        check_output_path(json_path)
        guard_outputs(list(models), [json_path])
    result = benchmark_generate(models, config or GenerateConfig(), progress=progress, started=started)
    written = []
    if json_path:
        from dlopt.fileio import write_json_atomic

        written.append(write_json_atomic(json_path, result.to_dict()))
    return MeasuredGeneration(result, tuple(written))


def quantize_model(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    config=None,
    calibration=None,
    *,
    eval_data=None,
    after: tuple[str, ...] = (),
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
):
    """Quantize MODEL.onnx to `output` with a scheme config (Int8Dynamic, Int8Static, Int8WeightOnly,
    Int4WeightOnly, Fp16 from dlopt.optimize.quantize) or a QuantizeConfig request (precision, mode auto:
    the scheme is chosen for the model, target and CPU, and recorded in the report); writes the model
    and `NAME.quantize.json` atomically. `after`: the stages that made MODEL, named in errors; `progress`:
    progress bars on stderr. A result below its fidelity floor is kept as NAME.failed.onnx and the outcome
    says so (`passed`; `quantize_failure(outcome)` is the error to raise). See
    dlopt.optimize.quantize.quantize_file."""
    from dlopt.optimize.quantize.files import quantize_file
    from dlopt.optimize.quantize.schemes import QuantizeConfig

    return quantize_file(
        model_path,
        output,
        config or QuantizeConfig(),
        calibration,
        eval_data=eval_data,
        after=after,
        progress=progress,
        log=log,
    )


def is_lm_folder(path: str | os.PathLike) -> bool:
    """An exported LM folder (genai_config.json beside model.onnx), as `dlopt export --task text-generation` writes."""
    from dlopt.lm import is_lm_folder as check

    return check(path)


def quantize_lm(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    config=None,
    calibration: str | os.PathLike | None = None,
    *,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Quantize an exported LM FOLDER to 4 bits (mixed 4/8-bit under `config.max_size_mb`) into the new
    folder `output`, which onnxruntime-genai loads as it is; `calibration` is UTF-8 text (GPTQ, the block
    size and the 8-bit layers are measured on it). `config`: a QuantizeLm. Returns the report (also
    OUTPUT/quantize.json). See dlopt.optimize.quantize_lm."""
    from dlopt.optimize.quantize_lm import QuantizeLm, quantize_lm_folder

    guard_outputs([folder, calibration], [output])
    return quantize_lm_folder(folder, output, config or QuantizeLm(), calibration, log=log)


def lm_quantize_config(**fields: Any):
    """A QuantizeLm (dlopt.optimize.quantize_lm) from its fields, checked: block_size, max_size_mb,
    accuracy_level ..."""
    from dlopt.optimize.quantize_lm import QuantizeLm, check_config

    config = QuantizeLm(**fields)
    check_config(config)
    return config


def prune_model(
    source: str,
    output_dir: str | os.PathLike,
    config=None,
    *,
    bench_seconds: float | None = 15.0,
    batch: int = 1,
    seq_len: int = 128,
    log: Callable[[str], None] = lambda message: None,
):
    """Load SOURCE (a reference model or a factory), prune it (a dlopt.optimize.prune.Prune config) and
    write OUT/pruned.pt + a verified OUT/pruned.onnx + OUT/prune.json; returns a TorchStageArtifacts.

    Structured: the dense model is exported too (OUT/dense.onnx) and the latency ratio measured
    (`bench_seconds`, one thread, interleaved; None skips it). Unstructured: sparsity and gzip sizes,
    and no latency ratio (there is no speedup to claim). The files are renamed into place together at
    the end: a failed or interrupted run leaves the folder as it was (and removes it when it made it)."""
    from dlopt.errors import InputError
    from dlopt.optimize.prune import Prune, prune_files, prune_stage

    config = config or Prune()
    prune_stage.check_config(config)
    _check_bench_numbers(bench_seconds, batch, seq_len)
    if bench_seconds is not None and bench_seconds <= 0:
        raise InputError(
            f"the benchmark time must be positive, got {bench_seconds}",
            "give a positive time, or none to skip the benchmark",
        )

    return prune_files(source, output_dir, config, bench_seconds=bench_seconds, batch=batch, seq_len=seq_len, log=log)


def _check_bench_numbers(bench_seconds: float | None, batch: int = 1, seq_len: int = 1) -> None:
    """prune's and distill's latency check: finite numbers, within the limits (dlopt.limits), before any work."""
    from dlopt.limits import MAX_BATCH, MAX_MEASURE_S, check_number

    check_number(batch, "{batch=N}", minimum=1, integer=True)
    check_number(seq_len, "{seq_len=N}", minimum=1, integer=True)
    MAX_BATCH.check(batch, "batch")
    MAX_BATCH.check(seq_len, "seq_len")  # a sequence as long as the largest batch: far past any model's
    if bench_seconds is not None:
        check_number(bench_seconds, "{bench_seconds=S}")
        MAX_MEASURE_S.check(bench_seconds, "bench_seconds")


def distill_model(
    teacher_spec: str,
    student_path: str | os.PathLike,
    data_spec: str,
    output_dir: str | os.PathLike,
    *,
    epochs: int = 3,
    temperature: float = 4.0,
    alpha: float = 0.7,
    loss: Loss | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    val_fraction: float = 0.1,
    patience: int | None = 2,
    hidden_layers: tuple[tuple[str, str], ...] = (),
    hidden_weight: float = 0.0,
    seed: int = 0,
    device: Device = "cpu",
    resume: bool = False,
    bench_seconds: float | None = 15.0,
    show_progress: bool = True,
    student_source: str | None = None,
    log: Callable[[str], None] = lambda message: None,
):
    """Distill TEACHER into the checkpoint STUDENT on DATA (an .npz, or "reference": the teacher reference
    model's own training data); writes OUT/distilled.pt, a verified OUT/distilled.onnx and OUT/distill.json,
    renamed into place together at the end (the training state, OUT/distill_state.pt, is saved after every
    epoch: `resume` continues it); returns a TorchStageArtifacts. With `bench_seconds`, the latency against
    the teacher (one thread, interleaved).

    The student is rebuilt from the source its checkpoint records, which is imported only if its file
    still has the recorded sha256, or from `student_source` when the user names one."""
    from dlopt.checkpoint import checked_source, read_checkpoint
    from dlopt.errors import InputError
    from dlopt.optimize.distill import Distill, distill_files, distill_stage

    embedding_teacher = teacher_spec == "minilm"
    config = Distill(
        epochs=epochs,
        temperature=temperature,
        alpha=alpha,
        loss=loss or ("cosine" if embedding_teacher else "kl"),
        lr=lr or (3e-4 if embedding_teacher else 1e-3),
        batch_size=batch_size,
        hidden_layers=hidden_layers,
        hidden_weight=hidden_weight,
        patience=patience,
        seed=seed,
        device=device,
        freeze=("bert.embeddings",) if embedding_teacher else (),
    )
    distill_stage.check_config(config)
    _check_bench_numbers(bench_seconds)
    from dlopt.limits import check_number

    check_number(val_fraction, "{val_fraction=SHARE}", minimum=0, maximum=1)
    if max_samples is not None:
        check_number(max_samples, "{max_samples=N}", minimum=1, integer=True)
    student_path, out_dir = Path(student_path), Path(output_dir)
    checkpoint = read_checkpoint(student_path)  # fail on a bad checkpoint before loading models
    source_spec = student_source or checked_source(checkpoint, student_path)
    if data_spec != "reference" and not Path(data_spec).is_file():
        raise InputError(f"data file {data_spec} does not exist", "give an .npz file or 'reference'")

    return distill_files(
        teacher_spec,
        checkpoint,
        source_spec,
        student_path,
        data_spec,
        out_dir,
        config,
        max_samples=max_samples,
        val_fraction=val_fraction,
        seed=seed,
        resume=resume,
        bench_seconds=bench_seconds,
        show_progress=show_progress,
        log=log,
    )


# ------------------------------------------------------------------------------------------------- the other verbs
# bench, eval, gate, package, verify, keygen, models, run, cache: each checks its inputs, does the work, writes
# the files it was asked for atomically and returns a result object; nothing here prints. Heavy modules are
# imported inside the functions, so `import dlopt.api` (and the CLI) stays fast.

Log = Callable[[str], None]
Progress = Callable[[str, float], None]


def _quiet(message: str) -> None:
    pass


def _data_file(data):
    """The file or folder a verb's data is read from (a Python reader's .py file), to guard: never an
    output (dlopt.data.source_path); None for arrays (a mapping), model:NAME and package.module readers."""
    from dlopt.data import source_path

    return None if data is None or isinstance(data, Mapping) else source_path(data)


@dataclass(frozen=True)
class Measured:
    """A benchmark's result and the files written from it (JSON result, stored baseline)."""

    result: BenchResult
    written: tuple[Path, ...] = ()


def bench(
    models: Sequence[str | os.PathLike],
    config: BenchConfig | None = None,
    *,
    data: str | os.PathLike | Mapping[str, Any] | None = None,
    json_path: str | os.PathLike | None = None,
    baseline_path: str | os.PathLike | None = None,
    progress: Progress | None = None,
    started: float | None = None,
) -> Measured:
    """Measure MODELS (.onnx files) interleaved on `config.target`; each is reported as a ratio to the
    first with a bootstrap 95 % confidence interval (dlopt.bench.benchmark).

    `data`: real inputs, any source of dlopt.data (an .npz, a folder, a reader, "model:NAME", or a DataSpec
    with its layout, values and image pre-processing) or {input name: array} (first axis = samples).
    `json_path` receives the full result, `baseline_path` the first model's samples and this machine's
    fingerprint for `gate`; both are checked before measuring and written atomically. `started`: a
    time.perf_counter() value the budget counts from (default: now)."""
    from dlopt.bench import MAX_DATA_BATCHES, BenchConfig, benchmark
    from dlopt.data import data_arrays

    config = config or BenchConfig()
    for path in (json_path, baseline_path):
        if path:
            check_output_path(path)  # before minutes of measuring, not after
    guard_outputs([*models, _data_file(data)], [json_path, baseline_path])
    named = data is not None and not isinstance(data, Mapping)
    arrays = data_arrays(
        data,
        models[0] if models else "",
        seq_len=config.seq_len,
        samples=max(config.batch_sizes) * (8 if str(data).startswith("model:") else MAX_DATA_BATCHES),
    )
    result = benchmark(
        models, config, data=arrays, data_source=str(data) if named else "data", progress=progress, started=started
    )
    written = []
    if json_path:
        from dlopt.fileio import write_json_atomic

        written.append(write_json_atomic(json_path, result.to_dict()))
    if baseline_path:
        from dlopt.gate import save_baseline

        written.append(save_baseline(baseline_path, result, inputs_from_data=data is not None))
    return Measured(result, tuple(written))


def evaluate(
    model: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    reference_model: str | None = None,
    reference: str | os.PathLike | None = None,
    config: EvalConfig | None = None,
    json_path: str | os.PathLike | None = None,
) -> EvalResult:
    """Accuracy metrics of MODEL (.onnx): on `data` (an .npz with the model's inputs, optional `labels` and
    expected outputs; `config.metrics` from top1, cosine, sqnr, mse), or with `reference_model`'s own
    evaluator on its real data. `reference` (e.g. the FP32 source .onnx) is run on the same inputs and
    shown beside. `json_path` receives the result (written atomically)."""
    from dlopt.evaluate import EvalConfig, evaluate_data, evaluate_lm, evaluate_reference_model
    from dlopt.lm import is_lm_folder as lm_folder

    config = config or EvalConfig()
    if lm_folder(model):  # an exported LM folder: perplexity and next-token agreement on text (dlopt.lm)
        if data is None:
            raise InputError(
                f"{model} is an LM folder: give held-out text as data", "pass --data TEXT.txt --reference FP32_FOLDER"
            )
        if json_path:
            check_output_path(json_path)
            guard_outputs([model, data, reference], [json_path])
        result = evaluate_lm(model, data, config, reference)
        if json_path:
            from dlopt.fileio import write_json_atomic

            write_json_atomic(json_path, result.to_dict())
        return result
    if json_path:
        check_output_path(json_path)
        guard_outputs([model, _data_file(data), reference], [json_path])
    if (data is None) == (reference_model is None):
        raise InputError(
            "give either {data=FILE.npz} or {reference_model=NAME}",
            "data evaluates on your arrays; reference_model uses a reference model's evaluator",
        )
    if config.threads < 0:
        raise InputError(f"threads must be 0 or more, got {config.threads}", "0 uses all cores")
    if data is not None:
        result = evaluate_data(model, data, config, reference=reference)
    else:
        assert reference_model is not None, "checked above: data or reference_model"
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


def gate(
    baseline: str | os.PathLike,
    candidate: str | os.PathLike,
    config: GateConfig | None = None,
    *,
    evaluator: EvalSpec | None = None,
    data: str | os.PathLike | Mapping[str, Any] | None = None,
    summary: str | os.PathLike | None = None,
    junit: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    github_summary: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> Gated:
    """Gate CANDIDATE against BASELINE (a model, re-measured interleaved, or a stored baseline .json) on
    latency, and on size and accuracy where `config` sets their limits (accuracy with `evaluator`).

    `data`: real inputs to time the models on (any source of dlopt.data, a DataSpec, or arrays). Reports: a Markdown
    `summary`, a `junit` XML and the `json_path` result are written atomically; `github_summary` (the
    $GITHUB_STEP_SUMMARY file) is appended to. Raises InputError before any long work on bad input."""
    from dlopt.bench import MAX_DATA_BATCHES
    from dlopt.data import data_arrays
    from dlopt.gate import GateConfig, run_gate, write_outputs

    config = config or GateConfig()
    for path in (summary, junit, json_path):
        if path:
            check_output_path(path)  # before a minute of measuring, not after
    guard_outputs(
        [baseline, candidate, _data_file(data), _data_file(evaluator.data) if evaluator else None],
        [summary, junit, json_path, github_summary],
    )
    from dlopt.lm import is_lm_folder

    if is_lm_folder(baseline) or is_lm_folder(candidate):  # exported LMs: decode tokens/s and perplexity
        from dlopt.gate.lm import run_gate_lm

        if data is not None:
            raise InputError(
                "an LM gate times generation from seeded prompts, not {data}",
                "drop it; the evaluation text is {eval_data=TEXT.txt}",
            )
        result = run_gate_lm(baseline, candidate, config, evaluator=evaluator, progress=progress)
    else:
        batch = config.batch or 1
        arrays = data_arrays(
            data,
            candidate,
            seq_len=config.seq_len or 128,
            samples=batch * (8 if str(data).startswith("model:") else MAX_DATA_BATCHES),
        )
        result = run_gate(baseline, candidate, config, data=arrays, evaluator=evaluator, progress=progress)
    written = write_outputs(
        result,
        summary=summary,
        junit=junit,
        json_path=json_path,
        github_summary=str(github_summary) if github_summary else None,
    )
    return Gated(result, tuple(written))


def package_model(
    model: str | os.PathLike,
    output: str | os.PathLike,
    config: PackageConfig | None = None,
    *,
    data: str | os.PathLike | Mapping[str, Any] | None = None,
    sign_key: str | os.PathLike | None = None,
    prompts: Sequence[str] = (),
    new_tokens: int | None = None,
    reference: str | os.PathLike | None = None,
    log: Log = _quiet,
) -> PackageResult:
    """Package MODEL (.onnx) into the bundle folder `output` for `config.target`, verified before it is
    written (dlopt.package.package). `data`: sample inputs (any source of dlopt.data, a DataSpec, or arrays)
    instead of generated ones, run as one batch; `sign_key`: an Ed25519 private key (`keygen`) that signs
    the manifest.

    MODEL may be an exported LM folder (genai_config.json: `export_lm`, quantized or not): the bundle is
    that folder as onnxruntime-genai loads it, with `prompts` (default: three samples) and their
    `new_tokens` (default 20) greedy tokens in the manifest, also generated by `reference` (the FP32
    export) when given (dlopt.package.lm.package_lm)."""
    from dlopt.data import data_arrays
    from dlopt.lm import is_lm_folder
    from dlopt.package import PackageConfig, package

    if is_lm_folder(model) or Path(model).is_dir():
        from dlopt.package.lm import NEW_TOKENS, package_lm

        if data is not None:
            raise InputError("an LM bundle's samples are prompts, not {data}", "give {prompt=TEXT} instead")
        return package_lm(
            model,
            output,
            config or PackageConfig(),
            prompts=prompts,
            new_tokens=NEW_TOKENS if new_tokens is None else new_tokens,
            reference=reference,
            sign_key=sign_key,
            log=log,
        )
    if prompts or new_tokens is not None or reference is not None:
        raise InputError(
            f"{model} is not an exported LM folder: {{prompt}}, {{new_tokens}} and {{reference}} are for LM bundles",
            "package the folder dlopt export --task text-generation wrote",
        )

    guard_outputs([_data_file(data)], [output])  # package() guards the model, calibration and torch source
    feeds = data_arrays(data, model)
    spec = None
    if data is not None and not isinstance(data, Mapping):
        from dlopt.data import as_spec

        spec = as_spec(data)
    return package(model, output, config or PackageConfig(), data=feeds, data_spec=spec, sign_key=sign_key, log=log)


def verify(
    bundle: str | os.PathLike,
    *,
    check_outputs: bool = True,
    trusted_key: str | os.PathLike | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyResult:
    """Re-check BUNDLE (written by `package_model`): every file's sha256, no file missing or added, and
    unless `check_outputs` is False the model's outputs against the source's stored ones within
    `atol`/`rtol` (default 1e-4/1e-3; a criterion in the manifest can only tighten them). With
    `trusted_key` (a public key from `keygen`) the manifest must carry that key's signature.

    Returns the result whether or not it passed (`result.passed`); `verification_error(result)` is the
    error to raise for a failure. Raises InputError when BUNDLE is not a folder or the key is unreadable."""
    from dlopt.verify import Tolerance, verify_bundle

    defaults = Tolerance()
    tolerance = Tolerance(
        atol=defaults.atol if atol is None else atol,
        rtol=defaults.rtol if rtol is None else rtol,
        explicit=atol is not None or rtol is not None,
    )
    return verify_bundle(bundle, check_outputs=check_outputs, trusted_key=trusted_key, tolerance=tolerance)


@dataclass(frozen=True)
class KeyPair:
    private_key: Path
    public_key: Path
    fingerprint: str  # sha256 of the public key, what a manifest's signer record names


def keygen(
    *,
    output: str | os.PathLike | None = None,
    private: str | os.PathLike | None = None,
    public: str | os.PathLike | None = None,
) -> KeyPair:
    """Write a new Ed25519 key pair as PEM files, the private one with mode 0600: into the folder
    `output` (as dlopt-signing.key / .pub; a missing folder is created with mode 0700), or to the files
    `private` and `public`. Existing files are never overwritten. Sign bundles with the private key, verify
    them with the public one."""
    from dlopt.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_key_pair

    if output is not None and (private or public):
        raise InputError(
            "{output=DIR} and {private=KEY}/{public=PUB} both given",
            "give {output=DIR}, or both {private=KEY} and {public=PUB}",
        )
    if output is None and not (private and public):
        raise InputError("no key paths given", "give {output=DIR}, or both {private=KEY} and {public=PUB}")
    created = None
    if output is not None:
        folder = Path(output)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"key folder {folder} is a file", "give a folder for the keys (it is created if missing)")
        if not folder.exists():
            created = _make_key_folder(folder)
        private, public = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    assert private is not None and public is not None, "checked above: output, or private and public"
    try:
        fingerprint = generate_key_pair(private, public)
    except BaseException:
        if created is not None:  # leave no empty key folder behind a failed run
            with contextlib.suppress(OSError):
                created.rmdir()
        raise
    return KeyPair(Path(private), Path(public), fingerprint)


def _make_key_folder(folder: Path) -> Path:
    """Create the key folder with mode 0700 (only its owner lists or enters it), parents as needed."""
    try:
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o700)  # mkdir's mode is masked by the umask; the folder's own mode is meant exactly
    except OSError as e:
        raise InputError(f"cannot create key folder {folder}: {e.strerror}", "choose a folder you can write") from None
    return folder


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
        raise InputError(
            "{evaluate} needs model names",
            f"name the models to evaluate, e.g. fashion-cnn (models: {', '.join(REFERENCE_MODELS)})",
        )
    refs = [get_reference_model(n) for n in names] if names else list(REFERENCE_MODELS.values())
    return [ModelEntry(ref.name, ref.summary(), ref.evaluate_fp32(log) if evaluate else None) for ref in refs]


def _cache(cache_dir: str | os.PathLike | None) -> StageCache:
    from dlopt.stagecache import StageCache, default_cache_dir

    return StageCache(cache_dir or default_cache_dir())


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The stage cache's folder: `cache_dir`, else $DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages."""
    return _cache(cache_dir).root


def run(
    recipe: str | os.PathLike,
    output: str | os.PathLike,
    *,
    force: str | None = None,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    log: Log = _quiet,
) -> RunResult:
    """Run RECIPE (TOML: a source model, its data, a target and [[stage]] tables) and write the last stage's
    artifact to `output` (an .onnx model, or a bundle folder when the last stage is package). Each stage's
    output is cached by content in `cache_dir` (default $DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages);
    `force` (a stage kind or 1-based index) redoes that stage and every one after it."""
    from dlopt.recipe import load_recipe, run_recipe

    return run_recipe(load_recipe(recipe), output, cache=_cache(cache_dir), force=force, overwrite=overwrite, log=log)


def optimize_model(
    model: str,
    output: str | os.PathLike,
    config=None,
    *,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda message: None,
):
    """Search candidate recipes for MODEL (a reference model name, a torch source, or an .onnx) on
    config.target (an OptimizeConfig), write the best candidate within the accuracy budget as a
    verified bundle at `output` and, with `report_path`, a self-contained HTML report. Candidate
    transforms and scoring run on `executor` ("local" process pool or "ray"); every stage output and
    evaluation is cached in the stage cache (`cache_dir`, else $DLOPT_CACHE_DIR, else the default).
    Returns dlopt.search.OptimizeResult (its `result` dict follows schemas/optimize.schema.json)."""
    from dlopt.executor import make_executor
    from dlopt.search import OptimizeConfig, optimize
    from dlopt.stagecache import StageCache, default_cache_dir

    cache = StageCache(cache_dir or default_cache_dir())
    runner = make_executor(executor, address=address, workers=workers, cache_dir=cache.root)
    try:
        return optimize(
            model, output, config or OptimizeConfig(), executor=runner, cache=cache, report_path=report_path, log=log
        )
    finally:
        runner.close()


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


def cache_prune(
    *,
    older_than: str | float | None = None,
    max_size: str | int | None = None,
    all: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> CachePruned:
    """Remove cached stage outputs: those older than `older_than` (seconds, or text such as "7d", "12h"),
    then the oldest until the rest fit in `max_size` (bytes, or text such as "2GB"), or `all` of them."""
    from dlopt.stagecache import parse_age, parse_size

    everything = all  # the keyword mirrors the CLI's --all; the builtin is not used below
    if not (older_than or max_size or everything):
        raise InputError("nothing to prune by", "pass {older_than=AGE}, {max_size=SIZE} or {all}")
    cache = _cache(cache_dir)
    removed = cache.prune(
        older_than_s=parse_age(older_than) if isinstance(older_than, str) else older_than,
        max_bytes=parse_size(max_size) if isinstance(max_size, str) else max_size,
        everything=everything,
    )
    return CachePruned(cache.root, tuple(removed), tuple(cache.entries()))


# Config classes, result types and formatters the callers of these functions need, re-exported under the name
# they have where they are defined (name -> module; tests/test_architecture.py checks it) and imported on first
# use (PEP 562), so that importing dlopt.api stays as fast as the CLI's start-up needs.
_LAZY = {
    "BenchConfig": "dlopt.bench",
    "BenchResult": "dlopt.bench",
    "parse_duration": "dlopt.bench",
    "parse_batch_sizes": "dlopt.bench",
    "format_bench": "dlopt.bench",
    "GenerateConfig": "dlopt.bench.generate",
    "GenerateResult": "dlopt.bench.generate",
    "format_generate": "dlopt.bench.generate",
    "ExportLm": "dlopt.optimize.export_lm",
    "EvalConfig": "dlopt.evaluate",
    "EvalResult": "dlopt.evaluate",
    "format_eval": "dlopt.evaluate",
    "validate_metrics": "dlopt.evaluate",
    "GateConfig": "dlopt.gate",
    "GateResult": "dlopt.gate",
    "EvalSpec": "dlopt.gate",
    "format_gate": "dlopt.gate",
    "PackageConfig": "dlopt.package",
    "PackageResult": "dlopt.package",
    "Tolerance": "dlopt.verify",
    "VerifyResult": "dlopt.verify",
    "format_verify": "dlopt.verify",
    "origin_text": "dlopt.verify",
    "verification_error": "dlopt.verify",
    "verified_text": "dlopt.verify",
    "RunResult": "dlopt.recipe",
    "StageCache": "dlopt.stagecache",
    "Entry": "dlopt.stagecache",
    "Fp32Evaluation": "dlopt.models",
    "ImagePreprocess": "dlopt.images",
    "measure_speedup": "dlopt.bench",  # prune's and distill's latency line
    "check_number": "dlopt.limits",  # the checks of numeric options, shared by the CLI's option types
    # the data layer every verb reads its data through (docs/data.md)
    "DataSpec": "dlopt.data",
    "CalibrationData": "dlopt.data",
    "data_spec": "dlopt.data",
    "load_data": "dlopt.data",
    "OptimizeConfig": "dlopt.search.driver",
    "OptimizeResult": "dlopt.search.driver",
    "optimize_text": "dlopt.search.html_report",
    "notes_to": "dlopt.sessions",  # where sessions' one-time notes go (a relaxed output declaration)
    "json_text": "dlopt.fileio",  # how the CLI prints a JSON result
    "reset_written": "dlopt.fileio",
    "written_paths": "dlopt.fileio",  # what an interrupted command had written
    # the stage configs, and what the stage verbs' callers print, from the stage modules
    "Export": "dlopt.optimize.export",
    "DEFAULT_OPSET": "dlopt.optimize.export",
    "Prune": "dlopt.optimize.prune",
    "Distill": "dlopt.optimize.distill",
    "QuantizeConfig": "dlopt.optimize.quantize.schemes",
    "Int8Dynamic": "dlopt.optimize.quantize.schemes",
    "Int8Static": "dlopt.optimize.quantize.schemes",
    "Int8WeightOnly": "dlopt.optimize.quantize.schemes",
    "Int4WeightOnly": "dlopt.optimize.int4",
    "Fp16": "dlopt.optimize.fp16",
    "quantize_text": "dlopt.optimize.quantize.summary",
    "quantize_lm_text": "dlopt.optimize.quantize_lm",
    # the parts of `dlopt package`'s text its stage and target own (dlopt.cli.results puts them together)
    "summary_table": "dlopt.package.card",
    "COVERAGE_HEADERS": "dlopt.targets.mobile",
    "coverage_table_rows": "dlopt.targets.mobile",
    "quantize_failure": "dlopt.optimize.quantize.files",
}

if TYPE_CHECKING:
    from dlopt.bench import BenchConfig, BenchResult
    from dlopt.bench.generate import GenerateConfig, GenerateResult
    from dlopt.evaluate import EvalConfig, EvalResult
    from dlopt.gate import EvalSpec, GateConfig, GateResult
    from dlopt.models import Fp32Evaluation
    from dlopt.optimize.distill import Device, Loss
    from dlopt.package import PackageConfig, PackageResult
    from dlopt.recipe import RunResult
    from dlopt.stagecache import Entry, StageCache
    from dlopt.verify import VerifyResult


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(target), name)  # the same name as where it is defined: no aliases
    globals()[name] = value
    return value


__all__ = [
    "is_lm_folder",
    "lm_quantize_config",
    "quantize_lm",
    "CacheListing",
    "CachePruned",
    "DlOptError",
    "Gated",
    "InputError",
    "KeyPair",
    "Measured",
    "ModelEntry",
    "StageError",
    "VerificationError",
    "WrittenModel",
    "MeasuredGeneration",
    "bench",
    "bench_generate",
    "export_lm",
    "cache_ls",
    "cache_prune",
    "cache_root",
    "distill_model",
    "evaluate",
    "export_model",
    "gate",
    "keygen",
    "models",
    "optimize_model",
    "package_model",
    "prune_model",
    "quantize_model",
    "report_path_for",
    "run",
    "verify",
    *_LAZY,
]
