"""dlopt.optimize.distill: the loss against hand computation, accuracy won back, resume, early stopping, bad input."""

import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
nn = torch.nn
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from dlopt.errors import InputError  # noqa: E402
from dlopt.optimize.distill import (Distill, DistillData, distill, embedding_loss,  # noqa: E402
                                    kd_loss)
from dlopt.optimize.prune import Prune, prune  # noqa: E402


class MLP(nn.Module):
    def __init__(self, hidden=128, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, hidden),
                                  nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="session")
def digits():
    """sklearn's 8x8 digits, shuffled once: 1200 train, 250 validation, 347 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:1450], y[1200:1450]), "test": (x[1450:], y[1450:])}


@pytest.fixture(scope="session")
def teacher(digits):
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = digits["train"]
    model.train()
    for _ in range(40):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model, split):
    x, y = split
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def data(digits, split, labeled=True):
    x, y = digits[split]
    return DistillData({"x": x}, y if labeled else None)


FAST = Distill(epochs=10, lr=3e-3, batch_size=64, patience=None)


def test_kd_loss_matches_a_hand_computed_case():
    student = torch.tensor([[1.0, 2.0, 3.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0]])
    t = 2.0

    def softmax(z):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    p_t, p_s = softmax([3.0, 2.0, 1.0]), softmax([1.0, 2.0, 3.0])
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))  # = p_t[0] - p_t[2] here: log ratios are +1, 0, -1
    ce = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(3.0)))  # label 0, T = 1
    assert kl == pytest.approx(0.320157, abs=1e-6)
    got = kd_loss(student, teacher, temperature=t, alpha=0.25)
    assert float(got) == pytest.approx(t * t * kl, rel=1e-6)  # no labels: the teacher alone
    got = kd_loss(student, teacher, torch.tensor([0]), temperature=t, alpha=0.25)
    assert float(got) == pytest.approx(0.25 * t * t * kl + 0.75 * ce, rel=1e-6)
    # batchmean: a batch of two identical rows gives the same value
    assert float(kd_loss(student.repeat(2, 1), teacher.repeat(2, 1), temperature=t)) == pytest.approx(t * t * kl)
    # identical logits: zero divergence
    assert float(kd_loss(teacher, teacher, temperature=t)) == pytest.approx(0.0, abs=1e-7)


def test_embedding_losses():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert float(embedding_loss(a, b, "cosine")) == pytest.approx(0.5)  # (1 - 0 + 1 - 1) / 2
    assert float(embedding_loss(a, b, "mse")) == pytest.approx((1 + 1 + 0 + 1) / 4)


def test_distillation_wins_back_the_accuracy_pruning_lost(digits, teacher):
    teacher_acc = accuracy(teacher, digits["test"])
    assert teacher_acc > 0.95
    student = prune(teacher, {"x": digits["train"][0][:2]}, Prune(ratio=0.75)).model
    assert student.head.in_features == 32
    pruned_acc = accuracy(student, digits["test"])
    result = distill(teacher, student, data(digits, "train"), FAST, val=data(digits, "val"), show_progress=False)
    distilled_acc = accuracy(result.model, digits["test"])
    assert pruned_acc < teacher_acc - 0.1  # pruning without training hurts
    assert distilled_acc > teacher_acc - 0.04  # distillation wins it back
    r = result.report
    assert r["labeled"] and r["epochs_run"] == 10 and r["history"][0]["eval_metric"] == "val_accuracy"
    assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
    assert accuracy(student, digits["test"]) == pruned_acc  # the input student is not modified


def test_unlabeled_data_trains_on_the_teacher_alone(digits, teacher):
    student = prune(teacher, {"x": digits["train"][0][:2]}, Prune(ratio=0.75)).model
    result = distill(teacher, student, data(digits, "train", labeled=False), FAST,
                     val=data(digits, "val", labeled=False), show_progress=False)
    assert not result.report["labeled"]
    assert result.report["history"][0]["eval_metric"] == "val_teacher_agreement"
    assert result.report["best_eval"] > 0.85
    assert accuracy(result.model, digits["test"]) > accuracy(teacher, digits["test"]) - 0.06


def test_hidden_state_matching_through_an_adapter(digits, teacher):
    student = prune(teacher, {"x": digits["train"][0][:2]}, Prune(ratio=0.75)).model
    config = Distill(epochs=3, lr=3e-3, hidden_layers=(("body.3", "body.3"),), hidden_weight=0.5,
                     patience=None)
    result = distill(teacher, student, data(digits, "train"), config, val=data(digits, "val"), show_progress=False)
    assert result.report["best_eval"] > 0.7
    assert result.model.body[3].out_features == 32  # the adapter (32 -> 128) is not part of the student


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, digits, teacher):
    student = prune(teacher, {"x": digits["train"][0][:2]}, Prune(ratio=0.75)).model
    config = Distill(epochs=3, lr=3e-3, max_batches_per_epoch=6, patience=None)
    train, val = data(digits, "train"), data(digits, "val")
    whole = distill(teacher, student, train, config, val=val, checkpoint_dir=tmp_path / "a", show_progress=False)

    calls = []

    def interrupted_eval(model):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during epoch 2: the state on disk is epoch 1's
        return accuracy(model, digits["val"])

    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student, train, config, eval_fn=interrupted_eval, eval_name="val_accuracy",
                checkpoint_dir=tmp_path / "b", show_progress=False)
    resumed = distill(teacher, student, train, config, val=val, checkpoint_dir=tmp_path / "b", resume=True,
                      show_progress=False)
    assert resumed.report["resumed_from_epoch"] == 1
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert [h["train_loss"] for h in whole.report["history"]] == [h["train_loss"] for h in resumed.report["history"]]


def test_early_stopping_keeps_the_best_epoch(digits, teacher):
    student = prune(teacher, {"x": digits["train"][0][:2]}, Prune(ratio=0.75)).model
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.95, 0.99])
    snapshots = []

    def eval_fn(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    config = Distill(epochs=6, lr=3e-3, max_batches_per_epoch=3, patience=2)
    result = distill(teacher, student, data(digits, "train"), config, eval_fn=eval_fn, show_progress=False)
    r = result.report
    assert r["stopped_early"] and r["epochs_run"] == 4 and r["best_epoch"] == 2 and r["best_eval"] == 0.9
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, snapshots[1][name])


def test_same_seed_same_student_other_seed_other_student(digits, teacher):
    student = prune(teacher, {"x": digits["train"][0][:2]}, Prune(ratio=0.75)).model
    config = Distill(epochs=1, max_batches_per_epoch=4, patience=None)
    runs = [distill(teacher, student, data(digits, "train"), c, show_progress=False).model.head.weight
            for c in (config, config, Distill(epochs=1, max_batches_per_epoch=4, patience=None, seed=1))]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_embedding_distillation_with_cosine_loss():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    student = prune(teacher, {"input": torch.randn(2, 16)}, Prune(ratio=0.5)).model
    x = torch.randn(512, 16)

    def cosine(model):
        with torch.no_grad():
            return float(nn.functional.cosine_similarity(model(x[:128]), teacher(x[:128])).mean())

    before = cosine(student)
    config = Distill(loss="cosine", epochs=15, lr=1e-2, batch_size=32, patience=None)
    result = distill(teacher, student, DistillData({"input": x[128:]}), config, val=DistillData({"input": x[:128]}),
                     show_progress=False)
    assert result.report["history"][0]["eval_metric"] == "val_cosine_to_teacher"
    assert cosine(result.model) > max(0.97, before)


BAD_INPUT = [
    ("student", lambda d: MLP(classes=5), {}, "student's output shape \\[2, 5\\] does not match the teacher's \\[2, 10\\]"),
    ("epochs", None, dict(epochs=0), "epochs must be at least 1"),
    ("alpha", None, dict(alpha=1.5), "alpha must be between 0 and 1"),
    ("temperature", None, dict(temperature=0.0), "temperature must be positive"),
    ("loss", None, dict(loss="l1"), "unknown distillation loss 'l1'"),
    ("patience", None, dict(patience=0), "patience must be at least 1"),
    ("hidden", None, dict(hidden_layers=(("body.9", "body.3"),), hidden_weight=1.0), "teacher has no layer named 'body.9'"),
]


@pytest.mark.parametrize("what, make_student, fields, message", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input(digits, teacher, what, make_student, fields, message):
    student = make_student(digits) if make_student else MLP(hidden=32)
    with pytest.raises(InputError, match=message):
        distill(teacher, student, data(digits, "val"), Distill(**fields), show_progress=False)


def test_bad_data(digits, teacher):
    x, y = digits["val"]
    with pytest.raises(InputError, match="250 labels for 249 samples"):
        distill(teacher, MLP(32), DistillData({"x": x[:249]}, y), show_progress=False)
    with pytest.raises(InputError, match="labels range 0..12 outside the model's 10 classes"):
        distill(teacher, MLP(32), DistillData({"x": x[:3]}, torch.tensor([0, 12, 3])), show_progress=False)
    with pytest.raises(InputError, match="cannot run on the data"):
        distill(teacher, MLP(32), DistillData({"x": torch.randn(4, 7)}), show_progress=False)
    with pytest.raises(InputError, match="is empty"):
        distill(teacher, MLP(32), DistillData({"x": x[:0]}), show_progress=False)


def test_resume_refuses_other_settings(tmp_path, digits, teacher):
    config = Distill(epochs=1, max_batches_per_epoch=2)
    distill(teacher, MLP(32), data(digits, "val"), config, checkpoint_dir=tmp_path, show_progress=False)
    with pytest.raises(InputError, match="settings differ.*lr"):
        distill(teacher, MLP(32), data(digits, "val"), Distill(epochs=1, max_batches_per_epoch=2, lr=0.1),
                checkpoint_dir=tmp_path, resume=True, show_progress=False)
    with pytest.raises(InputError, match="training data differ"):
        distill(teacher, MLP(32), data(digits, "test"), config, checkpoint_dir=tmp_path, resume=True,
                show_progress=False)
    with pytest.raises(InputError, match="no training state"):
        distill(teacher, MLP(32), data(digits, "val"), config, checkpoint_dir=tmp_path / "nothing", resume=True,
                show_progress=False)


# ---------------------------------------------------------------------------------------------
# The CLI: prune a factory, then distill it on .npz data
# ---------------------------------------------------------------------------------------------

FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.body(x))

def build():
    torch.manual_seed(0)
    return Net().eval(), {"x": torch.randn(2, 8)}

def build_other():
    torch.manual_seed(0)
    return Net(classes=3).eval(), {"x": torch.randn(2, 8)}
'''


@pytest.fixture(scope="module")
def pruned_factory(tmp_path_factory):
    from dlopt.cli import main

    tmp_path = tmp_path_factory.mktemp("cli")
    path = tmp_path / "net.py"
    path.write_text(FACTORY)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, labels=(x[:, :4].argmax(1)).astype(np.int64))
    result = CliRunner().invoke(main, ["prune", f"{path}:build", "--ratio", "0.5", "-o", str(tmp_path / "p"),
                                       "--no-bench"])
    assert result.exit_code == 0, result.output
    return path, tmp_path


def test_cli_distill_writes_student_and_resumes(pruned_factory):
    from dlopt.cli import main
    from dlopt.checkpoint import read_checkpoint

    path, tmp = pruned_factory
    args = ["distill", "--teacher", f"{path}:build", "--student", str(tmp / "p" / "pruned.pt"),
            "--data", str(tmp / "data.npz"), "-o", str(tmp / "d"), "--epochs", "2", "--no-bench"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"epoch\s+train loss", result.output)
    assert (tmp / "d" / "distilled.onnx").is_file() and (tmp / "d" / "distill.json").is_file()
    checkpoint = read_checkpoint(tmp / "d" / "distilled.pt")
    assert checkpoint.state_dict["fc.weight"].shape == (4, 16)
    again = CliRunner().invoke(main, args + ["--resume"])  # already finished: nothing left to train
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("change, message", [
    ({"--teacher": "{path}:build_other"}, "student's output shape \\[2, 4\\] does not match the teacher's \\[2, 3\\]"),
    ({"--data": "{tmp}/missing.npz"}, "missing.npz does not exist"),
    ({"--student": "{tmp}/data.npz"}, "not a dlopt checkpoint"),
    ({"--alpha": "2"}, "--alpha.*must be <= 1"),
    ({"--data": "reference"}, "unknown reference model '.*net.py:build'"),  # a factory teacher has no reference data
])
def test_cli_bad_input_exits_2(pruned_factory, change, message):
    from dlopt.cli import main

    path, tmp = pruned_factory
    options = {"--teacher": f"{path}:build", "--student": str(tmp / "p" / "pruned.pt"),
               "--data": str(tmp / "data.npz"), "-o": str(tmp / "bad")}
    options |= {k: v.format(path=path, tmp=tmp) for k, v in change.items()}
    args = ["distill", "--no-bench"] + [item for kv in options.items() for item in kv]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output


def test_reference_training_data_is_the_reference_models_own():
    """`--data reference` asks the teacher's ReferenceModel (dlopt.models) for its training data."""
    from dlopt.models import REFERENCE_MODELS, get_reference_model
    from dlopt.optimize.distill import reference_training_data

    fashion = get_reference_model("fashion-cnn")
    if fashion.missing_requirements():
        pytest.skip(f"fashion-cnn needs {fashion.missing_requirements()}")
    from dlopt.models import fashion_cnn

    data = reference_training_data("fashion-cnn", max_samples=100)
    images, labels = fashion_cnn.training_set()
    assert len(data) == 100 and data.inputs["image"].shape == (100, 1, 28, 28)
    assert torch.equal(data.inputs["image"], images[:100]) and torch.equal(data.labels, labels[:100])
    assert data.labels.dtype == torch.int64
    assert len(reference_training_data("fashion-cnn")) == 60_000
    assert [m.name for m in REFERENCE_MODELS.values() if m.training] == ["minilm", "fashion-cnn"]


def test_a_reference_model_without_training_data_is_an_input_error():
    from dlopt.models import get_reference_model
    from dlopt.optimize.distill import reference_training_data

    with pytest.raises(InputError, match="the reference model 'efficientnet-lite0' has no training data to distill on") \
            as raised:
        reference_training_data("efficientnet-lite0")
    assert raised.value.hint == "give an .npz file (reference data exists for minilm, fashion-cnn)"
    with pytest.raises(InputError, match="'smollm2' has no training data"):
        get_reference_model("smollm2").training_data()
    with pytest.raises(InputError, match="unknown reference model 'nope'"):
        reference_training_data("nope")
