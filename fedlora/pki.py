"""Key material for a deployed federation: a private CA, the SuperLink's TLS certificate, node keys.

Trust model. The coordinator operator owns a private certificate authority (`create_ca`); its key
never leaves the operator's machine. The SuperLink serves TLS with a server certificate issued by
that CA for the exact host names / IP addresses participants dial (`issue_server_certificate`;
pass `server.crt`/`server.key`/`ca.crt` to `flower-superlink --ssl-certfile/--ssl-keyfile/
--ssl-ca-certfile`). Participants trust only that CA, not the system store (`ca.crt` is given to
`flower-supernode --root-certificates`), so a certificate from any public CA for the same name is
still rejected.

TLS authenticates the server only. Each participant authenticates itself with its own EC P-384
key pair in OpenSSH format (`create_node_key`), because Flower 1.41's SuperNode authentication
demands exactly that: `flower-supernode --auth-supernode-private-key` loads the key with
`load_ssh_private_key` and requires an `EllipticCurvePrivateKey`, and `flwr supernode register`
loads the public key with `load_ssh_public_key` and requires a NIST curve. Participants send only
`<stem>.pub` to the operator; `public_key_fingerprint` names a registered participant in logs.

All keys are EC P-384 with SHA-384 signatures. Files are written atomically (temporary file in the
same directory, then rename) so a crash never leaves a half-written key or certificate, and
private keys are created with mode 0o600 from the first byte rather than chmod-ed afterwards.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.atomic import write_bytes_atomic

CURVE = ec.SECP384R1
HASH = hashes.SHA384
# Curves OpenSSH can carry for ECDSA; all are NIST curves, so Flower's registration accepts them.
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.crt"
# Backdate notBefore a little so a participant whose clock runs slightly behind still accepts.
CLOCK_SKEW = dt.timedelta(minutes=5)

PRIVATE_MODE, PUBLIC_MODE = 0o600, 0o644


def create_ca(directory: Path, name: str = "fedlora coordinator CA", days: int = 3650) -> Path:
    """Create the operator's CA (`ca.key`, `ca.crt`) in `directory`; returns the certificate path.

    path_length=0: the CA signs only leaf certificates, so a leaked server key cannot mint more.
    Refuses to overwrite an existing `ca.key`: replacing it would silently orphan every
    certificate issued so far and every participant's `--root-certificates`.
    """
    _check_days(days)
    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if key_path.exists():
        raise FileExistsError(f"{key_path} already exists; refusing to overwrite the CA key (remove it first to start a new CA)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    not_before = _now() - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + CLOCK_SKEW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, HASH())
    )
    write_bytes_atomic(key_path, _private_pem(key), PRIVATE_MODE, exclusive=True)
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return cert_path


def issue_server_certificate(directory: Path, hosts: list[str], days: int = 825) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS key and certificate from the CA in `directory`; returns (key, cert).

    `hosts` must list every name or IP participants dial: clients check the address against the
    SubjectAlternativeName entries, never the common name. Re-issuing (e.g. for a new address)
    replaces `server.key`/`server.crt`; the CA and participants' trust stay as they are.
    """
    _check_days(days)
    names = _san_entries(hosts)
    directory = Path(directory)
    ca_key, ca_cert = _load_ca(directory)

    key = ec.generate_private_key(CURVE())
    not_before = _now() - CLOCK_SKEW
    # A certificate outliving its issuer would only fail later and more confusingly.
    not_after = min(not_before + CLOCK_SKEW + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        # Clients match SANs only; a fixed CN avoids its 64-character limit on long host names.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora SuperLink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca_cert, ca_key.public_key()), critical=False)
        .sign(ca_key, HASH())
    )
    key_path, cert_path = directory / SERVER_KEY, directory / SERVER_CERT
    write_bytes_atomic(key_path, _private_pem(key), PRIVATE_MODE)
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return key_path, cert_path


def create_node_key(directory: Path, stem: str = "node") -> tuple[Path, Path]:
    """Create a participant's EC P-384 key pair in OpenSSH format; returns (private, public) paths.

    `<stem>.key` is what `flower-supernode --auth-supernode-private-key` reads and stays with the
    participant; `<stem>.pub` is what the operator registers (`flwr supernode register`).
    Refuses to overwrite an existing private key: the registered public key would stop matching.
    """
    directory = Path(directory)
    key_path, pub_path = directory / f"{stem}.key", directory / f"{stem}.pub"
    if key_path.exists():
        raise FileExistsError(f"{key_path} already exists; refusing to overwrite a node key (its public key may be registered)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_bytes_atomic(key_path, private, PRIVATE_MODE, exclusive=True)
    write_bytes_atomic(pub_path, public + b"\n", PUBLIC_MODE)
    return key_path, pub_path


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a participant's OpenSSH public key, accepting only what Flower's registration accepts.

    Checking here gives the operator a clear error before `flwr supernode register` would fail.
    """
    path = Path(path)
    data = path.read_bytes()  # FileNotFoundError names the path
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path}: {type(key).__name__} is not an EC key; Flower node authentication needs EC on a NIST curve")
    if not isinstance(key.curve, NIST_CURVES):
        raise ValueError(f"{path}: EC curve {key.curve.name} is not a NIST curve (P-256, P-384 or P-521)")
    return key


def public_key_fingerprint(path: Path) -> str:
    """Stable identifier of a participant's public key: "sha256:" + hex SHA-256 of its OpenSSH key blob.

    The blob (the base64 field of the `.pub` line) ignores comments and whitespace; it is the same
    digest `ssh-keygen -l -E sha256` shows, in hex rather than base64.
    """
    return key_fingerprint(load_node_public_key(path))


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """`public_key_fingerprint` of a loaded key (the format of the participant book and of rosters)."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def certificate_hosts(path: Path) -> list[str]:
    """The names and IP addresses a certificate covers (its SubjectAlternativeName entries)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    for path in (key_path, cert_path):
        if not path.is_file():
            raise FileNotFoundError(f"CA file {path} not found; create the CA first (create_ca)")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: CA key is {type(key).__name__}, expected an EC private key")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} does not belong to {cert_path}; certificates it signs would not chain")
    return key, cert


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """IP literals become IPAddress entries (TLS clients never match an IP against a DNSName)."""
    if isinstance(hosts, str):  # a bare string would be split into characters
        raise TypeError("hosts must be a list of host names or IP addresses, not a string")
    entries: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise ValueError("empty host name in hosts")
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            entry = x509.DNSName(host.lower())
        if entry not in entries:
            entries.append(entry)
    if not entries:
        raise ValueError("hosts is empty: the certificate needs at least one host name or IP address participants dial")
    return entries


def _authority_key_identifier(
    ca_cert: x509.Certificate, ca_public: ec.EllipticCurvePublicKey
) -> x509.AuthorityKeyIdentifier:
    """Reuse the CA's own SKI when present, so the two identifiers match byte for byte."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM: gRPC (the SuperLink) cannot prompt for a passphrase."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
