"""TLS for broker connections: one way to trust a CA, one way to report a refused certificate.

Every broker backend takes the option ``tls_ca_file`` (a PEM bundle of the CA
certificates to trust). :func:`ca_file` checks it when the layer is built,
:func:`client_context` turns it into the :class:`ssl.SSLContext` a driver
gets (certificate required, hostname checked), :func:`require_secure` refuses a
CA file next to a plaintext URL (so a typo in the scheme can never mean a
silent plaintext connection), and :func:`tls_failure` / :func:`describe_tls`
let :meth:`BrokerChannelLayer.unavailable
<fastapi_websockets.backends.broker.BrokerChannelLayer.unavailable>` name the
TLS failure behind a driver's connection error instead of leaking an
:class:`ssl.SSLError`.
"""

from __future__ import annotations

import os
import ssl

from fastapi_websockets.backends.urls import redact_url
from fastapi_websockets.exceptions import InvalidChannelLayerConfig

__all__ = ["ca_file", "client_context", "describe_tls", "require_secure", "tls_failure"]

# How deep to follow __cause__/__context__: drivers wrap an SSLError once or twice.
_CHAIN_DEPTH = 8


def ca_file(name: str, value: object) -> str | None:
    """A readable PEM file of CA certificates, or None (the system's trust store)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidChannelLayerConfig(f"{name} must be the path of a PEM file, got {value!r}")
    if not os.path.isfile(value):
        raise InvalidChannelLayerConfig(f"{name} must be the path of a PEM file; no file at {value!r}")
    try:
        client_context(value)
    except (OSError, ssl.SSLError) as exc:
        # ssl.SSLError is an OSError; both mean "not a CA bundle we can load".
        raise InvalidChannelLayerConfig(
            f"{name} {value!r} holds no usable CA certificate (PEM): {exc}"
        ) from None
    return value


def client_context(ca_file: str | None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that requires a certificate from the server and verifies it.

    The certificate must chain to ``ca_file`` (or, without it, to the system's
    trust store); the host name (or IP address) the client dialled must match
    it unless ``check_hostname`` is False (PostgreSQL's ``sslmode=verify-ca``).
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.check_hostname = check_hostname
    return context


def require_secure(option: str, url: str, secure: bool, needed: str) -> None:
    """Refuse ``tls_ca_file`` with a plaintext ``url``: ``needed`` says what would be secure."""
    if not secure:
        raise InvalidChannelLayerConfig(
            f"tls_ca_file needs {needed}, so that the connection is encrypted and verified; "
            f"{option} is {redact_url(url)!r}"
        )


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` behind ``exc`` (itself, or what it was raised from), if any."""
    seen: BaseException | None = exc
    for _ in range(_CHAIN_DEPTH):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def describe_tls(error: ssl.SSLError) -> str:
    """A short description of a failed TLS handshake, for :class:`BackendUnavailable`."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {error.verify_message}"
    return f"TLS handshake failed: {error.reason or error}"
