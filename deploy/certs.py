"""`make certs`: a local CA, a server certificate for every nightcap service, a client certificate for mutual TLS,
and tokens for each role, under var/certs/. Existing files are kept (so tokens stay valid) unless --force.

    var/certs/ca.pem                 the CA certificate: clients' --tls-ca, servers' --tls-client-ca
    var/certs/server.pem, .key       one certificate for all three services (names in --host)
    var/certs/client.pem, .key       a client certificate for mutual TLS (chatctl --tls-cert/--tls-key)
    var/certs/tokens                 the servers' --tokens-file: an admin, a chat and the orchestrator's token
    var/certs/{admin,chat,orchestrator}.token   one token each, for --token-file / --service-token-file
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.paths import VAR_ENV, VarLayout

# Names the services are reached by: loopback, compose service names and Kubernetes Service names.
DEFAULT_HOSTS = [
    "localhost",
    "127.0.0.1",
    "::1",
    "generation",
    "retrieval",
    "orchestrator",
    "nightcap-generation",
    "nightcap-retrieval",
    "nightcap-orchestrator",
]
VALID_DAYS = 365

app = typer.Typer(add_completion=False, help=__doc__)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nightcap"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = _name("nightcap local CA")
    certificate = (
        _builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def make_leaf(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, hosts: list[str], client: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(_name(common_name), ca.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, data: bytes, private: bool = False) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    temporary.replace(path)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certs(folder: Path, hosts: list[str], force: bool = False) -> list[Path]:
    """Writes the CA, server and client certificates and the tokens into ``folder``; returns what it wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "ca.pem").exists() and not force:
        return []
    ca, ca_key = make_ca()
    server, server_key = make_leaf(ca, ca_key, "nightcap services", hosts, client=False)
    client, client_key = make_leaf(ca, ca_key, "nightcap client", [], client=True)
    tokens = {role: secrets.token_urlsafe(32) for role in ("admin", "chat", "orchestrator")}
    files = {
        "ca.key": (_key_pem(ca_key), True),
        "server.pem": (_pem(server), False),
        "server.key": (_key_pem(server_key), True),
        "client.pem": (_pem(client), False),
        "client.key": (_key_pem(client_key), True),
        "tokens": (
            (
                "# ROLE TOKEN NAME, read by every service's --tokens-file; edit to rotate (reread on change)\n"
                f"admin {tokens['admin']} admin\n"
                f"chat {tokens['chat']} chat\n"
                f"chat {tokens['orchestrator']} orchestrator\n"
            ).encode(),
            True,
        ),
        **{f"{role}.token": (f"{token}\n".encode(), True) for role, token in tokens.items()},
        "ca.pem": (_pem(ca), False),  # last: its presence means the set is complete
    }
    for name, (data, private) in files.items():
        _write(folder / name, data, private)
    return [folder / name for name in files]


@app.command()
def main(
    out: Annotated[Path | None, typer.Option("--out", help="folder to write to; default <var>/certs")] = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="another DNS name or IP the server certificate is valid for (repeatable)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace existing certificates and tokens")] = False,
    var_dir: Annotated[
        Path | None, typer.Option("--var-dir", envvar=VAR_ENV, help="runtime folder; default ./var")
    ] = None,
) -> None:
    """Make a local CA, certificates and tokens for the stack."""
    folder = out or VarLayout.from_env(var_dir).root / "certs"
    written = make_certs(folder, [*DEFAULT_HOSTS, *(host or [])], force)
    if not written:
        typer.echo(f"{folder} already holds certificates (--force replaces them and the tokens)")
        return
    typer.echo(f"wrote {len(written)} files to {folder}: CA, server and client certificates, tokens")
    typer.echo(
        f"serve with:  --tls-cert {folder}/server.pem --tls-key {folder}/server.key --tokens-file {folder}/tokens\n"
        f"ask with:    chatctl --tls-ca {folder}/ca.pem --token-file {folder}/chat.token ask 'Where is Zurich?'"
    )


if __name__ == "__main__":
    sys.exit(app())
