"""The int4 scheme config (Int4WeightOnly) and what it accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from dlopt.errors import InputError
from dlopt.optimize.quantize_scheme import QuantizeScheme

ALGORITHMS = ("auto", "rtn", "mse", "hqq", "gptq")
Algorithm = Literal["auto", "rtn", "mse", "hqq", "gptq"]
_OP_TYPES = ("MatMul", "Gemm", "Gather")
MS_DOMAIN = "com.microsoft"
# tables smaller than this stay float: quantizing a position or token-type table saves nothing
MIN_EMBEDDING_ELEMENTS = 1 << 16


@dataclass(frozen=True, kw_only=True)
class Int4WeightOnly(QuantizeScheme):
    """4-bit block-quantized weights (MatMulNBits, GatherBlockQuantized); activations stay float."""

    VERSION: ClassVar[int] = 1
    precision: ClassVar[str] = "int4"
    block_size: int = 32  # weights per scale, along the reduction axis; a power of two >= 16
    symmetric: bool = True  # True: no zero points, a signed scale per block (see block_grid); False: a zero
    #                         point per block (~1.5 % larger; HQQ needs it)
    algorithm: Algorithm = "auto"  # auto: gptq with calibration data, else rtn. rtn: ORT's round to nearest;
    #                                mse: round to nearest with a per-block clipping range that minimizes
    #                                squared error (dlopt); hqq: half-quadratic (ORT, torch); gptq: dlopt's
    #                                error-compensating GPTQ, needs data
    quantize_embeddings: bool = True  # Gather on a large constant table -> GatherBlockQuantized (4-bit)
    embedding_block_size: int | None = None  # None: block_size
    share_tied_embeddings: bool = True  # a table that is also a (transposed) MatMul weight, like a tied LM
    #                                     head, is stored once: the Gather reads the MatMul's quantized codes
    # exclude_ops (QuantizeScheme): of MatMul, Gemm, Gather, the op types left in float
    keep_first: int = 0  # the first N weight MatMuls (graph order) kept at fallback_bits
    keep_last: int = 1  # the last N (an LM head; with a tied table, the embedding too) kept at fallback_bits
    sensitive_fraction: float = 0.1  # share of MatMul weights (by parameters) kept at fallback_bits, most
    #                                  sensitive first; needs calibration data (ignored without, with a note)
    fallback_bits: int = 8  # 8: 8-bit MatMulNBits; 32: float
    accuracy_level: int | None = 4  # MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (CPU:
    #                                 SmolLM2 b1x64 2.2x -> 1.1x FP32 time for +0.5 % perplexity; GPU EPs ignore it)
    sensitivity_samples: int = 8  # calibration samples used to rank nodes
    gptq_samples: int = 32  # calibration samples GPTQ builds its Hessians from (SmolLM2: 32 x 128 tokens)
    gptq_act_order: bool = True  # GPTQ visits inputs by decreasing energy, block grids fixed up front
    gptq_clip_search: bool = True  # GPTQ block grids by an energy-weighted clip-ratio search, not min/max

    def __post_init__(self):
        super().__post_init__()

        def bad(what: str, hint: str):
            raise InputError(f"int4: {what}", hint)

        for name in ("block_size", "embedding_block_size"):
            value = getattr(self, name)
            if value is None and name == "embedding_block_size":
                continue
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                bad(f"{name} {value!r} is not a power of two >= 16", "use 16, 32, 64, 128 or 256")
        if self.algorithm not in ALGORITHMS:
            bad(f"unknown algorithm {self.algorithm!r}", f"choose one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "hqq" and self.symmetric:
            bad("hqq fits a float zero point per block, it cannot be symmetric", "use symmetric=False or rtn/gptq")
        unknown_ops = sorted(set(self.exclude_ops) - set(_OP_TYPES))
        if unknown_ops:
            bad(f"exclude_ops {unknown_ops} are not quantized by int4", f"int4 quantizes {', '.join(_OP_TYPES)}")
        if self.fallback_bits not in (8, 32):
            bad(f"fallback_bits {self.fallback_bits!r}", "use 8 (8-bit MatMulNBits) or 32 (float)")
        if not 0.0 <= self.sensitive_fraction < 1.0:
            bad(f"sensitive_fraction {self.sensitive_fraction!r} is outside [0, 1)", "e.g. 0.1 keeps 10 % at 8-bit")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            bad(f"accuracy_level {self.accuracy_level!r}", "use 0-4 (4: int8 compute, fastest on CPU)")
        for name in ("keep_first", "keep_last"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0", "give a number of layers")
        if self.sensitivity_samples < 1 or self.gptq_samples < 1:
            bad("sample counts must be >= 1", "e.g. sensitivity_samples=8")
