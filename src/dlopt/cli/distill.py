"""dlopt distill: train a pruned student against its teacher (knowledge distillation)."""

from __future__ import annotations

import click

from dlopt.cli._common import COUNT, FRACTION, NON_NEGATIVE_INT, POSITIVE, TOLERANCE, echo_err


@click.command("distill", short_help="Win back a pruned model's accuracy by distilling its teacher into it.")
@click.option("--teacher", required=True, help="The teacher: a reference model or a factory path/to/file.py:build.")
@click.option(
    "--student",
    required=True,
    type=click.Path(dir_okay=False),
    help="The student: a checkpoint written by `dlopt prune` (or by an earlier `dlopt distill`).",
)
@click.option(
    "--student-source",
    default=None,
    metavar="SOURCE",
    help="Rebuild the student from this source (path/file.py:build, package.module:build or a reference "
    "model) instead of the one its checkpoint records; needed when that file moved or changed.",
)
@click.option(
    "--data",
    required=True,
    help="Training data: an .npz file with one array per forward() input (samples first) and optionally "
    "'labels'; or 'reference' for the teacher reference model's own training data (fashion-cnn: "
    "the Fashion-MNIST training set; minilm: unlabeled sentences from gensim's corpora).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory: distilled.pt, distilled.onnx (verified), distill.json, distill_state.pt.",
)
@click.option("--epochs", type=COUNT, default=3, show_default=True)
@click.option("--temperature", type=POSITIVE, default=4.0, show_default=True, help="Softens the logits (kl loss).")
@click.option(
    "--alpha",
    type=FRACTION,
    default=0.7,
    show_default=True,
    help="Weight of the teacher's term; 1 - alpha weighs the hard labels (when the data has labels).",
)
@click.option(
    "--loss",
    type=click.Choice(["kl", "cosine", "mse"]),
    default=None,
    help="kl for classifiers, cosine or mse for embedding models. [default: cosine for minilm, else kl]",
)
@click.option(
    "--lr",
    type=POSITIVE,
    default=None,
    help="AdamW learning rate, cosine-decayed. [default: 1e-3; 3e-4 for minilm, whose word embeddings are frozen]",
)
@click.option("--batch-size", type=COUNT, default=64, show_default=True)
@click.option("--max-samples", type=COUNT, default=None, help="Use at most this many training samples.")
@click.option(
    "--val-fraction",
    type=FRACTION,
    default=0.1,
    show_default=True,
    help="Held out from --data for the eval metric that early stopping watches.",
)
@click.option(
    "--patience",
    type=NON_NEGATIVE_INT,
    default=2,
    show_default=True,
    help="Stop after this many epochs without a better eval metric; 0 never stops early.",
)
@click.option(
    "--hidden",
    multiple=True,
    metavar="TEACHER_LAYER:STUDENT_LAYER",
    help="Also match these hidden states (MSE, through a learned adapter when widths differ).",
)
@click.option("--hidden-weight", type=TOLERANCE, default=1.0, show_default=True)
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the interrupted run whose state is in -o.")
@click.option(
    "--bench-seconds",
    type=TOLERANCE,
    default=15.0,
    show_default=True,
    help="Budget of the latency measurement against the teacher (one thread, interleaved).",
)
@click.option("--no-bench", is_flag=True, help="Skip the latency measurement.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(
    teacher,
    student,
    student_source,
    data,
    output,
    epochs,
    temperature,
    alpha,
    loss,
    lr,
    batch_size,
    max_samples,
    val_fraction,
    patience,
    hidden,
    hidden_weight,
    seed,
    device,
    resume,
    bench_seconds,
    no_bench,
    no_progress,
):
    """Distill TEACHER into the pruned STUDENT on DATA; writes the student as a checkpoint and ONNX.

    Loss: KL divergence of temperature-softened logits times T^2, plus (1 - alpha) hard-label
    cross-entropy when the data has labels; unlabeled data trains on the teacher alone. Embedding
    models use cosine or MSE against the teacher's embedding. Training is seeded and saved after
    every epoch: --resume continues an interrupted run and ends where an uninterrupted one would.

    The student's source is the one its checkpoint records, imported only if that file still has
    the sha256 recorded with it; otherwise name it with --student-source.
    """
    from pathlib import Path

    from dlopt.api import distill_model

    pairs = []
    for item in hidden:
        if item.count(":") != 1:
            from dlopt.errors import InputError

            raise InputError(
                f"--hidden {item!r} is not TEACHER_LAYER:STUDENT_LAYER", "e.g. --hidden features.4:features.4"
            )
        pairs.append(tuple(item.split(":")))
    written = distill_model(
        teacher,
        Path(student),
        data,
        Path(output),
        epochs=epochs,
        temperature=temperature,
        alpha=alpha,
        loss=loss,
        lr=lr,
        batch_size=batch_size,
        max_samples=max_samples,
        val_fraction=val_fraction,
        patience=patience or None,
        hidden_layers=tuple(pairs),
        hidden_weight=hidden_weight if pairs else 0.0,
        seed=seed,
        device=device,
        resume=resume,
        bench_seconds=None if no_bench else bench_seconds,
        show_progress=not no_progress,
        student_source=student_source,
        log=echo_err,
    )
    click.echo(written.table)
    for line in written.notes:
        click.echo(line)
    click.echo(f"wrote {written.checkpoint}, {written.onnx}, {written.report_path}")
