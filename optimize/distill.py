"""Knowledge distillation: train a (pruned) student to reproduce its teacher, winning accuracy back.

Plain PyTorch on purpose: the loss is a few lines and the framework packages pull other torch and CUDA
builds. Losses:
- "kl": classifiers. KL divergence between temperature-softened teacher and student distributions,
  times T^2 (keeps gradient size independent of T, Hinton et al. 2015), plus hard-label cross-entropy
  weighted (1 - alpha) when labels exist. Unlabeled data trains on the teacher alone.
- "cosine" / "mse": embedding models (sentence encoders): the student's embedding against the teacher's.
- optional hidden-state MSE between named layers (a learned linear adapter bridges pruned widths).

Training is seeded (each epoch's shuffle and dropout come from seed and epoch number), checkpointed
after every epoch with the optimizer and schedule, so a resumed run ends bit-identical to an
uninterrupted one. Early stopping watches an eval metric on held-out data (higher is better) and
the best epoch's weights are returned.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from dlopt.checkpoint import PrunedCheckpoint
from dlopt.errors import InputError, MissingDependencyError, TargetUnavailableError
from dlopt.optimize.export import TORCH_SOURCE
from dlopt.optimize.prune import first_tensor
from dlopt.sources import ModelSource
from dlopt.stage import (
    Artifact,
    StageContext,
    StageInput,
    StageResult,
    TorchStageArtifacts,
    config_to_dict,
    register_stage,
)

Loss = Literal["kl", "cosine", "mse"]
Device = Literal["cpu", "cuda"]
LOSSES: tuple[str, ...] = ("kl", "cosine", "mse")
STATE_FORMAT = "dlopt-distill-state-v1"
STATE_FILE = "distill_state.pt"


@dataclass(frozen=True, kw_only=True)
class Distill:
    """Knowledge distillation of a student from a teacher on training data."""

    VERSION: ClassVar[int] = 1
    epochs: int = 3
    temperature: float = 4.0  # softens both distributions ("kl" only)
    alpha: float = 0.7  # weight of the distillation term; (1 - alpha) on hard-label cross-entropy
    loss: Loss = "kl"  # kl for classifiers, cosine or mse for embedding models
    hidden_weight: float = 0.0  # weight of the hidden-state MSE over hidden_layers
    hidden_layers: tuple[tuple[str, str], ...] = ()  # (teacher module name, student module name) pairs
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    eval_batch_size: int = 256
    max_batches_per_epoch: int | None = None  # cap an epoch's length (None: the whole training set)
    patience: int | None = 2  # stop after this many epochs without a better eval metric (None: never)
    freeze: tuple[str, ...] = ()  # student parameters whose names start with these stay fixed (e.g. embeddings)
    seed: int = 0
    device: Device = "cpu"


@dataclass(frozen=True)
class DistillData:
    """Tensors with the sample axis first: forward()'s keyword inputs, and labels when there are any."""

    inputs: dict[str, Any]
    labels: Any | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def subset(self, index) -> DistillData:
        return DistillData(
            {k: v[index] for k, v in self.inputs.items()}, None if self.labels is None else self.labels[index]
        )


