"""TOML reading on Python 3.10 (``toml``) and 3.11+ (``tomllib``)."""

from __future__ import annotations

try:
    import tomllib as _toml

    TOMLError: type[Exception] = _toml.TOMLDecodeError
except ImportError:  # Python 3.10: the pack depends on ``toml``
    import toml as _toml  # type: ignore[no-redef]

    TOMLError = _toml.TomlDecodeError


def loads(text: str) -> dict:
    """Parse TOML text into a dict."""
    return _toml.loads(text)
