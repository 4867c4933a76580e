"""Optional message signing with Celery's ``auth`` serializer (``INFER_SIGNING_DIR``).

With ``INFER_SIGNING_DIR`` set, every client and worker signs what it
publishes with its private key and accepts only messages signed by a
certificate in its trust store.  The folder holds::

    signer.key    this host's RSA private key (PEM, unencrypted, mode 0600)
    signer.pem    this host's certificate (PEM), whose key signs its messages
    trusted/      the certificates whose signatures are accepted (PEM files)

``python -m tasks.wire.signing init DIR`` creates all three, with this host's
certificate already in ``trusted/``, so one host works at once.  For several
hosts, copy every host's ``signer.pem`` into every host's ``trusted/`` (a
worker that starts a chord or an errback publishes signed messages too, and
clients must trust the workers that answer remote-control commands).

What is signed: task messages (the inner serializer is ``INFER_SERIALIZER``,
msgpack or json, wrapped by ``auth``) and remote-control commands and their
replies (Celery's mailbox uses ``task_serializer`` and ``accept_content``).
What is **not** signed: results in the result backend (``result_serializer``
stays msgpack/json; protect Redis with a password and TLS) and monitoring
events (json, telemetry for Flower).  A worker refuses an unsigned message
(``ContentDisallowed``; ``application/text``, which kombu would let through,
is refused here) and one whose signature does not verify (an unknown signer, a
forged or altered body: ``DecodeError``): neither is run, both are rejected
to ``<queue>.dead`` (out of a direct queue, through its class queue) like any
other undecodable message.  pickle is never accepted.

Celery's ``setup_security`` is process-wide (it registers ``auth`` in kombu's
global serializer registry, makes it kombu's default and disables untrusted
serializers for consumers that do not name what they accept), so one process
signs with one key.  Nothing here runs at import: :class:`tasks.app.InferenceApp`
calls :func:`celery_config` and :func:`enable` when its configuration is
first read.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "CERT_FILE",
    "DIGEST",
    "KEY_FILE",
    "TRUSTED_DIR",
    "celery_config",
    "check",
    "enable",
    "init",
    "missing_files",
]

log = logging.getLogger(__name__)

KEY_FILE = "signer.key"
CERT_FILE = "signer.pem"
TRUSTED_DIR = "trusted"
DIGEST = "sha256"
# kombu's own default (json) plus auth's content type (auth itself is
# registered after this list is applied): msgpack, yaml and pickle stay
# disabled for consumers that do not say what they accept.  Task and control
# consumers accept only auth; the result backend names msgpack and json itself.
ALLOWED_SERIALIZERS = ["json", "application/data"]


def missing_files(directory: Path) -> list[str]:
    """What ``directory`` lacks to sign and verify messages (empty when complete)."""
    missing = [name for name in (KEY_FILE, CERT_FILE) if not (directory / name).is_file()]
    trusted = directory / TRUSTED_DIR
    if not trusted.is_dir():
        missing.append(f"{TRUSTED_DIR}/")
    elif not any(p.is_file() for p in trusted.iterdir()):
        missing.append(f"a certificate in {TRUSTED_DIR}/")
    return missing


def celery_config(directory: Path) -> dict[str, Any]:
    """The configuration keys that switch signing on; checks the folder's key and certificates."""
    check(directory)
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],  # also the mailbox's: control commands are signed
        "security_key": str(directory / KEY_FILE),
        "security_certificate": str(directory / CERT_FILE),
        "security_cert_store": str(directory / TRUSTED_DIR),
        "security_digest": DIGEST,
    }


def enable(app: Celery, serializer: str) -> None:
    """Register the ``auth`` serializer for ``app`` (after its configuration is read).

    ``serializer`` (msgpack or json) encodes the body inside the signature.

    ``setup_security`` refuses to run unless the configuration already says
    ``task_serializer="auth"`` and ``accept_content=["auth"]``, so this runs in
    the app's ``on_after_configure`` signal, whose errors Celery logs and
    swallows: :func:`check` has already loaded every file when the
    configuration was built, where an error does stop the process.
    """
    from tasks.wire.codec import refuse_text_content

    app.setup_security(
        allowed_serializers=ALLOWED_SERIALIZERS,
        digest=DIGEST,
        serializer=serializer,
    )
    # kombu trusts application/text whatever ``accept`` says and passes its
    # body on undecoded: an unsigned message the worker would take as a task.
    refuse_text_content()
    log.debug("message signing on for %s (%s inside)", app.main, serializer)