def _require_torch():
    try:
        import torch
    except ModuleNotFoundError as e:
        raise MissingDependencyError(
            "distillation needs torch", "pip install torch==2.13.0 (the CPU build) then pip install 'dlopt[torch]'"
        ) from e
    return torch


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature: float = 4.0, alpha: float = 0.7):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels); KD alone without labels."""
    torch = _require_torch()
    f = torch.nn.functional
    t = float(temperature)
    kd = f.kl_div(
        f.log_softmax(student_logits / t, dim=-1),
        f.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if labels is None:
        return kd
    return alpha * kd + (1.0 - alpha) * f.cross_entropy(student_logits, labels)


def embedding_loss(student, teacher, kind: Loss):
    torch = _require_torch()
    if kind == "cosine":
        return (1.0 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
    return torch.nn.functional.mse_loss(student, teacher)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_config(config: Distill) -> None:
    if config.loss not in LOSSES:
        raise InputError(f"unknown distillation loss {config.loss!r}", f"choose one of {', '.join(LOSSES)}")
    if config.epochs < 1:
        raise InputError(f"epochs must be at least 1, got {config.epochs}", "e.g. {epochs=3}")
    if config.temperature <= 0:
        raise InputError(f"temperature must be positive, got {config.temperature}", "typical values: 2 to 8")
    if not 0.0 <= config.alpha <= 1.0:
        raise InputError(
            f"alpha must be between 0 and 1, got {config.alpha}",
            "alpha weights the teacher's term, 1 - alpha the labels'",
        )
    if config.batch_size < 1 or config.eval_batch_size < 1:
        raise InputError("batch sizes must be positive", "e.g. {batch_size=64}")
    if config.lr <= 0:
        raise InputError(f"learning rate must be positive, got {config.lr}", "e.g. {lr=1e-3}")
    if config.patience is not None and config.patience < 1:
        raise InputError(f"patience must be at least 1, got {config.patience}", "or None to never stop early")
    if config.device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {config.device!r}", "choose cpu or cuda")


def check_data(data: DistillData, what: str) -> None:
    torch = _require_torch()
    if not data.inputs:
        raise InputError(f"{what} has no inputs", "give forward()'s inputs as {name: tensor [N, ...]}")
    sizes = {
        k: int(v.shape[0]) if isinstance(v, torch.Tensor) and v.dim() > 0 else None for k, v in data.inputs.items()
    }
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise InputError(
            f"{what}: inputs must be tensors with the same number of samples, got {sizes}",
            "stack the samples along the first axis",
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise InputError(f"{what} is empty", "give at least one sample")
    if data.labels is not None and int(data.labels.shape[0]) != n:
        raise InputError(f"{what}: {int(data.labels.shape[0])} labels for {n} samples", "one label per sample")
    for name, tensor in data.inputs.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int(tensor.numel() - torch.isfinite(tensor).sum())
            raise InputError(
                f"{what}: input {name!r} holds {bad} NaN or infinite value(s)",
                "remove or fix those samples; training needs finite inputs",
            )


def check_compatible(teacher, student, data: DistillData, config: Distill) -> tuple[int, ...]:
    """Run both models on two samples; their outputs must have the same shape. Returns that shape."""
    torch = _require_torch()
    sample = _to(_trim_padding(data.subset(slice(0, 2)).inputs), "cpu")
    shapes = {}
    for role, model in (("teacher", teacher), ("student", student)):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                shapes[role] = tuple(first_tensor(model(**sample)).shape)
        except InputError:
            raise
        except Exception as e:  # a model that cannot run the data is the user's input problem
            raise InputError(
                f"the {role} cannot run on the data ({type(e).__name__}: {str(e).splitlines()[0]})",
                "the data's input names and shapes must match forward()",
            ) from e
        finally:
            model.train(was_training)
    if shapes["teacher"] != shapes["student"]:
        raise InputError(
            f"the student's output shape {list(shapes['student'])} does not match the teacher's "
            f"{list(shapes['teacher'])}",
            "distillation needs the same outputs (classes / embedding width); "
            "prune with the classifier kept (dlopt prune does)",
        )
    if config.loss == "kl" and len(shapes["teacher"]) < 2:
        raise InputError("loss 'kl' needs logits [batch, classes]", "use {loss=cosine} or {loss=mse} for embeddings")
    if config.loss == "kl" and data.labels is not None:
        classes = shapes["teacher"][-1]
        if int(data.labels.min()) < 0 or int(data.labels.max()) >= classes:
            raise InputError(
                f"labels range {int(data.labels.min())}..{int(data.labels.max())} outside the model's "
                f"{classes} classes",
                "labels must be class indices 0..classes-1",
            )
    return shapes["teacher"]


# ---------------------------------------------------------------------------------------------
# Batching helpers
# ---------------------------------------------------------------------------------------------


def _trim_padding(inputs: dict[str, Any]) -> dict[str, Any]:
    """Token batches padded to the data set's longest sequence: cut to this batch's longest."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs
    length = max(int(mask.sum(dim=1).max()), 1)
    return {k: (v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in inputs.items()}


def _to(inputs: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) for k, v in inputs.items()}


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def teacher_outputs(teacher, data: DistillData, batch_size: int, device) -> Any:
    torch = _require_torch()
    teacher.eval()
    outs = []
    with torch.no_grad():
        for s in _batches(len(data), batch_size):
            outs.append(first_tensor(teacher(**_to(_trim_padding(data.subset(s).inputs), device))).float().cpu())
    return torch.cat(outs)


