"""A throwaway certificate authority, made once per test session, for the TLS servers.

The server certificate names only the IP address ``127.0.0.1``: clients that
dial ``127.0.0.1`` verify it, clients that dial ``localhost`` meet a hostname
mismatch, on the same server. A second, unrelated CA stands for "a certificate
signed by another CA".
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

__all__ = ["Certificates", "make_certificates"]


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA clients trust, another CA, and the servers' certificate and key."""

    ca_file: Path
    other_ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(directory: Path) -> Certificates:
    """A fresh CA and a server certificate for 127.0.0.1, written into ``directory``."""
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    files = Certificates(
        ca_file=directory / "ca.pem",
        other_ca_file=directory / "other-ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    ca.cert_pem.write_to_path(str(files.ca_file))
    other.cert_pem.write_to_path(str(files.other_ca_file))
    files.cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(files.key_file))
    return files


@pytest.fixture(scope="session")
def tls_certs() -> Iterator[Certificates]:
    """The session's CA and server certificate (files readable by every server)."""
    directory = Path(tempfile.mkdtemp(prefix="fw-tls-"))
    directory.chmod(0o755)
    try:
        yield make_certificates(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
