"""Model sources: a torch module with named example inputs (ModelSource), from what a user names as
SOURCE: a reference model, path/to/file.py:build or package.module:build (load_source). Export, prune,
distill, package's --torch-source and the verbs all start from one; none of them owns it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dlopt.errors import InputError, MissingDependencyError
from dlopt.usercode import import_user_file, user_code

Exporter = Literal["dynamo", "torchscript"]
EXPORTERS: tuple[Exporter, ...] = ("dynamo", "torchscript")


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A torch module with named example inputs: what every export starts from.

    `make_inputs(batch, seq_len)` builds inputs of other shapes for verification; when a source does
    not provide one, inputs are resampled from the example's value ranges."""

    name: str
    module: Any
    example_inputs: dict[str, Any]
    output_names: tuple[str, ...] | None = None
    dynamic_axes: dict[str, dict[int, str]] | None = None
    make_inputs: Callable[[int, int | None], dict[str, Any]] | None = None
    atol: float = 1e-4
    rtol: float = 1e-3
    # The exporter this model exports best with, when it is not the default. BERT-like encoders:
    # torchscript, because ONNX Runtime's transformer optimizer fuses Attention only in its graph
    # (the dynamo graph gets LayerNorm/BiasGelu fusions only), and the fused Attention is what
    # dynamic INT8 turns into QAttention.
    exporter: Exporter | None = None


def require_torch():
    try:
        import torch
    except ModuleNotFoundError as e:
        raise MissingDependencyError(
            "exporting from PyTorch needs torch",
            "pip install torch==2.13.0 (the CPU build) then pip install 'dlopt[torch]'",
        ) from e
    return torch


# ---------------------------------------------------------------------------------------------
# Resolving SOURCE: a reference model name, path/to/file.py:build, or package.module:build
# ---------------------------------------------------------------------------------------------


def load_source(spec: str) -> ModelSource:
    """Turn the SOURCE argument of `dlopt export` into a ModelSource."""
    from dlopt.models import REFERENCE_MODELS

    if spec in REFERENCE_MODELS:
        return _reference_source(spec)
    if ":" not in spec:
        known = ", ".join(REFERENCE_MODELS)
        raise InputError(
            f"unknown model {spec!r}",
            f"give a reference model ({known}) or a factory as path/to/file.py:build or package.module:build",
        )
    target, _, func_name = spec.rpartition(":")
    factory = _load_factory(target, func_name, spec)
    require_torch()
    with user_code(f"factory {spec}"):  # a user's factory may raise (or exit) anything: their input's fault
        built = factory()
    return _source_from_factory_result(spec, built)


def _reference_source(name: str) -> ModelSource:
    from dlopt.models import get_reference_model

    ref = get_reference_model(name)
    module, example = ref.build()
    options = ref.export_options()
    return ModelSource(
        name=name,
        module=module,
        example_inputs=dict(example),
        output_names=tuple(options["output_names"]) if "output_names" in options else None,
        dynamic_axes=options.get("dynamic_axes"),
        make_inputs=lambda batch, seq_len: ref.example_inputs(batch=batch, seq_len=seq_len),
        atol=options.get("atol", 1e-4),
        rtol=options.get("rtol", 1e-3),
        exporter=options.get("exporter"),
    )


def factory_file(spec: str) -> Path:
    """The .py file a factory SOURCE (path/to/file.py:build or package.module:build) runs, as given
    (not resolved); its module's file for a module spec, found without running the module itself."""
    target = spec.rpartition(":")[0]
    if target.endswith(".py") or "/" in target or "\\" in target:
        return Path(target)
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError) as e:
        raise InputError(
            f"factory module {target!r} cannot be found ({e})", "is it installed, or on PYTHONPATH?"
        ) from e
    if found is None or not found.origin or not found.has_location:
        raise InputError(f"factory module {target!r} cannot be found", "is it installed, or on PYTHONPATH?")
    return Path(found.origin)


