"""Message signing (tasks.wire.signing): settings checks, ``init``, and the app's wiring (no servers).

Enabling signing changes kombu's process-wide serializer registry, so the
tests that enable it run in fresh interpreters; this process stays unsigned.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from cryptography import x509
from cryptography.x509.oid import NameOID
from kombu.serialization import registry

from models.errors import ConfigurationError
from tasks.app import InferenceApp
from tasks.settings import Settings
from tasks.wire.signing import CERT_FILE, KEY_FILE, TRUSTED_DIR, check, init, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete signing folder (2048-bit: quick to generate), shared read-only."""
    directory = tmp_path_factory.mktemp("keys") / "signing"
    init(directory, "unit-host", bits=2048)
    return directory


def _copy(keys: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(keys, tmp_path / "signing"))


def test_unset_means_no_signing_at_all(tmp_path: Path) -> None:
    settings = Settings.from_env({"INFER_HOME": str(tmp_path)})
    assert settings.signing_dir is None
    conf = InferenceApp(settings).conf
    assert conf.task_serializer == "msgpack"
    assert conf.accept_content == ["msgpack", "json"]
    assert "auth" not in registry._encoders  # setup_security never ran in this process


@pytest.mark.parametrize("remove", [KEY_FILE, CERT_FILE, TRUSTED_DIR, "trusted/unit-host.pem"])
def test_settings_refuse_an_incomplete_folder(keys: Path, tmp_path: Path, remove: str) -> None:
    directory = _copy(keys, tmp_path)
    target = directory / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ConfigurationError) as e:
        Settings.from_env({"INFER_HOME": str(tmp_path), "INFER_SIGNING_DIR": str(directory)})
    message = str(e.value)
    assert f"INFER_SIGNING_DIR={directory} lacks" in message
    assert f"python -m tasks.wire.signing init {directory}" in message  # says how to create them


def test_settings_refuse_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=f"lacks {KEY_FILE}, {CERT_FILE}, trusted/"):
        Settings.from_env({"INFER_SIGNING_DIR": str(tmp_path / "nowhere")})


def test_settings_accept_a_complete_folder(keys: Path, tmp_path: Path) -> None:
    settings = Settings.from_env({"INFER_HOME": str(tmp_path), "INFER_SIGNING_DIR": str(keys)})
    assert settings.signing_dir == keys


def test_init_creates_a_loadable_key_and_trusted_certificate(tmp_path: Path) -> None:
    directory = tmp_path / "signing"
    cert_path = init(directory, "host-a")  # the default size, 3072 bits
    key_path, trusted = directory / KEY_FILE, directory / TRUSTED_DIR
    assert cert_path == directory / CERT_FILE
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert (trusted / "host-a.pem").read_bytes() == cert_path.read_bytes()

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host-a"
    assert cert.issuer == cert.subject  # self-signed
    assert cert.public_key().key_size == 3072  # type: ignore[union-attr]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650

    # Celery's own classes load them, and a message signed with the key verifies.
    signer = SecureSerializer(
        PrivateKey(key_path.read_text()),
        Certificate(cert_path.read_text()),
        FSCertStore(str(trusted)),
        "sha256",
        serializer="msgpack",
    )
    body = [["mlp", {"data": b"\x00\x01\xff raw tensor bytes"}], {}, {}]
    assert signer.deserialize(signer.serialize(body)) == body
    check(directory)  # what the app checks before enabling signing


def test_init_keeps_an_existing_key_unless_forced(keys: Path, tmp_path: Path) -> None:
    directory = _copy(keys, tmp_path)
    before = (directory / CERT_FILE).read_bytes()
    with pytest.raises(ConfigurationError, match="--force"):
        init(directory, "unit-host", bits=2048)
    assert (directory / CERT_FILE).read_bytes() == before
    init(directory, "unit-host", bits=2048, force=True)
    after = (directory / CERT_FILE).read_bytes()
    assert after != before and (directory / TRUSTED_DIR / "unit-host.pem").read_bytes() == after


def test_check_refuses_a_certificate_of_another_key(keys: Path, tmp_path: Path) -> None:
    directory = _copy(keys, tmp_path)
    other = tmp_path / "other"
    init(other, "other-host", bits=2048)
    shutil.copy(other / CERT_FILE, directory / CERT_FILE)
    with pytest.raises(ConfigurationError, match="is not the certificate of"):
        check(directory)


def test_check_refuses_garbage_in_the_trust_store(keys: Path, tmp_path: Path) -> None:
    directory = _copy(keys, tmp_path)
    (directory / TRUSTED_DIR / "notes.txt").write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="must hold only valid"):
        check(directory)


def test_cli_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "cli"
    assert main(["init", str(directory), "--cn", "cli-host", "--bits", "2048"]) == 0
    assert f"INFER_SIGNING_DIR={directory}" in capsys.readouterr().out
    assert (directory / TRUSTED_DIR / "cli-host.pem").is_file()
    assert main(["init", str(directory)]) == 1  # refuses to replace the key
    assert "--force" in capsys.readouterr().err


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_signing_is_wired_lazily_and_refuses_unsigned_content(keys: Path, tmp_path: Path) -> None:
    """In a fresh interpreter: nothing at import; then auth only, pickle and text refused."""
    code = """
        import pickle
        from kombu.exceptions import ContentDisallowed, DecodeError
        from kombu.serialization import registry
        import tasks
        from tasks import app

        assert "auth" not in registry._encoders and app._infer_settings is None, "import side effect"
        conf = app.conf  # the first read configures signing
        assert conf.task_serializer == "auth" and conf.accept_content == ["auth"], conf.task_serializer
        assert conf.result_serializer == "msgpack", "results stay unsigned"
        assert conf.security_digest == "sha256"
        assert app.control.mailbox.serializer == "auth" and app.control.mailbox.accept == ["auth"]
        accept = {"application/data"}  # what ["auth"] stands for
        body = [["mlp", {"data": b"\\x00\\x01raw"}], {}, {}]
        content_type, encoding, signed = registry.dumps(body, "auth")
        assert content_type == "application/data"
        assert registry.loads(signed, content_type, encoding, accept=accept) == body
        refused = []
        for ser in ("msgpack", "json", "pickle"):
            ct, enc, data = registry.dumps(body, ser)
            try:
                registry.loads(data, ct, enc, accept=accept)
            except ContentDisallowed:
                refused.append(ser)
        try:
            registry.loads(b"[[], {}, {}]", "application/text", "utf-8", accept=accept)
        except DecodeError:
            refused.append("text")
        assert refused == ["msgpack", "json", "pickle", "text"], refused
        print("ok")
    """
    env = {**os.environ, "INFER_SIGNING_DIR": str(keys), "INFER_HOME": str(tmp_path)}
    out = _run(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_bad_folder_fails_at_first_use_not_at_import(tmp_path: Path) -> None:
    code = """
        import tasks
        from models.errors import ConfigurationError
        try:
            tasks.app.conf.task_serializer
        except ConfigurationError as e:
            print("refused:", e)
    """
    env = {**os.environ, "INFER_SIGNING_DIR": str(tmp_path / "missing")}
    out = _run(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused: INFER_SIGNING_DIR=")
    assert "python -m tasks.wire.signing init" in out.stdout
