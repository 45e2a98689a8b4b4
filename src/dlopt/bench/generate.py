"""`dlopt bench --generate`: generation speed of exported decoder LMs (folders with genai_config.json),
run with onnxruntime-genai (og.Model / og.Generator) as a user's generate loop runs them.

Per model and batch size, one sample is one greedy generation of `new_tokens` tokens after a seeded
random prompt of `prompt_len` tokens, split into its phases:
- prefill: `append_tokens(prompt)`, the forward pass over the prompt that fills the KV cache;
- time to first token: the prefill plus choosing the first token from its logits;
- decode: the remaining new_tokens - 1 tokens, each one forward over one token with the cache
  (reported as ms per token and tokens/s = batch / ms per token).
Generation never stops early: min_length = max_length, so every sample decodes the same tokens.

The models run interleaved through the same InterleavedSampler as `dlopt bench` (rotated rounds,
warm-up, one deadline), so their ratios to the FIRST model are per-round quotients with bootstrap
CIs (dlopt.stats.ratio_ci), for each phase. The sampler times the whole call; the phases are timed
inside it, on both clocks, and kept in round order (the warm-up's are dropped).

Memory: how far the process's RSS rose above its level before the model was loaded, at its highest,
while the model loaded and ran its first generation (weights, session buffers, KV cache). On Linux the
kernel's high-water mark (VmHWM) is reset before each model (/proc/self/clear_refs), so each model's
peak is its own even after an earlier, larger one; elsewhere the process's ru_maxrss is used, and a
later model's figure is then a lower bound. The first model loaded also carries onnxruntime-genai's
one-time process setup (about 30 MB on Linux x86-64): a second copy of the same folder shows the model alone.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.bench.config import CLOCKS, MIN_TIMED_ROUNDS, ProgressFn, check_sampling, read_clocks
from dlopt.bench.sampler import InterleavedSampler
from dlopt.errors import InputError
from dlopt.genai import GENAI_CONFIG, LmFolder, check_lm_folder, load_lm, read_lm_folder, require_genai  # noqa: F401  (re-exported)
from dlopt.stats import DEFAULT_BOOTSTRAP, Interval, Summary, ratio_ci, summarize

SCHEMA_NAME = "dlopt.bench.generate"
SCHEMA_VERSION = 1
PHASES = ("prefill", "first_token", "decode_per_token")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    prompt_len: int = 128
    new_tokens: int = 128
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1,)
    budget_s: float = 30.0  # wall time of the whole run (loading, warm-up, rounds, statistics)
    rounds: int | None = None  # a fixed number of timed rounds per batch size instead of the budget
    clock: str = "auto"  # cpu (thread CPU time: the default for one thread), wall, or auto
    warmup_max_fraction: float = 0.25
    warmup_window: int = 2  # generations are long: settled after 2 runs no faster than the 2 before
    max_rounds: int = 2000  # budget runs of tiny models stop here: more rounds add nothing to the CI
    confidence: float = 0.95
    ratio_method: str = "round-median"
    n_boot: int = DEFAULT_BOOTSTRAP
    seed: int = 0


def validate_generate_config(config: GenerateConfig) -> None:
    if config.new_tokens < 1:
        raise InputError(f"new tokens must be at least 1, got {config.new_tokens}", "e.g. {new_tokens=128}")
    if config.prompt_len < 1:
        raise InputError(f"the prompt length must be at least 1, got {config.prompt_len}", "e.g. {prompt_len=128}")
    if config.threads < 1:
        raise InputError(f"threads must be at least 1, got {config.threads}", "pass {threads=1} or more")
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(config.batch_sizes)}", "e.g. 1,4")
    if config.rounds is None and config.budget_s <= 0:
        raise InputError(f"the time budget must be positive, got {config.budget_s} s", "e.g. 60 s")
    check_sampling(config.rounds, config.clock, config.ratio_method)


def prompt_tokens(folder: LmFolder, batch: int, length: int, seed: int) -> np.ndarray:
    """Seeded random token ids [batch, length], special tokens (bos/eos/pad) left out."""
    allowed = np.setdiff1d(np.arange(folder.vocab_size), np.asarray(folder.special_ids, dtype=np.int64))
    rng = np.random.default_rng(seed)
    return allowed[rng.integers(0, allowed.size, size=(batch, length))].astype(np.int32)


class GenerationRun:
    """One greedy generation per call; the phases' times (both clocks) are appended to `phases`."""

    def __init__(self, og, model, prompt: np.ndarray, new_tokens: int):
        self.og, self.model, self.prompt, self.new_tokens = og, model, prompt, new_tokens
        self.total = prompt.shape[1] + new_tokens
        self.phases: dict[str, dict[str, list[float]]] = {p: {c: [] for c in CLOCKS} for p in PHASES}
        self.generated = 0

    def clear(self) -> None:
        for per_clock in self.phases.values():
            for values in per_clock.values():
                values.clear()

    def __call__(self) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(
            do_sample=False, max_length=self.total, min_length=self.total, batch_size=self.prompt.shape[0]
        )
        generator = self.og.Generator(self.model, params)
        t0 = read_clocks()
        generator.append_tokens(self.prompt)
        t1 = read_clocks()
        generator.generate_next_token()  # chosen from the prefill's logits: no forward pass
        t2 = read_clocks()
        steps = 1
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        t3 = read_clocks()
        self.generated = steps
        # read_clocks() is (wall, cpu): by name, not by CLOCKS' order ("cpu", "wall"), which is the other one
        for k, clock in enumerate(("wall", "cpu")):
            self.phases["prefill"][clock].append(t1[k] - t0[k])
            self.phases["first_token"][clock].append(t2[k] - t0[k])
            self.phases["decode_per_token"][clock].append((t3[k] - t2[k]) / max(1, steps - 1))