def data_fingerprint(data: DistillData) -> str:
    """Identifies the training data in a checkpoint, so that --resume refuses other data."""
    h = hashlib.sha256()
    for name in sorted(data.inputs):
        t = data.inputs[name]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1)[:4096].cpu().numpy().tobytes())
    if data.labels is not None:
        h.update(data.labels.reshape(-1)[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Hidden-state matching
# ---------------------------------------------------------------------------------------------


class _Capture:
    """Forward hooks keeping the outputs of named modules."""

    def __init__(self, model, names: list[str], role: str):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise InputError(
                f"hidden_layers: the {role} has no layer named {missing[0]!r}",
                "names are module paths as in model.named_modules()",
            )
        self.values: dict[str, Any] = {}
        self.hooks = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, out):
            self.values[name] = first_tensor(out)

        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def _make_adapters(teacher, student, config: Distill, sample: dict[str, Any]):
    """One adapter per layer pair mapping the student's width to the teacher's (identity when equal)."""
    torch = _require_torch()
    t_cap = _Capture(teacher, [t for t, _ in config.hidden_layers], "teacher")
    s_cap = _Capture(student, [s for _, s in config.hidden_layers], "student")
    try:
        with torch.no_grad():
            teacher(**sample)
            student(**sample)
    finally:
        t_cap.close()
        s_cap.close()
    adapters = torch.nn.ModuleList()
    for t_name, s_name in config.hidden_layers:
        t, s = t_cap.values[t_name], s_cap.values[s_name]
        if t.dim() != s.dim() or t.shape[0] != s.shape[0]:
            raise InputError(
                f"hidden layers {t_name!r} {list(t.shape)} and {s_name!r} {list(s.shape)} cannot be matched",
                "pick layers with the same rank and spatial/sequence size",
            )
        channel_dim = 1 if t.dim() == 4 else t.dim() - 1
        if t.shape == s.shape:
            adapters.append(torch.nn.Identity())
        elif t.dim() == 4 and t.shape[2:] == s.shape[2:]:
            adapters.append(torch.nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False))
        elif t.shape[:channel_dim] == s.shape[:channel_dim]:
            adapters.append(torch.nn.Linear(s.shape[-1], t.shape[-1], bias=False))
        else:
            raise InputError(
                f"hidden layers {t_name!r} {list(t.shape)} and {s_name!r} {list(s.shape)} differ "
                "in more than their width",
                "pick layers of the same spatial/sequence size",
            )
    return adapters


# ---------------------------------------------------------------------------------------------
# Evaluation on held-out data
# ---------------------------------------------------------------------------------------------


def default_metric(student, val: DistillData, val_targets, config: Distill, device) -> tuple[str, float]:
    """Accuracy with labels; agreement with the teacher's top-1 without; mean cosine for embeddings."""
    torch = _require_torch()
    outs = teacher_outputs(student, val, config.eval_batch_size, device)
    if config.loss == "kl":
        pred = outs.argmax(-1)
        if val.labels is not None:
            return "val_accuracy", float((pred == val.labels.cpu()).float().mean())
        return "val_teacher_agreement", float((pred == val_targets.argmax(-1)).float().mean())
    return "val_cosine_to_teacher", float(torch.nn.functional.cosine_similarity(outs, val_targets, dim=-1).mean())


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

EvalFn = Callable[[Any], float]


