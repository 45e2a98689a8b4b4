"""The latency harness behind `dlopt bench` (and the gate, which drives `InterleavedSampler` itself).

How a measurement goes, and why:
1. Each model is loaded on the target (`Target.create_session`, which refuses a silent fallback to
   the CPU); its size on disk, session-creation time and the memory it added (process RSS, and device
   memory on a GPU) are recorded.
2. Per batch size, the inputs are generated (or read from --data) and bound on the device once
   (`Target.bind`), so the timed call is the model and nothing else.
3. Warm-up runs all models round-robin until each one's latency has settled (the median of the last
   5 runs no more than 5 % below the 5 before: runs stopped getting faster), not for a fixed count:
   first runs pay for allocation, lazy initialisation and autotuning, and how many runs that takes
   depends on the model and target.
   It stops at a cap (a quarter of the budget) and says so when latencies never settled.
4. Very fast models are timed in groups: from the warm-up latencies, each sample is `runs_per_sample`
   back-to-back runs (at least ~1 ms of work), so the clocks' own cost and resolution do not dominate
   a sample and the CI has real width. Timed rounds run the models interleaved, every model once per
   round, until the time budget or the round count is reached; the order rotates (A B C, B C A, C A B, …) so
   no model always runs in the same position. Interleaving puts every model through the same machine states
   (other jobs, frequency, thermal), so their ratio is fair even when absolute times drift; garbage collection is off in
   the loop. Each call records wall time and the calling thread's CPU time.
   The budget is one deadline for everything (session setup, binding, warm-up, timed rounds and the
   bootstrap), from the moment `benchmark` is called (the CLI: from the process start): a round is not
   started when it would end past the deadline. Stored samples are capped (`max_samples`): when the cap
   is reached, adjacent rounds are merged pairwise (their mean, the pairing kept), so memory and the
   bootstrap's cost stay bounded however fast the model.
5. Ratios to the first model are the median over rounds of (model time / first model's time in the
   same round), with a bootstrap 95 % confidence interval over rounds (dlopt.stats.ratio_ci): the
   two runs of a round share the machine's state, so its quotient cancels most of the noise.

The floor of what a ratio can show: two sessions of the *same* file differ by about 1 % on a 30 us
model (0.986-0.992 in repeated runs here, CIs excluding 1), from where their buffers land in memory;
rotating the order did not change that. Ratios within ~2 % of 1 for tiny models are not a finding.

Which clock decides: with one intra-op thread on the CPU the work runs on the calling thread, and its
CPU time leaves out time the thread spent descheduled. On a shared machine that is far steadier than
wall time (spreads of ~2 % against 35-61 % seen on a busy 2-core CI box) and the ratio of CPU times is
the ratio of work done. With more threads, pool threads' time is invisible to the calling thread, and
on a GPU the thread only waits: wall time is the honest clock there. `clock="auto"` picks accordingly.

The package, by concern:
    config.py   BenchConfig, its checks, parse_duration / parse_batch_sizes
    sampler.py  InterleavedSampler: warm-up, rotated interleaved rounds, grouped runs (Repeated)
    data.py     the inputs: load_data, bound data batches, generated feeds, padding share
    results.py  LoadedModel, ModelRun, BatchRun, BenchResult (and its JSON form)
    harness.py  benchmark(): load, bind, measure under one deadline; machine_fingerprint
    report.py   format_bench: the tables `dlopt bench` prints
"""

from dlopt.bench.config import (
    CLOCKS,
    DEFAULT_BUDGET_S,
    DEFAULT_SEQ_LEN,
    MIN_TIMED_ROUNDS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    BenchConfig,
    ClockFn,
    ProgressFn,
    parse_batch_sizes,
    parse_duration,
    read_clocks,
    validate_config,
)
from dlopt.bench.data import (
    MAX_DATA_BATCHES,
    data_batches,
    length_sorting,
    load_data,
    model_feed_batches,
    model_feeds,
    padding_note,
    padding_share,
    sorted_by_length,
)
from dlopt.bench.harness import (
    BOOTSTRAP_S_PER_ELEMENT,
    FINISH_RESERVE_S,
    BoundModels,
    CyclingRun,
    benchmark,
    bind_models,
    choose_clock,
    load_models,
    machine_fingerprint,
    measure_speedup,
)
from dlopt.bench.results import BatchRun, BenchResult, LoadedModel, ModelRun
from dlopt.bench.sampler import InterleavedSampler, Repeated, WarmupReport, median_cpu_ms, runs_per_sample
from dlopt.bench.summary import format_bench

__all__ = [
    "BenchConfig",
    "BenchResult",
    "BoundModels",
    "bind_models",
    "model_feeds",
    "InterleavedSampler",
    "SCHEMA_VERSION",
    "WarmupReport",
    "benchmark",
    "choose_clock",
    "format_bench",
    "load_data",
    "measure_speedup",
    "median_cpu_ms",
    "length_sorting",
    "load_models",
    "machine_fingerprint",
    "parse_batch_sizes",
    "parse_duration",
    "validate_config",
    "BatchRun",
    "BOOTSTRAP_S_PER_ELEMENT",
    "ClockFn",
    "CLOCKS",
    "CyclingRun",
    "data_batches",
    "DEFAULT_BUDGET_S",
    "DEFAULT_SEQ_LEN",
    "FINISH_RESERVE_S",
    "LoadedModel",
    "MAX_DATA_BATCHES",
    "MIN_TIMED_ROUNDS",
    "model_feed_batches",
    "ModelRun",
    "padding_note",
    "padding_share",
    "ProgressFn",
    "read_clocks",
    "Repeated",
    "runs_per_sample",
    "SCHEMA_NAME",
    "sorted_by_length",
]
