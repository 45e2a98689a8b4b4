"""The gate for exported LM folders (genai_config.json): decode tokens/s and perplexity.

Speed: both folders generate greedily, interleaved (the bench sampler, rotated rounds), and the
sequential test of dlopt.gate.sequential judges the ratio of decode time per token, candidate /
baseline, per round (a paired bootstrap): the same test, limit (1 + max_slowdown) and verdicts as the
latency gate of ONNX models, on the phase a chat spends its time in. Time per token is the latency
form of tokens/s: a ratio x1.05 is tokens/s at 1/1.05 of the baseline's.

Perplexity: both folders score the same text in non-overlapping windows (dlopt.genai.perplexity); the
drop is the metric table's, the candidate's perplexity over the baseline's minus 1, gated with
`--max-accuracy-drop perplexity=0.03` (or a plain number) as quantize and optimize read it.
The text: a plain .txt file (`--eval-data`, tokenized by the baseline's tokenizer), or a reference
model's evaluation text (`--eval smollm2`: the first 4,096 tokens of lee_background.cor).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError
from dlopt.gate.accuracy import EvalSpec
from dlopt.gate.config import GateConfig, ProgressFn
from dlopt.gate.result import GateCheck, GateResult

DEFAULT_PROMPT_LEN = 128
DEFAULT_NEW_TOKENS = 32
PERPLEXITY_MAX_TOKENS = 4096
PERPLEXITY_WINDOW = 512


def _perplexity_limit(config: GateConfig) -> float | None:
    per_metric = dict(config.metric_drops)
    unknown = sorted(set(per_metric) - {"perplexity"})
    if unknown:
        raise InputError(
            f"an LM gate measures perplexity, not {', '.join(unknown)}",
            "write {max_accuracy_drop=perplexity=0.03} (a rise of 3 %), or a plain number",
        )
    return per_metric.get("perplexity", config.max_accuracy_drop)


def _evaluation_tokens(spec: EvalSpec, baseline) -> tuple[np.ndarray, str]:
    if spec.reference_model is not None:
        if spec.reference_model != "smollm2":
            raise InputError(
                f"an LM gate scores perplexity on text; {spec.reference_model!r} is not a language model",
                "use smollm2's evaluation text, or a plain-text file as the evaluation data",
            )
        from dlopt.models import smollm2

        tokens = smollm2.evaluation_tokens(PERPLEXITY_MAX_TOKENS)
        if int(tokens.max()) >= baseline.vocab_size:
            raise InputError(
                f"smollm2's evaluation tokens do not fit the vocabulary of {baseline.path} "
                f"({baseline.vocab_size} tokens)",
                "give a plain-text file as the evaluation data",
            )
        return tokens, "smollm2's evaluation text (lee_background.cor, SmolLM2's tokenizer)"
    from dlopt.data import as_spec
    from dlopt.lm import read_text_tokens

    source = as_spec(spec.data).source
    path = Path(str(source))
    if path.suffix.lower() not in (".txt", ".text", ".md"):
        raise InputError(
            f"an LM gate reads its evaluation text from a plain-text file, not {source}",
            "give a .txt file as the evaluation data",
        )
    return read_text_tokens(baseline.path, path, "evaluation text"), f"{path.name} (the baseline's tokenizer)"


def _perplexity_check(baseline, candidate, spec: EvalSpec, limit: float, threads: int) -> GateCheck:
    """dlopt.lm's LM row (the metric table's perplexity and next-token agreement, as quantize and eval
    score LM folders) of the candidate against the baseline, gated on the perplexity drop."""
    from dlopt.lm import lm_fidelity, read_genai_config, windows
    from dlopt.metrics import metric_drop

    started = time.perf_counter()
    tokens, what = _evaluation_tokens(spec, baseline)
    window = min(PERPLEXITY_WINDOW, baseline.context_length, candidate.context_length, int(tokens.shape[0]))
    if window < 2:
        raise InputError(f"the evaluation text has {tokens.shape[0]} token(s)", "give a longer text")
    head_size = int(read_genai_config(baseline.path)["model"]["decoder"]["head_size"])
    scored = lm_fidelity(
        baseline.path / "model.onnx",
        candidate.path / "model.onnx",
        windows(tokens[:PERPLEXITY_MAX_TOKENS], window),
        head_size,
        threads,
    )
    drop = metric_drop("perplexity", 1.0, scored["perplexity_ratio"])
    verdict = "pass" if np.isfinite(drop) and drop <= limit + 1e-12 else "fail"
    return GateCheck(
        name="accuracy: perplexity",
        verdict=verdict,
        baseline=scored["fp32_perplexity"],
        candidate=scored["perplexity"],
        change=f"drop {drop:+.4g} (x{scored['perplexity_ratio']:.4f})",
        limit=f"drop <= {limit:g}",
        detail=f"{what}: {scored['tokens']} tokens in {window}-token windows; next-token "
        f"agreement {scored['next_token_agreement']:.3f}",
        seconds=time.perf_counter() - started,
    )


def run_gate_lm(
    baseline: str | os.PathLike,
    candidate: str | os.PathLike,
    config: GateConfig = GateConfig(),
    *,
    evaluator: EvalSpec | None = None,
    progress: ProgressFn | None = None,
) -> GateResult:
    """Gate the exported LM folder CANDIDATE against BASELINE on decode tokens/s, and on size and perplexity
    where `config` limits them (perplexity on `evaluator`'s text). Raises InputError (exit 2) on bad input."""
    from dlopt.gate.config import validate_config
    from dlopt.gate.result import overall_verdict

    validate_config(config)
    started = time.perf_counter()
    checks, fields = _checks(Path(baseline), Path(candidate), config, evaluator, progress)
    verdict, code = overall_verdict(checks, config.on_inconclusive)
    return GateResult(
        config=config,
        baseline=str(baseline),
        candidate=str(candidate),
        checks=tuple(checks),
        verdict=verdict,
        exit_code=code,
        seconds=time.perf_counter() - started,
        **fields,
    )


def _checks(
    baseline: Path, candidate: Path, config: GateConfig, evaluator: EvalSpec | None, progress: ProgressFn | None
) -> tuple[list[GateCheck], dict[str, Any]]:
    """The checks (decode tokens/s, and size and perplexity where limited) and GateResult's fields."""
    from dlopt.bench import InterleavedSampler, machine_fingerprint
    from dlopt.bench.generate import (
        GenerateConfig,
        GenerationRun,
        load_lm,
        prompt_tokens,
        require_genai,
        validate_generate_config,
    )
    from dlopt.gate.run import gated_latency_test, size_check, warmup_dict
    from dlopt.genai import check_lm_folder, check_prompt_fits
    from dlopt.stats import ratio_ci

    if config.input_shapes:
        raise InputError("an LM gate does not take {input_shape}", "drop it: prompts are {prompt_len} seeded tokens")
    folders = [check_lm_folder(p, tokenizer=False) for p in (baseline, candidate)]
    threads, batch = config.threads or 1, config.batch or 1
    prompt_len = config.prompt_len or min(DEFAULT_PROMPT_LEN, folders[0].context_length // 2)
    new_tokens = DEFAULT_NEW_TOKENS if config.new_tokens is None else config.new_tokens
    generate = GenerateConfig(
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        threads=threads,
        batch_sizes=(batch,),
        clock=config.clock,
        seed=config.seed,
    )
    validate_generate_config(generate)
    for f in folders:
        check_prompt_fits(f, prompt_len, new_tokens, "the prompt ({prompt_len})")
    limit = _perplexity_limit(config)
    if limit is not None and evaluator is None:
        raise InputError(
            "a perplexity limit needs evaluation text",
            "give a plain-text file as {eval_data=TEXT.txt}, or {eval=smollm2}",
        )
    if evaluator is not None and limit is None:
        raise InputError("evaluation text given without a perplexity limit", "add {max_accuracy_drop=perplexity=0.03}")

    checks: list[GateCheck] = []
    if config.max_size_growth is not None:
        checks.append(size_check(folders[0].size_bytes, folders[1].size_bytes, config.max_size_growth))
    if limit is not None and evaluator is not None:
        if progress:
            progress("scoring perplexity", 0.0)
        checks.append(_perplexity_check(folders[0], folders[1], evaluator, limit, threads))

    og = require_genai()
    if progress:
        progress("loading the models", 0.0)
    runs = [
        GenerationRun(og, load_lm(og, f, threads), prompt_tokens(f, batch, prompt_len, config.seed), new_tokens)
        for f in folders
    ]
    clock = config.clock if config.clock != "auto" else ("cpu" if threads == 1 else "wall")
    sampler = InterleavedSampler(runs)
    warm = sampler.warm_up(
        max_seconds=config.budget_s * config.warmup_max_fraction,
        clock=clock,
        window=2,
        on_round=(lambda f: progress("warming up", f * config.warmup_max_fraction)) if progress else None,
    )
    for run in runs:
        run.clear()  # warm-up generations are not samples

    def decode(i: int) -> np.ndarray:
        return np.asarray(runs[i].phases["decode_per_token"][clock], dtype=np.float64)

    outcome = gated_latency_test(
        config,
        warm,
        progress,
        lambda: sampler.run_rounds(1),
        lambda: len(runs[0].phases["decode_per_token"][clock]),
        lambda level: ratio_ci(
            decode(0),
            decode(1),
            method=config.ratio_method,
            paired=True,
            confidence=level,
            n_boot=config.n_boot,
            seed=config.seed,
        ),
    )
    base_s, cand_s = float(np.median(decode(0))), float(np.median(decode(1)))
    i = outcome.interval
    checks.insert(
        0,
        GateCheck(
            name="decode tokens/s",
            verdict=outcome.verdict,
            baseline=batch / base_s,
            candidate=batch / cand_s,
            change="n/a" if i is None else f"time/token x{i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}]",
            limit=f"<= x{outcome.limit:.3f}",
            detail=f"greedy generation, prompt {prompt_len} tokens, {new_tokens} new, batch {batch}; "
            f"median {clock} ms per decoded token {base_s * 1e3:.3g} -> {cand_s * 1e3:.3g}; {outcome.reason} "
            f"({outcome.look_confidence:.2%} CI per look)",
            seconds=outcome.seconds,
        ),
    )
    notes = [
        f"clock: {clock}"
        + (" (auto: one thread, thread CPU time)" if config.clock == "auto" and clock == "cpu" else ""),
        f"LM folders: onnxruntime-genai {og.__version__}; the speed check is decode time per token, interleaved",
    ]
    fields = dict(
        mode="interleaved",
        latency=outcome,
        clock=clock,
        threads=threads,
        batch=batch,
        warmup=warmup_dict(warm),
        machine=machine_fingerprint(threads),
        cross_machine=(),
        notes=tuple(notes),
    )
    return checks, fields


__all__ = ["DEFAULT_NEW_TOKENS", "DEFAULT_PROMPT_LEN", "run_gate_lm"]