def distill(
    teacher,
    student,
    data: DistillData,
    config: Distill = Distill(),
    *,
    val: DistillData | None = None,
    eval_fn: EvalFn | None = None,
    eval_name: str = "eval_metric",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> StageResult:
    """Train a copy of `student` against `teacher` on `data`; returns the best student and a report.

    The eval metric (higher is better) is `eval_fn(student)` when given, else computed on `val`
    (accuracy, teacher agreement or cosine); with neither, there is no early stopping and the last
    epoch is kept. With `checkpoint_dir`, the state is saved after every epoch; `resume=True`
    continues from it and ends exactly where an uninterrupted run would."""
    torch = _require_torch()
    check_config(config)
    check_data(data, "the training data")
    if val is not None:
        check_data(val, "the validation data")
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"the {role} must be a torch.nn.Module, got {type(model).__name__}", "load it first")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise TargetUnavailableError("{device=cuda}: no CUDA GPU is visible to torch", "use {device=cpu}")
    device = torch.device(config.device)
    if resume and checkpoint_dir is None:
        raise InputError("{resume} needs the checkpoint directory", "give the same checkpoint directory as before")

    started = time.perf_counter()
    teacher_was_training = teacher.training
    teacher = teacher.to(device).eval()  # frozen: it only ever runs under no_grad
    student = copy.deepcopy(student).to(device)
    for name, p in student.named_parameters():
        p.requires_grad_(not name.startswith(config.freeze) if config.freeze else True)
    output_shape = check_compatible(teacher, student, data, config)

    torch.manual_seed(config.seed)  # adapters' initial weights
    sample = _to(_trim_padding(data.subset(slice(0, 2)).inputs), device)
    adapters = _make_adapters(teacher, student, config, sample).to(device) if config.hidden_layers else None
    use_hidden = adapters is not None and config.hidden_weight > 0
    if config.hidden_weight > 0 and not config.hidden_layers:
        raise InputError("hidden_weight > 0 but no hidden_layers to match", "give (teacher, student) layer pairs")

    # The teacher is frozen and runs in eval mode: its outputs are computed once, not every epoch.
    targets = teacher_outputs(teacher, data, config.eval_batch_size, device)
    val_targets = teacher_outputs(teacher, val, config.eval_batch_size, device) if val is not None else None

    n = len(data)
    steps_per_epoch = math.ceil(n / config.batch_size)
    if config.max_batches_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_batches_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    params = [p for p in student.parameters() if p.requires_grad]
    params += list(adapters.parameters()) if adapters is not None else []
    if not params:
        raise InputError(f"freeze={list(config.freeze)} leaves no student parameter to train", "freeze less")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )

    fingerprint = data_fingerprint(data)
    state_path = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
    if state_path is not None and not resume:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    first_epoch, best_metric, best_state, best_epoch, bad_epochs = 0, -math.inf, None, None, 0
    history: list[dict[str, Any]] = []
    if resume:
        saved = load_state(state_path, config, fingerprint)
        student.load_state_dict(saved["student"])
        if adapters is not None:
            adapters.load_state_dict(saved["adapters"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        first_epoch, best_metric, best_epoch = saved["epoch"], saved["best_metric"], saved["best_epoch"]
        best_state, bad_epochs, history = saved["best_state"], saved["bad_epochs"], list(saved["history"])

    t_caps = s_caps = None
    if use_hidden:
        t_caps = _Capture(teacher, [t for t, _ in config.hidden_layers], "teacher")
        s_caps = _Capture(student, [s for _, s in config.hidden_layers], "student")
    stopped_early = bool(history) and history[-1].get("stopped_early", False)
    try:
        with _progress(show_progress) as progress:
            task = progress.add_task("distill", total=(config.epochs - first_epoch) * steps_per_epoch)
            for epoch in range(first_epoch, config.epochs):
                if stopped_early:
                    break
                record = _train_epoch(
                    epoch,
                    student,
                    teacher,
                    adapters,
                    data,
                    targets,
                    optimizer,
                    schedule,
                    config,
                    steps_per_epoch,
                    device,
                    t_caps,
                    s_caps,
                    progress,
                    task,
                )
                student.eval()
                if eval_fn is not None:
                    name, metric = eval_name, float(eval_fn(student))
                elif val is not None:
                    name, metric = default_metric(student, val, val_targets, config, device)
                else:
                    name, metric = None, None
                record |= {"eval_metric": name, "eval_value": metric}
                if metric is not None and metric > best_metric:
                    best_metric, best_epoch, bad_epochs = metric, epoch + 1, 0
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                elif metric is not None:
                    bad_epochs += 1
                stopped_early = config.patience is not None and metric is not None and bad_epochs >= config.patience
                record["stopped_early"] = stopped_early
                history.append(record)
                progress.update(
                    task,
                    description=f"epoch {epoch + 1}/{config.epochs}"
                    + (f" {name} {metric:.4f}" if metric is not None else ""),
                )
                if state_path is not None:
                    save_state(
                        state_path,
                        {
                            "format": STATE_FORMAT,
                            "config": config_to_dict(config),
                            "fingerprint": fingerprint,
                            "epoch": epoch + 1,
                            "student": student.state_dict(),
                            "adapters": adapters.state_dict() if adapters is not None else None,
                            "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(),
                            "best_metric": best_metric,
                            "best_epoch": best_epoch,
                            "best_state": best_state,
                            "bad_epochs": bad_epochs,
                            "history": history,
                        },
                    )
    finally:
        for caps in (t_caps, s_caps):
            if caps is not None:
                caps.close()

    teacher.train(teacher_was_training)
    if best_state is not None:
        student.load_state_dict(best_state)
    student = student.eval().cpu()
    report = {
        "stage": "distill",
        "config": config_to_dict(config),
        "samples": n,
        "labeled": data.labels is not None,
        "output_shape": list(output_shape),
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "best_epoch": best_epoch if best_state is not None else len(history),
        "best_eval": best_metric if best_state is not None else None,
        "history": history,
        "teacher_parameters": int(sum(p.numel() for p in teacher.parameters())),
        "student_parameters": int(sum(p.numel() for p in student.parameters())),
        "seconds": round(time.perf_counter() - started, 2),
        "resumed_from_epoch": first_epoch if resume else None,
    }
    return StageResult(model=student, report=report)


def _train_epoch(
    epoch,
    student,
    teacher,
    adapters,
    data,
    targets,
    optimizer,
    schedule,
    config: Distill,
    steps_per_epoch,
    device,
    t_caps,
    s_caps,
    progress,
    task,
) -> dict[str, Any]:
    torch = _require_torch()
    # Each epoch's randomness comes from (seed, epoch) alone: a resumed run draws the same numbers.
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    torch.manual_seed(config.seed * 100_003 + epoch)  # dropout
    student.train()
    total, count, started = 0.0, 0, time.perf_counter()
    for step in range(steps_per_epoch):
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        batch = data.subset(index)
        inputs = _to(_trim_padding(batch.inputs), device)
        target = targets[index].to(device)
        if t_caps is not None:
            with torch.no_grad():
                teacher(**inputs)
        out = first_tensor(student(**inputs))
        if config.loss == "kl":
            labels = batch.labels.to(device) if batch.labels is not None else None
            loss = kd_loss(out, target, labels, temperature=config.temperature, alpha=config.alpha)
        else:
            loss = embedding_loss(out, target, config.loss)
        if t_caps is not None:
            hidden = sum(
                torch.nn.functional.mse_loss(adapter(s_caps.values[s]), t_caps.values[t])
                for adapter, (t, s) in zip(adapters, config.hidden_layers)
            )
            loss = loss + config.hidden_weight * hidden / len(config.hidden_layers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += float(loss.detach()) * len(index)
        count += len(index)
        progress.update(task, advance=1, description=f"epoch {epoch + 1}/{config.epochs} loss {total / count:.4f}")
    return {
        "epoch": epoch + 1,
        "train_loss": total / count,
        "lr": schedule.get_last_lr()[0],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _progress(show: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
        transient=False,
    )


# ---------------------------------------------------------------------------------------------
# Training state on disk
# ---------------------------------------------------------------------------------------------


def save_state(path: Path, state: dict[str, Any]) -> None:
    torch = _require_torch()
    from dlopt.fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path | None, config: Distill, fingerprint: str) -> dict[str, Any]:
    from dlopt.fileio import load_torch_dict

    _require_torch()
    if path is None or not path.is_file():
        raise InputError(f"{{resume}}: no training state at {path}", "run without {resume} first")
    state = load_torch_dict(
        path,
        kind="distillation state ({resume})",
        format_tag=STATE_FORMAT,
        hint="delete it and start again without {resume}",
    )
    if state["config"] != config_to_dict(config):
        changed = sorted(
            k for k, v in config_to_dict(config)["fields"].items() if state["config"]["fields"].get(k) != v
        )
        raise InputError(
            f"{{resume}}: the settings differ from the interrupted run's ({', '.join(changed)})",
            "resume with the same options, or start again without {resume}",
        )
    if state["fingerprint"] != fingerprint:
        raise InputError(
            "{resume}: the training data differ from the interrupted run's",
            "resume with the same data, or start again without {resume}",
        )
    return state


# ---------------------------------------------------------------------------------------------
# SOURCE + checkpoint + data -> directory: what `dlopt distill` does
# ---------------------------------------------------------------------------------------------


def load_npz_data(path: Path, example_inputs: Mapping[str, Any], max_samples: int | None = None) -> DistillData:
    """Arrays named after forward()'s inputs (samples first), plus optional 'labels'."""
    import numpy as np

    torch = _require_torch()
    if not path.is_file():
        raise InputError(f"data file {path} does not exist", "give an .npz file or 'reference'")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError) as e:
        raise InputError(
            f"{path} is not a readable .npz file ({type(e).__name__})",
            "write it with numpy.savez(path, input_name=array, labels=array)",
        ) from e
    missing = [n for n in example_inputs if n not in arrays]
    if missing:
        raise InputError(
            f"{path} has no array for the model input {missing[0]!r} (it has {sorted(arrays)})",
            "name each array after a forward() argument",
        )
    inputs = {}
    for name, example in example_inputs.items():
        inputs[name] = torch.from_numpy(np.ascontiguousarray(arrays[name])).to(example.dtype)
    labels = torch.from_numpy(arrays["labels"]).long() if "labels" in arrays else None
    result = DistillData(inputs, labels)
    check_data(result, str(path))
    if max_samples is not None:
        result = result.subset(slice(0, max_samples))
    return result


def reference_training_data(name: str, max_samples: int | None = None) -> DistillData:
    """A reference model's own training data (ReferenceModel.training_data: Fashion-MNIST's training
    images for fashion-cnn, gensim's running text for minilm), the first `max_samples` of it."""
    from dlopt.models import REFERENCE_MODELS, get_reference_model

    model = get_reference_model(name)  # unknown names fail with the list of known ones
    if not model.training:
        having = ", ".join(m.name for m in REFERENCE_MODELS.values() if m.training)
        raise InputError(
            f"distillation data: the reference model {name!r} has no training data to distill on",
            f"give an .npz file (reference data exists for {having})",
        )
    data = DistillData(*model.training_data(max_samples))
    check_data(data, f"{name}'s training data")
    return data


def split_validation(data: DistillData, fraction: float, seed: int) -> tuple[DistillData, DistillData | None]:
    torch = _require_torch()
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"{{val_fraction={fraction}}} is out of range", "give a fraction in [0, 1), e.g. 0.1")
    n_val = int(round(len(data) * fraction))
    if n_val == 0:
        return data, None
    if n_val >= len(data):
        raise InputError(f"{{val_fraction={fraction}}} leaves no training samples", "use a smaller fraction")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_val:]), data.subset(order[:n_val])


