"""Name every argument of a call to a denoiser's forward, for :class:`graphs.GraphRunner`.

UNets and DiTs receive their tensors positionally or by keyword, depending on the caller.
A graph key must not depend on that, so each call is bound to the forward's signature and
handed on by name. A call that cannot be named safely (it does not bind, it passes extra
positional arguments, or it binds ``self``) is reported as ``None``: the caller then runs
it eagerly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class ForwardArgs:
    """The signature of one forward function. Raises ``TypeError`` / ``ValueError`` (from
    :func:`inspect.signature`) when the function has none that can be inspected."""

    def __init__(self, fn: Callable) -> None:
        self.signature = inspect.signature(fn)
        self.var_keyword = next((p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def name(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """``{parameter: value}`` for this call (``**kwargs`` flattened in), or None."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return None
        named = dict(bound.arguments)
        named.update(named.pop(self.var_keyword, None) or {})
        if named.pop("self", None) is not None or any(
            p.kind is p.VAR_POSITIONAL and named.get(p.name) for p in self.signature.parameters.values()
        ):
            return None
        return named