@dataclass(frozen=True)
class GenerateModelRun:
    phases: dict[str, dict[str, np.ndarray]]  # phase -> clock -> seconds per sample
    summaries: dict[str, dict[str, Summary]]
    ratios: dict[str, dict[str, Interval | None]]  # phase -> clock -> ratio to the first model
    first_generation_s: float
    peak_rss_added_bytes: int
    tokens_generated: int


@dataclass(frozen=True)
class GenerateBatchRun:
    batch: int
    rounds: int
    seconds: float
    warmup_rounds: int
    warmup_settled: bool
    models: tuple[GenerateModelRun, ...]


@dataclass(frozen=True)
class GenerateModel:
    label: str
    folder: LmFolder
    load_s: float
    model: Any = field(repr=False)
    load_peak_added_bytes: int = 0  # highest RSS while loading, above the RSS before
    load_resident_bytes: int = 0  # RSS the loaded model keeps


@dataclass(frozen=True)
class GenerateResult:
    config: GenerateConfig
    clock: str
    clock_reason: str
    models: tuple[GenerateModel, ...]
    batches: tuple[GenerateBatchRun, ...]
    peak_rss_bytes: int
    machine: dict[str, Any]
    runtime: str
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        from dlopt.stage import config_to_dict
        from dlopt.tables import environment

        def run_dict(run: GenerateModelRun, model: GenerateModel, batch: int) -> dict[str, Any]:
            decode = run.summaries["decode_per_token"][self.clock].median
            return {
                "model": model.label,
                "prefill_ms": {c: run.summaries["prefill"][c].as_dict(1e3) for c in CLOCKS},
                "time_to_first_token_ms": {c: run.summaries["first_token"][c].as_dict(1e3) for c in CLOCKS},
                "decode_ms_per_token": {c: run.summaries["decode_per_token"][c].as_dict(1e3) for c in CLOCKS},
                "decode_tokens_per_s": batch / decode if decode > 0 else None,
                "ratio": {
                    p: {c: (r.as_dict() if r is not None else None) for c, r in per.items()}
                    for p, per in run.ratios.items()
                },
                "first_generation_ms": run.first_generation_s * 1e3,
                "peak_rss_added_bytes": run.peak_rss_added_bytes,
                "tokens_generated": run.tokens_generated,
                "samples_ms": {
                    p: {c: np.round(v * 1e3, 6).tolist() for c, v in per.items()} for p, per in run.phases.items()
                },
            }

        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "config": config_to_dict(self.config),
            "runtime": self.runtime,
            "clock": self.clock,
            "clock_reason": self.clock_reason,
            "machine": dict(self.machine),
            "environment": environment(),
            "models": [
                {
                    "label": m.label,
                    "path": str(m.folder.path),
                    "size_bytes": m.folder.size_bytes,
                    "context_length": m.folder.context_length,
                    "load_s": m.load_s,
                }
                for m in self.models
            ],
            "batches": [
                {
                    "batch": b.batch,
                    "prompt_len": self.config.prompt_len,
                    "new_tokens": self.config.new_tokens,
                    "rounds": b.rounds,
                    "seconds": b.seconds,
                    "warmup": {"rounds": b.warmup_rounds, "settled": b.warmup_settled},
                    "results": [run_dict(r, m, b.batch) for r, m in zip(b.models, self.models)],
                }
                for b in self.batches
            ],
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def _max_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))