# ---------------------------------------------------------------------------------------------
# The stage adapter
# ---------------------------------------------------------------------------------------------


def _write(given: StageInput, config: Distill, context: StageContext) -> Artifact:
    """The stage before's pruned checkpoint trained against the source (the teacher) on the training data (a
    tenth held out for early stopping, split by the config's seed), as the checkpoint OUTPUT/model.pt; the
    checkpoint keeps the pruning, so export rebuilds it."""
    from dlopt.checkpoint import read_checkpoint, save_checkpoint, torch_source

    log = context.log
    teacher = torch_source(given.source, None, log)
    student = torch_source(given.source, given.input_path(), log, loaded=teacher)
    data_spec = given.training_data or f"model:{given.source}"  # the reference model's own, as dlopt run's
    log(f"loading the training data {data_spec}")
    if data_spec.startswith("model:"):
        data = reference_training_data(data_spec[len("model:") :])
    else:
        data = load_npz_data(Path(data_spec), teacher.example_inputs)
    train, val = split_validation(data, 0.1, config.seed)
    result = distill_stage.apply(
        student, config, StageContext(data=train, eval_data=val, teacher=teacher, after=context.after, log=log)
    )
    pruned = read_checkpoint(given.input_path())
    report = dict(result.report) | {"train_samples": len(train)}
    produced = save_checkpoint(
        context.folder() / "model.pt",
        result.model.module,
        given.source,
        {
            "pruning_history": pruned.pruning_history,
            "module_attributes": pruned.module_attributes,
            "prune": pruned.report,
            "distill": report,
        },
    )
    return Artifact.of(produced, report)


