"""Key material for a deployed federation: the certificates chain, the keys load the way Flower loads them."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, ServerVerifier, Store, Subject, VerificationError

from fedlora.pki import (
    create_ca,
    create_node_key,
    issue_server_certificate,
    load_node_public_key,
    public_key_fingerprint,
)

HOSTS = ["127.0.0.1", "localhost"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    create_ca(directory)
    issue_server_certificate(directory, HOSTS)
    return directory


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other_pki")
    create_ca(directory, name="someone else's CA")
    issue_server_certificate(directory, HOSTS)
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verifier(ca_dir: Path, subject: Subject) -> ServerVerifier:
    store = Store([_cert(ca_dir / "ca.crt")])
    return PolicyBuilder().store(store).build_server_verifier(subject)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- certificates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    ids=["dns", "ip"],
)
def test_server_certificate_chains_to_the_ca(pki: Path, subject: Subject) -> None:
    chain = _verifier(pki, subject).verify(_cert(pki / "server.crt"), [])
    assert chain[-1] == _cert(pki / "ca.crt")


def test_certificate_from_another_ca_is_rejected(pki: Path, other_pki: Path) -> None:
    with pytest.raises(VerificationError):
        _verifier(pki, x509.DNSName("localhost")).verify(_cert(other_pki / "server.crt"), [])


@pytest.mark.parametrize(
    "subject",
    [x509.DNSName("example.org"), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))],
    ids=["dns", "ip"],
)
def test_host_not_in_the_certificate_is_rejected(pki: Path, subject: Subject) -> None:
    with pytest.raises(VerificationError):
        _verifier(pki, subject).verify(_cert(pki / "server.crt"), [])


def test_certificate_extensions(pki: Path) -> None:
    ca, server = _cert(pki / "ca.crt"), _cert(pki / "server.crt")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"

    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert server.issuer == ca.subject


def test_private_keys_are_owner_only_and_no_temporary_files_remain(pki: Path, tmp_path: Path) -> None:
    assert _mode(pki / "ca.key") == 0o600
    assert _mode(pki / "server.key") == 0o600
    key, pub = create_node_key(tmp_path)
    assert _mode(key) == 0o600
    assert _mode(pub) & 0o077 != 0o077  # readable public key, whatever the umask
    assert sorted(p.name for p in pki.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.pub"]


def test_create_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    create_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes(), (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(FileExistsError, match="ca.key"):
        create_ca(tmp_path)
    assert ((tmp_path / "ca.key").read_bytes(), (tmp_path / "ca.crt").read_bytes()) == before


def test_issue_without_ca_or_hosts(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ca.key")):
        issue_server_certificate(tmp_path, HOSTS)
    with pytest.raises(ValueError, match="empty"):
        issue_server_certificate(pki, [])


# --- node keys ------------------------------------------------------------------------------


def test_node_key_loads_as_flower_loads_it(tmp_path: Path) -> None:
    key_path, pub_path = create_node_key(tmp_path, stem="hospital-a")
    assert (key_path.name, pub_path.name) == ("hospital-a.key", "hospital-a.pub")
    assert key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    public = serialization.load_ssh_public_key(pub_path.read_bytes())
    assert public == private.public_key()
    assert load_node_public_key(pub_path) == private.public_key()


def test_create_node_key_refuses_to_overwrite(tmp_path: Path) -> None:
    key_path, _ = create_node_key(tmp_path)
    before = key_path.read_bytes()
    with pytest.raises(FileExistsError, match="node.key"):
        create_node_key(tmp_path)
    assert key_path.read_bytes() == before


def test_load_node_public_key_rejects_non_nist_and_garbage(tmp_path: Path) -> None:
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match="not an EC key"):
        load_node_public_key(ed)
    garbage = tmp_path / "garbage.pub"
    garbage.write_bytes(b"ecdsa-sha2-nistp384 not-base64!!\n")
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        load_node_public_key(garbage)
    with pytest.raises(FileNotFoundError):
        load_node_public_key(tmp_path / "missing.pub")


def test_p256_key_is_accepted(tmp_path: Path) -> None:
    pub = tmp_path / "p256.pub"
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pub.write_bytes(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    assert load_node_public_key(pub) == key


def test_fingerprint_is_stable_and_distinguishes_keys(tmp_path: Path) -> None:
    _, pub_a = create_node_key(tmp_path, "a")
    _, pub_b = create_node_key(tmp_path, "b")
    fingerprint = public_key_fingerprint(pub_a)
    assert fingerprint == public_key_fingerprint(pub_a)
    assert fingerprint != public_key_fingerprint(pub_b)
    blob = base64.b64decode(pub_a.read_bytes().split()[1])
    assert fingerprint == "sha256:" + hashlib.sha256(blob).hexdigest()
    commented = tmp_path / "commented.pub"
    commented.write_bytes(pub_a.read_bytes().strip() + b" alice@hospital-a\n")
    assert public_key_fingerprint(commented) == fingerprint


# --- a real TLS handshake -------------------------------------------------------------------


def _handshake(server_dir: Path, client_ca: Path, server_hostname: str) -> str:
    """Serve one TLS connection with server_dir's certificate; connect trusting only client_ca."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_dir / "server.crt", server_dir / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    server_errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as err:  # the client aborting the handshake lands here
            server_errors.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(client_ca))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                return tls.recv(2).decode()
    finally:
        thread.join(timeout=5)
        listener.close()
        assert not thread.is_alive()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_with_the_ca(pki: Path, server_hostname: str) -> None:
    assert _handshake(pki, pki / "ca.crt", server_hostname) == "ok"


def test_tls_handshake_trusting_another_ca_fails(pki: Path, other_pki: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, other_pki / "ca.crt", "localhost")


def test_tls_handshake_for_a_host_not_in_the_certificate_fails(pki: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, pki / "ca.crt", "example.org")
