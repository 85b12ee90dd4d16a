"""Test certificates: a CA, the certificates it signs, or a self-signed one (PEM, EC P-256),
valid from a few minutes ago for a day."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Issued:
    certificate: str  # PEM
    key: str  # PEM, PKCS#8, unencrypted
    subject: Any  # the x509.Name, to sign others with
    private_key: Any  # the key object, to sign others with


def issue(common_name: str, signer: Issued | None = None, ca: bool = False, dns_names: tuple[str, ...] = ()) -> Issued:
    """A certificate for `common_name`, signed by `signer` (self-signed without one)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]), critical=False
        )
    certificate = builder.sign(signer.private_key if signer else key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    return Issued(
        certificate=certificate.public_bytes(pem).decode(),
        key=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
        subject=subject,
        private_key=key,
    )
