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
    """The model contains a module that we cannot make LRP-ready.

    Attributes:
        module_type: the module's class (qualified name).
        module_name: where it sits in the model (``model.get_submodule`` name; ``""`` is the root).
        operation: the operation that combines two activations (``mul``, ``add``, ``matmul``...),
            or ``""`` when the module is refused for another reason (its forward cannot be read).
    """

    def __init__(self, module_type: str, module_name: str, hint: str = "", operation: str = ""):
        self.module_type = module_type
        self.module_name = module_name
        self.hint = hint
        self.operation = operation
        short_type = module_type.rsplit(".", 1)[-1]
        where = f"module {module_name or '<root>'!r} ({short_type})"
        if operation:
            msg = (
                f"{operation} of two activations in {where}: relevance through a product, sum or "
                "attention between activations needs its own LRP treatment, which the built-in "
                "canonizers do not know for this module"
            )
        else:
            msg = f"{where} is not supported by the built-in canonizers"
        msg += (
            "; pass canonizers=[...] to explain() that rewrite it (an empty list runs the model as "
            "it is), or declare the type with pairx_core.canonizers.register_safe_module to accept "
            "plain gradient treatment"
        )
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __reduce__(self):
        return (type(self), (self.module_type, self.module_name, self.hint, self.operation))


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


class LayerError(ConfigError):
    """A layer name does not name a usable cut of the model (missing, not a feature map, bypassed).

    Attributes:
        layer: the name as given.
        reason: why it cannot be used.
        suggestions: the nearest valid layer names (best first), possibly empty.
    """

    def __init__(self, layer: str, reason: str, suggestions: Sequence[str] = ()):
        self.layer = layer
        self.reason = reason
        self.suggestions = list(suggestions)
        msg = f"layer {layer!r}: {reason}"
        if self.suggestions:
            msg += f"; nearest valid layers: {', '.join(self.suggestions)}"
        super().__init__(msg)

    def __reduce__(self):
        return (type(self), (self.layer, self.reason, tuple(self.suggestions)))


class RandomWeightsError(ConfigError):
    """A model spec would run with random weights and that was not allowed explicitly.

    Attributes:
        spec: the model spec with credentials removed.
        hint: how to give weights.
    """

    def __init__(self, spec: str, hint: str):
        self.spec = spec
        self.hint = hint
        super().__init__(hint)

    def __reduce__(self):
        return (type(self), (self.spec, self.hint))