def check(directory: Path) -> None:
    """Load the key, the certificate and the trust store as Celery will; ConfigurationError if unusable."""
    from celery.exceptions import SecurityError
    from celery.security.certificate import FSCertStore
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    redo = f"recreate them with `python -m tasks.wire.signing init --force {directory}`"
    try:
        key = serialization.load_pem_private_key((directory / KEY_FILE).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
    except (ValueError, TypeError) as e:
        raise ConfigurationError(
            f"INFER_SIGNING_DIR={directory}: {KEY_FILE} or {CERT_FILE} is not an unencrypted "
            f"PEM key / certificate ({e}); {redo}"
        ) from e
    public = cert.public_key()
    if not isinstance(key, rsa.RSAPrivateKey) or not isinstance(public, rsa.RSAPublicKey):
        raise ConfigurationError(
            f"INFER_SIGNING_DIR={directory}: Celery signs with RSA keys only; {redo}"
        )
    if key.public_key().public_numbers() != public.public_numbers():
        raise ConfigurationError(
            f"INFER_SIGNING_DIR={directory}: {CERT_FILE} is not the certificate of {KEY_FILE}; {redo}"
        )
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise ConfigurationError(
            f"INFER_SIGNING_DIR={directory}: {CERT_FILE} expired on {cert.not_valid_after_utc:%Y-%m-%d}; {redo}"
        )
    try:
        store = FSCertStore(str(directory / TRUSTED_DIR))
    except SecurityError as e:
        raise ConfigurationError(
            f"INFER_SIGNING_DIR={directory}: {TRUSTED_DIR}/ must hold only valid, unexpired PEM "
            f"RSA certificates, each once ({e})"
        ) from e
    own_id = f"{' '.join(str(a.value) for a in cert.issuer)} {cert.serial_number}"
    if own_id not in {c.get_id() for c in store.itercerts()}:
        log.warning(
            "INFER_SIGNING_DIR=%s: %s is not in %s/, so this host refuses its own messages "
            "(chords, errbacks, control replies): copy it there",
            directory,
            CERT_FILE,
            TRUSTED_DIR,
        )


def init(directory: Path, cn: str, days: int = 3650, bits: int = 3072, force: bool = False) -> Path:
    """Create ``signer.key``, a self-signed ``signer.pem`` and ``trusted/<cn>.pem``; return the cert path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if not force and (key_path.exists() or cert_path.exists()):
        raise ConfigurationError(
            f"{directory} already holds a signing key: pass --force to replace it (every host "
            "that trusts the old certificate must then get the new one)"
        )
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())  # the issuer + serial pair is the signer id
        .not_valid_before(now - timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    trusted = directory / TRUSTED_DIR
    trusted.mkdir(parents=True, exist_ok=True)
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(pem)
    (trusted / f"{cn}.pem").write_bytes(pem)
    return cert_path


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.wire.signing init DIR [--cn NAME]``: create a signing key and certificate."""
    parser = argparse.ArgumentParser(prog="python -m tasks.wire.signing", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("init", help="create DIR/signer.key, signer.pem and trusted/")
    make.add_argument("directory", type=Path, help="the folder INFER_SIGNING_DIR will name")
    make.add_argument("--cn", default=socket.gethostname(), help="certificate name (this host)")
    make.add_argument("--days", type=int, default=3650, help="certificate lifetime in days")
    make.add_argument("--bits", type=int, default=3072, choices=(2048, 3072, 4096))
    make.add_argument("--force", action="store_true", help="replace an existing key")
    args = parser.parse_args(argv)
    directory = args.directory.resolve()
    try:
        cert = init(directory, args.cn, days=args.days, bits=args.bits, force=args.force)
    except ConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {directory / KEY_FILE} (keep it secret), {cert} and {directory / TRUSTED_DIR}/")
    print(f"use it with: INFER_SIGNING_DIR={directory}")
    print(f"other hosts accept this host's messages once {cert} is in their {TRUSTED_DIR}/ folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
