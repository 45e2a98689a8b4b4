"""dlopt verify: re-check a bundle's hashes and outputs, and with a trusted key who signed it."""

from __future__ import annotations

import click

from dlopt.cli._common import TOLERANCE


@click.command("verify", short_help="Re-check a bundle: every file's sha256, no extra files, outputs vs the source's.")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--hashes-only", is_flag=True, help="Check files only, do not run the model.")
@click.option(
    "--trusted-key",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="PUB",
    help="Public key (`dlopt keygen`) that must have signed the manifest; without it only integrity "
    "is checked, not origin.",
)
@click.option(
    "--atol",
    type=TOLERANCE,
    default=None,
    help="Model vs the stored source outputs, absolute (default 1e-4, or the manifest's if tighter).",
)
@click.option(
    "--rtol",
    type=TOLERANCE,
    default=None,
    help="Model vs the stored source outputs, relative (default 1e-3, or the manifest's if tighter).",
)
def command(bundle, hashes_only, trusted_key, atol, rtol):
    """Verify BUNDLE (a folder written by `dlopt package`).

    Exit code 0 when every file matches the manifest (none missing, none changed, none added) and the
    model still reproduces the source model's stored outputs within tolerance; 1 on a mismatch, or
    with --trusted-key on a missing or bad signature or one by another key; 2 when BUNDLE is not a
    folder or the key cannot be read.

    Without --trusted-key this checks integrity, not origin: whoever can edit the bundle can also
    rewrite its manifest. The tolerance is verify's own (--atol/--rtol, else the package defaults);
    a criterion recorded in the manifest can only tighten it.
    """
    from dlopt.api import format_verify, origin_text, verification_error, verified_text, verify

    result = verify(bundle, check_outputs=not hashes_only, trusted_key=trusted_key, atol=atol, rtol=rtol)
    click.echo(format_verify(result))
    click.echo(origin_text(result, "cli"))
    if not result.passed:
        raise verification_error(result)
    click.echo(verified_text(result))
