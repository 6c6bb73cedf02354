"""One error hierarchy for the whole project.

Every error we raise on purpose is a :class:`PairXError`. Subclasses carry the fields a caller
needs to act on them (which file, which module type, which shape). Retry logic in the pipeline
never retries a ``PairXError``: they describe bad input or bad configuration, not a transient
failure.
"""

from __future__ import annotations

from typing import Any, Sequence


def _rebuild(cls: type, args: tuple, state: dict[str, Any]) -> "PairXError":
    """Unpickle a :class:`PairXError` without calling the subclass's ``__init__``."""
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class PairXError(Exception):
    """Base class of every error raised on purpose by pairx-pipeline.

    Every subclass survives pickling with its fields and message (``__reduce__`` below), so an
    error raised in a Dask worker reaches the client as itself. Python's default reduction would
    call ``__init__(*args)`` with the formatted message only, which fails for subclasses whose
    ``__init__`` takes several fields.
    """

    def __reduce__(self):
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class ConfigError(PairXError, ValueError):
    """An option or argument has a value that cannot work."""


class ShapeError(PairXError, ValueError):
    """A tensor's shape does not match what an entry point expects."""

    def __init__(self, name: str, actual: Sequence[int], expected: str):
        self.name = name
        self.actual = tuple(int(a) for a in actual)
        self.expected = expected
        super().__init__(f"{name}: expected shape {expected}, got {self.actual}")


class UnsupportedModelError(PairXError):
    """The model contains a module type that we cannot make LRP-ready."""

    def __init__(self, module_type: str, module_name: str, hint: str = ""):
        self.module_type = module_type
        self.module_name = module_name
        msg = (
            f"module {module_name or '<root>'!r} of type {module_type} is not supported by the "
            "built-in canonizers; pass canonizers=[...] (possibly an empty list) to explain() "
            "if you know the model is LRP-ready"
        )
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class NumericalError(PairXError, FloatingPointError):
    """LRP produced NaN or infinite values."""


class ModelLoadError(PairXError):
    """A model spec cannot be resolved or its weights do not fit the architecture."""

    def __init__(self, spec: str, reason: str, missing: Sequence[str] = (), unexpected: Sequence[str] = ()):
        self.spec = spec
        self.reason = reason
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        msg = f"cannot load model {spec!r}: {reason}"
        if self.missing:
            msg += f"; missing keys ({len(self.missing)}): {', '.join(self.missing[:8])}"
            msg += " ..." if len(self.missing) > 8 else ""
        if self.unexpected:
            msg += f"; unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected[:8])}"
            msg += " ..." if len(self.unexpected) > 8 else ""
        super().__init__(msg)


class ImageError(PairXError):
    """An image cannot be decoded or used (corrupt, empty, too large, bad crop box)."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")


class StorageError(PairXError):
    """A storage location cannot be read or written for a non-transient reason."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")
