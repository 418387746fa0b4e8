"""Checks that a secret (a password given in a broker URL) never leaves the process."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable

__all__ = ["SECRET", "assert_no_secret"]

#: A password no message would contain by chance.
SECRET = "Pw-7f3c9e1d5b"


def _exception_texts(exc: BaseException) -> Iterable[str]:
    seen: set[int] = set()
    current: BaseException | None = exc
    # The whole chain, including contexts a "raise ... from None" only hides.
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield from (repr(arg) for arg in current.args)
        yield from (str(note) for note in getattr(current, "__notes__", ()))
        current = current.__cause__ or current.__context__
    yield "".join(traceback.format_exception(exc))


def _record_texts(record: logging.LogRecord) -> Iterable[str]:
    try:
        yield record.getMessage()
    except Exception:
        # An argument whose repr() broke after the record was made (aio-pika's
        # OneShotCallback, once called); the text logged then is in caplog.text.
        yield str(record.msg)
        yield from (type(arg).__name__ for arg in record.args or ())
    if record.exc_info and record.exc_info[1] is not None:
        yield from _exception_texts(record.exc_info[1])
    if record.stack_info:
        yield record.stack_info


def assert_no_secret(
    secret: str = SECRET,
    *,
    errors: Iterable[BaseException] = (),
    records: Iterable[logging.LogRecord] = (),
    objects: Iterable[object] = (),
) -> None:
    """Fail if ``secret`` appears in an exception (its chain, its traceback), a log record or a repr()."""
    for exc in errors:
        for text in _exception_texts(exc):
            assert secret not in text, f"secret leaked in exception {type(exc).__name__}: {text[:500]}"
    for record in records:
        for text in _record_texts(record):
            assert secret not in text, f"secret leaked in log record {record.name}: {text[:500]}"
    for obj in objects:
        text = repr(obj)
        assert secret not in text, f"secret leaked in repr of {type(obj).__name__}: {text[:500]}"
