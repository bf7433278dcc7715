"""Adapter: pydicom's decoding exceptions -> reject reasons (the one place that reads their text).

pydicom 3 raises ``NotImplementedError`` when no decoder exists for a transfer syntax, and
``RuntimeError`` both when every plugin that could decode it is missing ("... missing
dependencies") and when one was tried and failed; a short or odd-length Pixel Data raises
``ValueError``. The type alone cannot tell a missing decoder from a failed one, so this module
reads pydicom's wording, and ``tests/test_layers.py`` pins that wording against the installed
pydicom. The text itself never leaves this module: only a reason code and a PHI-free detail (the
transfer syntax's name or an exception type name).
"""

from __future__ import annotations

from . import errors as E

# pydicom's wording (pydicom/pixels/decoders/base.py), pinned by tests/test_layers.py.
MISSING_DEPENDENCIES = "missing dependencies"
NOT_SUPPORTED = "does not support"
SHORT_DATA = ("length", "less than expected")


def _runtime_reason(msg: str) -> str:
    if MISSING_DEPENDENCIES in msg:
        return E.NO_DECODER
    lines = [ln for ln in msg.splitlines()[1:] if ln.strip()]
    if lines and all(NOT_SUPPORTED in ln or "missing" in ln for ln in lines):
        return E.NO_DECODER
    return E.DECODE_FAILED


def decode_failure(exc: BaseException, syntax_name: str) -> E.RejectedFile:
    """The reject for an exception raised while decoding pixel data.

    Parameters
    ----------
    exc : BaseException
        What pydicom (or a decoder plugin under it) raised.
    syntax_name : str
        The transfer syntax's registered name (never a value from the file).
    """
    if isinstance(exc, NotImplementedError):
        return E.RejectedFile(E.NO_DECODER, syntax_name)
    if isinstance(exc, RuntimeError):
        return E.RejectedFile(_runtime_reason(str(exc)), syntax_name)
    if isinstance(exc, ValueError):
        text = str(exc)
        return E.RejectedFile(E.TRUNCATED if any(s in text for s in SHORT_DATA) else E.DECODE_FAILED, "ValueError")
    return E.RejectedFile(E.DECODE_FAILED, type(exc).__name__)
