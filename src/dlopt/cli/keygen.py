"""dlopt keygen: an Ed25519 key pair for signing bundles (`dlopt package --sign-key`)."""

from __future__ import annotations

import click


@click.command(
    "keygen", short_help="Make an Ed25519 key pair to sign bundles (package --sign-key, verify --trusted-key)."
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for dlopt-signing.key (private, mode 0600) and dlopt-signing.pub; created (mode 0700) if missing.",
)
@click.option(
    "--private", "private_path", type=click.Path(dir_okay=False), default=None, help="Private key file (instead of -o)."
)
@click.option(
    "--public", "public_path", type=click.Path(dir_okay=False), default=None, help="Public key file (instead of -o)."
)
def command(out_dir, private_path, public_path):
    """Write a new Ed25519 key pair as PEM files; existing files are never overwritten.

    Sign with the private key (`dlopt package M.onnx -o B --sign-key KEY`); give the public key to
    whoever checks the bundle (`dlopt verify B --trusted-key KEY.pub`). Keep the private key secret.
    """
    from dlopt.api import keygen

    pair = keygen(output=out_dir, private=private_path, public=public_path)
    click.echo(f"private key: {pair.private_key} (mode 0600; keep it secret)")
    click.echo(f"public key:  {pair.public_key}")
    click.echo(f"fingerprint: {pair.fingerprint}")
