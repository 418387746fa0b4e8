"""Broker URLs in messages: where a broker is, never with its password.

Every string a layer puts in an exception, a log record, a ``repr()`` or its
stats goes through :func:`redact_url` or :func:`location`, so a password given
in a URL or DSN never leaves the process by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["location", "redact_text", "redact_url", "user_of"]

_MASK = "***"
# Query parameters that carry a secret in the URL forms our drivers accept.
_SECRET_PARAMS = frozenset({"password", "pass", "passwd", "token", "auth_token", "secret", "sslpassword"})


def redact_url(url: str) -> str:
    """``url`` with its password (and secret query parameters) replaced by ``***``.

    Anything that does not parse as a URL is replaced whole, since it may be a
    secret the caller put in the wrong option.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return _scrub_userinfo(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        # Without a password, the user part may itself be a token (nats://TOKEN@host).
        netloc = f"{user}:{_MASK}@{hostport}" if colon else f"{_MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_PARAMS for key, _ in pairs):
            query = urlencode([(k, _MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _scrub_userinfo(text: str) -> str:
    # A URL urlsplit refuses (a bad port, say) may still carry "user:password@".
    return re.sub(r"(//[^/@:\s]*:)[^@\s]*@", rf"\g<1>{_MASK}@", text)


def location(url: str, default_port: int | None = None) -> str:
    """``host:port`` (or the socket path) of a broker URL, for messages; never credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return redact_url(url)
    if parts.hostname:
        port = port or default_port
        return f"{parts.hostname}:{port}" if port else parts.hostname
    return parts.path or redact_url(url)


def user_of(url: str, default: str) -> str:
    """The user name ``url`` logs in with (decoded), or the broker's ``default`` when it names none."""
    try:
        user = urlsplit(url).username
    except ValueError:
        user = None
    return unquote(user) if user else default


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty string of ``secrets`` replaced by ``***``.

    For driver messages that may quote the URL they were given.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, _MASK)
    return text
