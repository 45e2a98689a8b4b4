"""ORT's MatMulNBitsQuantizer (rtn, hqq), quietened."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from dlopt.errors import MissingDependencyError
from dlopt.optimize.int4.config import Int4WeightOnly


# -- ORT's quantizer ----------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_ort_quantizer() -> Iterator[None]:
    """ORT's weight-only quantizer logs every node at INFO and prints a progress bar to stdout."""
    loggers = [
        logging.getLogger(n)
        for n in (
            "onnxruntime.quantization.matmul_nbits_quantizer",
            "onnxruntime.quantization.neural_compressor.weight_only",
        )
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(__import__("io").StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def ort_matmul_nbits(model, *, bits: int, config: Int4WeightOnly, include: set[str], all_matmuls: set[str]):
    """Quantize the MatMuls named in `include` with ORT's round-to-nearest (or HQQ) block quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if not include:
        return model
    if config.algorithm == "hqq" and bits == 4:
        try:
            import torch  # noqa: F401  (HQQ runs in torch)
        except ImportError as e:
            raise MissingDependencyError("int4 algorithm hqq needs torch", "pip install torch==2.13.0") from e
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4, op_types_to_quantize=("MatMul",))
    else:
        algo = DefaultWeightOnlyQuantConfig(
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level,
            bits=bits,
            op_types_to_quantize=("MatMul",),
        )
    quantizer = MatMulNBitsQuantizer(model, algo_config=algo, nodes_to_exclude=sorted(all_matmuls - include))
    quantizer.process()
    return quantizer.model.model