class _RssPeak:
    """The highest RSS from `start()` on, above the RSS at `start()`: the kernel's VmHWM reset through
    /proc/self/clear_refs (Linux >= 4.0), else the process's ru_maxrss (never reset: a lower bound)."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self.before = 0
        self._max_before = 0
        self._reset = False

    def start(self) -> None:
        self.before = self._process.memory_info().rss
        self._max_before = _max_rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            self._reset = False

    def added(self) -> int:
        if self._reset:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return max(0, int(line.split()[1]) * 1024 - self.before)
            except (OSError, ValueError, IndexError):
                pass
        return max(0, _max_rss_bytes() - max(self.before, self._max_before))

    def resident_added(self) -> int:
        return max(0, self._process.memory_info().rss - self.before)


def benchmark_generate(
    paths: Sequence[str | os.PathLike],
    config: GenerateConfig = GenerateConfig(),
    *,
    progress: ProgressFn | None = None,
    started: float | None = None,
) -> GenerateResult:
    """Measure generation of one or more exported LM folders, interleaved, at each batch size; each
    is reported as a ratio to the first per phase (prefill, time to first token, decode per token)."""
    from dlopt.bench.harness import file_labels, machine_fingerprint

    validate_generate_config(config)
    if not paths:
        raise InputError("no model to benchmark", "give one or more exported LM folders")
    folders = [check_lm_folder(p, tokenizer=False) for p in paths]  # names a Hugging Face or BERT folder
    for f in folders:
        if config.prompt_len + config.new_tokens > f.context_length:
            raise InputError(
                f"a {config.prompt_len}-token prompt plus {config.new_tokens} new tokens exceeds the "
                f"context of {f.path} ({f.context_length} tokens)",
                "lower {prompt_len} or {new_tokens}",
            )
    og = require_genai()
    start = time.perf_counter() if started is None else started
    deadline = None if config.rounds is not None else start + config.budget_s
    clock = config.clock if config.clock != "auto" else ("cpu" if config.threads == 1 else "wall")
    clock_reason = (
        "chosen with --clock"
        if config.clock != "auto"
        else "auto: one thread, where thread CPU time is steadier than wall time"
        if clock == "cpu"
        else f"auto: {config.threads} threads; pool threads' CPU time is invisible to the caller, so wall time"
    )
    models = []
    for label, folder in zip(file_labels([Path(p) for p in paths]), folders):
        if progress is not None:
            progress(f"loading {label}", 0.0)
        peak = _RssPeak()
        peak.start()
        t = time.perf_counter()
        model = load_lm(og, folder, config.threads)
        models.append(
            GenerateModel(
                label,
                folder,
                time.perf_counter() - t,
                model,
                load_peak_added_bytes=peak.added(),
                load_resident_bytes=peak.resident_added(),
            )
        )
    batches = []
    for k, batch in enumerate(config.batch_sizes):
        share = None if deadline is None else max(0.0, deadline - time.perf_counter()) / (len(config.batch_sizes) - k)
        batches.append(_measure_batch(og, models, config, batch, clock, share, progress, first=k == 0))
    return GenerateResult(
        config=config,
        clock=clock,
        clock_reason=clock_reason,
        models=tuple(models),
        batches=tuple(batches),
        peak_rss_bytes=_max_rss_bytes(),
        machine=machine_fingerprint(config.threads),
        runtime=f"onnxruntime-genai {og.__version__}",
    )


def _measure_batch(
    og,
    models: Sequence[GenerateModel],
    config: GenerateConfig,
    batch: int,
    clock: str,
    share: float | None,
    progress: ProgressFn | None,
    *,
    first: bool,
) -> GenerateBatchRun:
    """`first`: the first batch size measured, whose memory figure includes loading the model."""
    start = time.perf_counter()
    runs, first_s, peak_added = [], [], []
    for m in models:
        if progress is not None:
            progress(f"batch {batch}: first generation of {m.label}", 0.0)
        run = GenerationRun(
            og, m.model, prompt_tokens(m.folder, batch, config.prompt_len, config.seed), config.new_tokens
        )
        peak = _RssPeak()
        peak.start()
        t = time.perf_counter()
        run()  # cold: allocates the KV cache and the session's buffers
        first_s.append(time.perf_counter() - t)
        # the model's weights and buffers stay resident: its peak is what it keeps plus what generating added
        generation_peak = m.load_resident_bytes + peak.added()
        peak_added.append(max(m.load_peak_added_bytes, generation_peak) if first else generation_peak)
        runs.append(run)
    sampler = InterleavedSampler(runs)
    warm_cap = (share - (time.perf_counter() - start)) * config.warmup_max_fraction if share is not None else 60.0
    warm = sampler.warm_up(max_seconds=max(0.0, warm_cap), clock=clock, window=config.warmup_window)
    for run in runs:
        run.clear()  # warm-up generations are not samples
    timed = InterleavedSampler(runs)  # a fresh one: its rounds are the phases' rounds
    if config.rounds is not None:
        timed.run_rounds(config.rounds)
    else:
        assert share is not None, "a time share is given whenever the rounds are not fixed"
        remaining = max(0.0, share - (time.perf_counter() - start) - 0.1)
        timed.run_for(remaining, min_rounds=MIN_TIMED_ROUNDS, max_rounds=config.max_rounds)
    results = []
    for i, run in enumerate(runs):
        phases = {p: {c: np.asarray(v, dtype=np.float64) for c, v in per.items()} for p, per in run.phases.items()}
        ratios = {
            p: {
                c: (
                    ratio_ci(
                        runs[0].phases[p][c],
                        run.phases[p][c],
                        method=config.ratio_method,
                        paired=True,
                        confidence=config.confidence,
                        n_boot=config.n_boot,
                        seed=config.seed,
                    )
                    if i > 0
                    else None
                )
                for c in CLOCKS
            }
            for p in PHASES
        }
        results.append(
            GenerateModelRun(
                phases=phases,
                summaries={p: {c: summarize(v) for c, v in per.items()} for p, per in phases.items()},
                ratios=ratios,
                first_generation_s=first_s[i],
                peak_rss_added_bytes=peak_added[i],
                tokens_generated=run.generated,
            )
        )
    return GenerateBatchRun(
        batch=batch,
        rounds=timed.timed_rounds,
        seconds=time.perf_counter() - start,
        warmup_rounds=warm.rounds,
        warmup_settled=warm.settled,
        models=tuple(results),
    )


def format_generate(result: GenerateResult) -> str:
    from dlopt.tables import format_table

    clock = result.clock
    headers = [
        "batch",
        "model",
        "size MB",
        "prefill ms",
        "first token ms",
        "decode ms/token",
        "decode tok/s",
        "peak RSS +MB",
    ]
    rows, lines = [], []
    for b in result.batches:
        for m, r in zip(result.models, b.models):
            decode = r.summaries["decode_per_token"][clock].median
            rows.append(
                [
                    b.batch,
                    m.label,
                    m.folder.size_bytes / 1e6,
                    r.summaries["prefill"][clock].median * 1e3,
                    r.summaries["first_token"][clock].median * 1e3,
                    decode * 1e3,
                    b.batch / decode if decode > 0 else "n/a",
                    r.peak_rss_added_bytes / 1e6,
                ]
            )
        for m, r in zip(result.models[1:], b.models[1:]):
            parts = []
            for phase, name in (("prefill", "prefill"), ("first_token", "first token"), ("decode_per_token", "decode")):
                ratio = r.ratios[phase][clock]
                assert ratio is not None, "None only for the first model"
                parts.append(f"{name} {ratio.estimate:.3f}x (95% CI {ratio.low:.3f}-{ratio.high:.3f})")
            lines.append(f"batch {b.batch}: {m.label} takes, of {result.models[0].label}'s time: " + "; ".join(parts))
        lines.append(
            f"batch {b.batch}: {b.rounds} interleaved rounds in {b.seconds:.1f} s; warm-up {b.warmup_rounds} "
            f"rounds, {'settled' if b.warmup_settled else 'NOT settled (capped)'}"
        )
    c = result.config
    return "\n".join(
        [
            format_table(headers, rows),
            "",
            *lines,
            f"greedy generation with {result.runtime}: prompt {c.prompt_len} tokens (seeded random ids), "
            f"{c.new_tokens} new tokens, {c.threads} thread(s); medians; clock: {clock} ({result.clock_reason})",
            f"CPU: {result.machine.get('cpu_model')}, {result.machine.get('cpu_isa')}",
            f"peak RSS of this process: {result.peak_rss_bytes / 1e6:.0f} MB "
            "(peak RSS +MB: the highest RSS above the level before the model loaded, while it loaded and ran its first "
            "generation)",
        ]
    )


__all__ = [
    "GenerateConfig",
    "GenerateResult",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "benchmark_generate",
    "format_generate",
    "prompt_tokens",
    "read_lm_folder",
    "validate_generate_config",
]