def _recipe_check(recipe: Any, stage: Any, where: str) -> None:
    """In a recipe (dlopt.recipe): distill trains the prune stage's student against the source, so it follows
    prune, on training data it has (the recipe's training_data, else the reference source's own)."""
    from dlopt.models import REFERENCE_MODELS

    if stage.index == 1 or recipe.stages[stage.index - 2].kind != "prune":
        raise InputError(
            f"{where}: distill trains the pruned student against the source: it follows a prune stage",
            'add [[stage]] kind = "prune" before it',
        )
    if recipe.training_data is None:
        model = REFERENCE_MODELS.get(recipe.source)
        if model is None or not model.training:
            having = ", ".join(m.name for m in REFERENCE_MODELS.values() if m.training)
            raise InputError(
                f"{where}: distill needs training data and the source {recipe.source} ships none",
                f'add training_data = "train.npz" at the top (reference data ships for {having})',
            )
    elif not Path(recipe.training_data).is_file():
        raise InputError(
            f"{recipe.path}: training_data {recipe.training_data} does not exist",
            "give an .npz with an array per forward() input (and optional labels)",
        )


@register_stage(
    kind="distill",
    config=Distill,
    takes="torch",
    makes="torch",
    requires=(TORCH_SOURCE,),
    ensures=(TORCH_SOURCE,),
    summary="train the student against a teacher (torch)",
    validate=check_config,
    writer=_write,
    reads=("training_data",),
    recipe_check=_recipe_check,
)
def distill_stage(student: ModelSource, config: Distill, context: StageContext) -> StageResult:
    """A student ModelSource in, the same source with the trained module out; context.teacher (a
    ModelSource) and context.data (a DistillData) are required, context.eval_data is the validation set;
    with context.output the training state is saved there after every epoch (context.resume continues it)."""
    if context.teacher is None or not isinstance(context.data, DistillData):
        raise InputError(
            "distill needs a teacher and training data (a DistillData)",
            "pass them in the stage context: teacher=, data=",
        )
    result = distill(
        context.teacher.module,
        student.module,
        context.data,
        config,
        val=context.eval_data,
        checkpoint_dir=context.output,
        resume=context.resume,
        show_progress=context.progress,
    )
    return StageResult(dataclasses.replace(student, module=result.model), result.report)