def _load_factory(target: str, func_name: str, spec: str) -> Callable[[], Any]:
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = import_user_file(target, role="factory")
    else:
        try:
            with user_code(f"importing factory module {target!r}", hint="fix the module", errors=False):
                module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise InputError(
                f"factory module {target!r} cannot be imported ({e})", "is it installed, or on PYTHONPATH?"
            ) from e
        except Exception as e:
            raise InputError(
                f"importing factory module {target!r} raised {type(e).__name__}: {e}", "fix the module"
            ) from e
    factory = getattr(module, func_name, None)
    if factory is None:
        raise InputError(
            f"factory {spec}: {target} has no attribute {func_name!r}",
            "the part after ':' must name a function in that module",
        )
    if not callable(factory):
        raise InputError(f"factory {spec} is not callable", "it must be a function returning (module, inputs)")
    return factory


def _source_from_factory_result(spec: str, built: Any) -> ModelSource:
    torch = require_torch()
    contract = "a factory returns (torch.nn.Module, example inputs) or (module, inputs, options dict)"
    if not isinstance(built, (tuple, list)) or len(built) not in (2, 3):
        raise InputError(f"factory {spec} returned {type(built).__name__}", contract)
    module, inputs = built[0], built[1]
    options = dict(built[2]) if len(built) == 3 and built[2] is not None else {}
    if not isinstance(module, torch.nn.Module):
        raise InputError(
            f"factory {spec} returned {type(module).__name__} where a torch.nn.Module was expected", contract
        )
    inputs = _name_inputs(module, inputs, spec)
    unknown = set(options) - {"output_names", "dynamic_axes", "atol", "rtol", "make_inputs", "exporter"}
    if unknown:
        raise InputError(
            f"factory {spec} options have unknown keys {sorted(unknown)}",
            "allowed: output_names, dynamic_axes, atol, rtol, make_inputs, exporter",
        )
    if options.get("exporter") not in (None, *EXPORTERS):
        raise InputError(
            f"factory {spec} asks for exporter {options['exporter']!r}", f"choose one of {', '.join(EXPORTERS)}"
        )
    return ModelSource(
        name=spec,
        module=module.eval(),
        example_inputs=inputs,
        output_names=tuple(options["output_names"]) if "output_names" in options else None,
        dynamic_axes=options.get("dynamic_axes"),
        make_inputs=options.get("make_inputs"),
        atol=float(options.get("atol", 1e-4)),
        rtol=float(options.get("rtol", 1e-3)),
        exporter=options.get("exporter"),
    )


def _name_inputs(module, inputs: Any, spec: str) -> dict[str, Any]:
    """Example inputs as {forward parameter name: tensor}; names become the ONNX input names."""
    torch = require_torch()
    if isinstance(inputs, Mapping):
        named = dict(inputs)
        try:  # the names must be forward()'s: an nn.Sequential's forward takes one positional `input`
            signature = inspect.signature(module.forward)
            signature.bind(**named)
        except TypeError as e:
            raise InputError(
                f"factory {spec}: {type(module).__name__}.forward{signature} cannot take the example inputs "
                f"{sorted(named)} as keyword arguments ({e})",
                "name each example input after a forward() parameter, or return them as a tuple in forward()'s "
                "order (for an nn.Sequential: (tensor,))",
            ) from e
        except ValueError:
            pass  # no introspectable signature (a builtin or C++ module): the first call tells
    else:
        tensors = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) < len(tensors):
            raise InputError(
                f"factory {spec} gave {len(tensors)} inputs but forward() takes {len(params)}",
                "return the inputs as a dict {forward argument name: tensor}",
            )
        named = dict(zip(params, tensors))
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"factory {spec}: example input {name!r} is {type(value).__name__}, not a tensor",
                "example inputs must be torch tensors",
            )
    return named


__all__ = ["EXPORTERS", "Exporter", "ModelSource", "factory_file", "load_source", "require_torch"]