def _same_source(a: str, b: str) -> bool:
    from dlopt.checkpoint import pinned_source

    if a == b:
        return True
    try:
        return pinned_source(a)[0] == pinned_source(b)[0]
    except (InputError, OSError):
        return False


def distill_files(
    teacher_spec: str,
    checkpoint: PrunedCheckpoint,
    source_spec: str,
    student_path: Path,
    data_spec: str,
    output_dir: str | os.PathLike,
    config: Distill,
    *,
    max_samples: int | None,
    val_fraction: float,
    seed: int,
    resume: bool,
    bench_seconds: float | None,
    show_progress: bool,
    log: Callable[[str], None],
) -> TorchStageArtifacts:
    """Distill TEACHER into the pruned `checkpoint` (rebuilt from `source_spec`) on DATA and write
    OUT/distilled.pt, a verified OUT/distilled.onnx and OUT/distill.json, renamed into place together at the
    end (the training state, OUT/distill_state.pt, is saved after every epoch: `resume` continues it). What
    `dlopt distill` writes."""
    from dlopt.bench import measure_speedup
    from dlopt.checkpoint import rebuild, save_checkpoint
    from dlopt.fileio import guard_outputs, guard_source_spec, json_text, output_folder, stage_onnx, staged_outputs
    from dlopt.optimize.export import export_verified
    from dlopt.sources import load_source
    from dlopt.tables import format_table

    out_dir = Path(output_dir)
    guard_outputs(
        [
            guard_source_spec(teacher_spec),
            student_path,
            guard_source_spec(source_spec),
            None if data_spec == "reference" else data_spec,
        ],
        [out_dir],
    )
    with output_folder(out_dir) as out_dir, staged_outputs() as outputs:
        log(f"loading the teacher {teacher_spec}")
        teacher = load_source(teacher_spec)
        log(f"rebuilding the student from {student_path} (source {source_spec})")
        student_source = (
            dataclasses.replace(teacher, module=copy.deepcopy(teacher.module))
            if _same_source(source_spec, teacher_spec)
            else load_source(source_spec)
        )
        student = dataclasses.replace(
            student_source, module=rebuild(checkpoint, student_source.module, student_source.example_inputs)
        )
        data = (
            reference_training_data(teacher_spec, max_samples)
            if data_spec == "reference"
            else load_npz_data(Path(data_spec), teacher.example_inputs, max_samples)
        )
        train, val = split_validation(data, val_fraction, seed)
        log(
            f"distilling on {len(train)} samples ({'labeled' if train.labels is not None else 'unlabeled'}), "
            f"{len(val) if val is not None else 0} held out for early stopping"
        )
        result = distill_stage.apply(
            student,
            config,
            StageContext(
                data=train,
                eval_data=val,
                teacher=teacher,
                output=out_dir,
                resume=resume,
                progress=show_progress,
                log=log,
            ),
        )
        report = dict(result.report)
        log("exporting the student (verified against torch)")
        onnx_path = out_dir / "distilled.onnx"
        distilled = dataclasses.replace(result.model, name=f"{source_spec} (distilled)")
        onnx_tmp = stage_onnx(export_verified(distilled, log), onnx_path, outputs)
        saved = save_checkpoint(
            out_dir / "distilled.pt",
            result.model.module,
            source_spec,
            {
                "pruning_history": checkpoint.pruning_history,
                "module_attributes": checkpoint.module_attributes,
                "prune": checkpoint.report,
                "distill": {k: v for k, v in report.items()},
            },
            outputs=outputs,
        )
        notes = []
        if bench_seconds is not None:
            teacher_path = out_dir / "teacher.onnx"
            log("exporting the teacher for the latency comparison")
            teacher_tmp = stage_onnx(export_verified(teacher, log), teacher_path, outputs)
            log(f"measuring latency against the teacher, one thread, interleaved ({bench_seconds:g} s)")
            speed = measure_speedup(teacher_tmp, onnx_tmp, budget_s=bench_seconds)
            report["latency"] = speed
            notes.append(
                f"latency (1 thread, batch {speed['batch']}): teacher {speed['baseline_ms']:.3f} ms, student "
                f"{speed['ms']:.3f} ms: {speed['speedup']:.2f}x faster [{speed['speedup_low']:.2f}, "
                f"{speed['speedup_high']:.2f}]"
            )
        if report["stopped_early"]:
            notes.append(f"stopped early after epoch {report['epochs_run']}; kept epoch {report['best_epoch']}")
        report |= {
            "teacher": teacher_spec,
            "student_checkpoint": str(student_path),
            "student_source": source_spec,
            "data": data_spec,
            "checkpoint": str(saved),
            "onnx": str(onnx_path),
        }
        report_path = out_dir / "distill.json"
        outputs.stage(report_path).write_text(json_text(report))
        rows = [
            [h["epoch"], h["train_loss"], h.get("eval_metric") or "", h.get("eval_value"), h["seconds"]]
            for h in report["history"]
        ]
        table = format_table(["epoch", "train loss", "eval metric", "value", "seconds"], rows)
        return TorchStageArtifacts(saved, onnx_path, report_path, report, table, tuple(notes))


__all__ = [
    "Distill",
    "distill_files",
    "distill_stage",
    "LOSSES",
    "DistillData",
    "load_npz_data",
    "reference_training_data",
    "split_validation",
    "check_compatible",
    "data_fingerprint",
    "distill",
    "embedding_loss",
    "kd_loss",
]
