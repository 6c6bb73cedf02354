"""Model zoo: one factory ``load_model(spec) -> (model, preprocessing)`` over a registry of families.

Specs (``kind:name?key=value&...``):

- ``miewid``: the MiewID architecture (timm ``efficientnetv2_rw_m`` + GeM + BatchNorm1d neck,
  440 px, ImageNet mean/std). Weights from ``weights=`` (a local path, bytes, a state dict, or a
  URL resolved by the caller's ``opener``; ``infra.model_store`` supplies one for fsspec and
  ``hf://`` URLs). ``miewid-arch`` is the same architecture with random weights (benchmarks).
- ``timm:<arch>``: any timm CNN backbone with the same GeM + BatchNorm1d neck; ``?size=128``
  sets the input size; without weights: random initialisation and a warning.
- ``torchvision:<arch>``: a torchvision classifier with its head removed (penultimate features).
- ``python:<module>:<factory>``: a user's own model; the factory returns ``model`` or
  ``(model, Preprocessing)``, with its weights loaded (``weights=`` loads a state dict on top).
  The factory may declare the model's default layer by setting ``model.pairx_default_layer``.
- ``demo``: the small model trained on synthetic individuals, shipped in ``pairx_core/weights``.

Weights are read with safetensors or ``torch.load(weights_only=True)``; never arbitrary pickle.
Nothing here downloads: pretrained ImageNet weights are never fetched.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Mapping, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from .canonizers import register_safe_module
from .errors import ConfigError, ModelLoadError, RandomWeightsError
from .layers import DEFAULT_LAYER_ATTRIBUTE
from .preprocess import Preprocessing
from .specs import BUNDLED_WEIGHTS_DIR, ModelSpec, demo_default_layer, public_spec  # noqa: F401 - re-exported

WeightsSource = Union[str, Path, bytes, Mapping[str, torch.Tensor], None]
Opener = Callable[[str], bytes]

MIEWID_ARCH = "efficientnetv2_rw_m"
MIEWID_SIZE = 440
#: keys of training heads found in MiewID checkpoints; not part of the embedding model
IGNORED_CHECKPOINT_PREFIXES = ("final.", "temperature", "fc.", "dropout.")
WEIGHTS_DIR = BUNDLED_WEIGHTS_DIR
#: keys of a checkpoint file that hold the state dict (the first present wins)
CHECKPOINT_CONTAINERS = ("state_dict", "model")

logger = logging.getLogger(__name__)


class RandomWeightsWarning(UserWarning):
    """A model was built without weights (random initialisation)."""


@register_safe_module
class GeM(nn.Module):
    """Generalised-mean pooling ``(B, C, h, w) -> (B, C, 1, 1)`` with a learnable exponent ``p``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.shape[-2], x.shape[-1]))
        return pooled.pow(1.0 / self.p)


@register_safe_module
class MiewIdNet(nn.Module):
    """MiewID-style embedding model: timm backbone -> GeM -> BatchNorm1d. ``(B,3,H,W) -> (B,D)``.

    State-dict layout matches the published checkpoints: ``backbone.*`` (timm names),
    ``pooling.p`` (GeM exponent), ``bn.*``.
    """

    def __init__(self, arch: str = MIEWID_ARCH):
        super().__init__()
        import timm

        self.arch = arch
        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
        self.pooling = GeM()
        self.bn = nn.BatchNorm1d(self.backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return self.bn(self.pooling(features).flatten(1))


@register_safe_module
class HeadlessClassifier(nn.Module):
    """A torchvision classifier whose output is its penultimate features ``(B, D)``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


_REGISTRY: dict[str, Callable[[ModelSpec, WeightsSource, Opener | None], tuple[nn.Module, Preprocessing]]] = {}
#: kind -> "never" / "without_weights" / "always": when the family builds random weights
_RANDOM_WEIGHTS: dict[str, str] = {}


_Built = TypeVar("_Built")


def seeded(build: Callable[[], _Built], seed: int = 0) -> _Built:
    """``build()`` with torch's CPU random generator seeded to ``seed`` during the call and
    restored afterwards: the same random initialisation every time, nothing else disturbed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def register_model(kind: str, *, random_weights: str = "never"):
    """Register a model family under ``kind`` (decorator, like timm's ``register_model``).

    Args:
        random_weights: when the family runs with random initialisation: ``"never"`` (it brings
            its own weights), ``"without_weights"`` (unless ``weights=`` is given) or ``"always"``.
            Read by :func:`would_use_random_weights` without building anything.
    """
    if random_weights not in ("never", "without_weights", "always"):
        raise ConfigError(f"random_weights must be 'never', 'without_weights' or 'always', got {random_weights!r}")

    def decorator(factory):
        _REGISTRY[kind] = factory
        _RANDOM_WEIGHTS[kind] = random_weights
        return factory

    return decorator


def list_model_kinds() -> list[str]:
    return sorted(_REGISTRY)


def load_model(
    spec: str,
    *,
    weights: WeightsSource = None,
    opener: Opener | None = None,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, Preprocessing]:
    """Build a model from ``spec`` and load its weights. Returns ``(model in eval mode, preprocessing)``.

    Args:
        spec: see the module docstring.
        weights: overrides the spec's ``weights=`` option: a local path, raw bytes, a state dict.
        opener: reads a URL into bytes (for ``s3://``, ``hf://``...); pure local paths need none.
        device: where to put the model.
    """
    parsed = ModelSpec.parse(spec)
    if parsed.kind not in _REGISTRY:
        raise ModelLoadError(spec, f"unknown model kind {parsed.kind!r}; known: {', '.join(list_model_kinds())}")
    source = weights if weights is not None else parsed.options.get("weights")
    model, preprocessing = _REGISTRY[parsed.kind](parsed, source, opener)
    model.eval()
    if device is not None:
        model.to(device)
    return model, preprocessing


def _size(parsed: ModelSpec, default: int) -> tuple[int, int]:
    try:
        size = int(parsed.options.get("size", default))
    except ValueError as error:
        raise ConfigError(f"size must be an integer, got {parsed.options.get('size')!r}") from error
    return size, size


@register_model("miewid", random_weights="without_weights")
def _miewid(parsed: ModelSpec, weights: WeightsSource, opener: Opener | None):
    model = MiewIdNet(parsed.options.get("arch", MIEWID_ARCH))
    if weights is None and parsed.name:
        weights = parsed.name
    _load_or_warn(model, weights, opener, f"miewid:{parsed.name}")
    return model, Preprocessing(_size(parsed, MIEWID_SIZE))


@register_model("miewid-arch", random_weights="always")
def _miewid_arch(parsed: ModelSpec, weights: WeightsSource, opener: Opener | None):
    model = seeded(lambda: MiewIdNet(MIEWID_ARCH), int(parsed.options.get("seed", 0)))
    return model, Preprocessing(_size(parsed, MIEWID_SIZE))


@register_model("timm", random_weights="without_weights")
def _timm(parsed: ModelSpec, weights: WeightsSource, opener: Opener | None):
    if not parsed.name:
        raise ModelLoadError("timm:", "give an architecture, e.g. timm:efficientnet_b0")
    try:
        model = seeded(lambda: MiewIdNet(parsed.name), int(parsed.options.get("seed", 0)))
    except RuntimeError as error:  # timm: unknown model
        raise ModelLoadError(f"timm:{parsed.name}", str(error)) from error
    _load_or_warn(model, weights, opener, f"timm:{parsed.name}")
    default = model.backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, Preprocessing(_size(parsed, default))


@register_model("torchvision", random_weights="without_weights")
def _torchvision(parsed: ModelSpec, weights: WeightsSource, opener: Opener | None):
    import torchvision

    try:
        network = torchvision.models.get_model(parsed.name, weights=None)
    except (ValueError, KeyError) as error:
        raise ModelLoadError(f"torchvision:{parsed.name}", str(error)) from error
    if hasattr(network, "fc"):
        network.fc = nn.Identity()
    elif hasattr(network, "classifier"):
        network.classifier = nn.Identity()
    model = HeadlessClassifier(network)
    _load_or_warn(model, weights, opener, f"torchvision:{parsed.name}")
    return model, Preprocessing(_size(parsed, 224))


@register_model("python")
def _python(parsed: ModelSpec, weights: WeightsSource, opener: Opener | None):
    module_name, _, factory_name = parsed.name.partition(":")
    if not module_name or not factory_name:
        raise ModelLoadError(f"python:{parsed.name}", "expected python:<module>:<factory>")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(f"python:{parsed.name}", str(error)) from error
    built = factory()
    model, preprocessing = built if isinstance(built, tuple) else (built, Preprocessing(_size(parsed, 224)))
    if weights is not None:
        load_state(model, read_state_dict(weights, opener), f"python:{parsed.name}")
    return model, preprocessing


@register_model("demo")
def _demo(parsed: ModelSpec, weights: WeightsSource, opener: Opener | None):
    config_path = WEIGHTS_DIR / "demo.json"
    weights_path = WEIGHTS_DIR / "demo.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise ModelLoadError("demo", f"demo weights are missing from {WEIGHTS_DIR}")
    import json

    config = json.loads(config_path.read_text())
    model = MiewIdNet(config["arch"])
    load_state(model, read_state_dict(weights if weights is not None else weights_path, opener), "demo")
    setattr(model, DEFAULT_LAYER_ATTRIBUTE, str(config.get("layer", "backbone.blocks.2")))
    return model, Preprocessing(tuple(config["size"]), tuple(config["mean"]), tuple(config["std"]))


# ------------------------------------------------------------------------------------- weights
def _load_or_warn(model: nn.Module, weights: WeightsSource, opener: Opener | None, spec: str) -> None:
    if weights is None:
        warnings.warn(f"{spec}: no weights given, using random initialisation", RandomWeightsWarning, stacklevel=3)
        return
    load_state(model, read_state_dict(weights, opener), spec)


def read_state_dict(source: WeightsSource, opener: Opener | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a path, URL (through ``opener``), raw bytes, or a mapping.

    ``.safetensors`` (or bytes starting with a safetensors header) are read with safetensors;
    anything else with ``torch.load(weights_only=True)``.
    """
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, Path)):
        text = str(source)
        if "://" in text and not text.startswith("file://"):
            if opener is None:
                raise ModelLoadError(text, "a URL needs an opener (use infra.model_store.load_model)")
            data = opener(text)
        else:
            path = Path(text.removeprefix("file://"))
            if not path.is_file():
                raise ModelLoadError(text, "weights file not found")
            data = path.read_bytes()
        name = text
    elif isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "<bytes>"
    else:
        raise ModelLoadError(str(source), f"unsupported weights source type {type(source).__name__}")
    if name.endswith(".safetensors") or _looks_like_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as error:  # safetensors raises its own error types
            raise ModelLoadError(name, f"not a valid safetensors file: {error}") from error
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only rejects pickled code: say so
        raise ModelLoadError(name, "cannot read weights safely (safetensors or weights-only torch file): "
                                   f"{error}") from error
    for wrapper in CHECKPOINT_CONTAINERS:  # training scripts' {"state_dict": ...} / {"model": ...}
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise ModelLoadError(name, "the file does not hold a state dict")
    return dict(state)


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len < len(data) and data[8:9] == b"{"


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], spec: str) -> None:
    """Load strictly, ignoring known training-head keys; report missing and unexpected keys.

    Checkpoints of the bare network the wrapper holds (``timm.create_model(arch).state_dict()``,
    a torchvision classifier's) load too: their keys get the wrapper's prefix (``backbone.``,
    ``network.``), a classifier head the wrapper replaced is ignored, and the wrapper's own
    layers around the network (MiewID's GeM + BatchNorm1d neck) keep their initial values (GeM
    ``p`` = 3, an identity BatchNorm). Each is named in the log.
    """
    cleaned, ignored = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(IGNORED_CHECKPOINT_PREFIXES):
            ignored.append(key)
            continue
        cleaned[key] = value
    expected = model.state_dict()
    cleaned, heads, kept = fit_bare_network(model, cleaned)
    ignored += heads
    if ignored:
        logger.info("%s: checkpoint keys the model does not use, ignored: %s", public_spec(spec),
                    _key_list(ignored))
    if kept:
        logger.info("%s: checkpoint of the bare network; the wrapper's own layers keep their initial values: %s",
                    public_spec(spec), _key_list(kept))
    missing = sorted(set(expected) - set(cleaned) - set(kept))
    unexpected = sorted(set(cleaned) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(spec, "checkpoint keys do not match the architecture", missing, unexpected)
    wrong_shape = [k for k, v in cleaned.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong_shape:
        details = ", ".join(f"{k} {tuple(cleaned[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape[:5])
        raise ModelLoadError(spec, f"shape mismatch: {details}")
    model.load_state_dict(cleaned, strict=not kept)


def _key_list(keys: list[str], shown: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


def _replaced_head(model: nn.Module, key: str) -> bool:
    """Whether ``key`` belongs to a module the wrapper replaced by ``nn.Identity`` (a removed head)."""
    module_path = key.rsplit(".", 1)[0] if "." in key else ""
    while module_path:
        try:
            if isinstance(model.get_submodule(module_path), nn.Identity):
                return True
        except AttributeError:
            pass
        module_path = module_path.rsplit(".", 1)[0] if "." in module_path else ""
    return False


def fit_bare_network(model: nn.Module, state: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Map a checkpoint of the network inside ``model`` to ``model``'s keys.

    The prefix is the child module of ``model`` (``backbone``, ``network``) under which most of the
    checkpoint's keys exist, and more than without one; nothing changes when no prefix does (a
    checkpoint of another network then fails with its own key names).

    Returns:
        ``(state, ignored, kept)``: the mapped state; the checkpoint's keys of a head the wrapper
        replaced with ``nn.Identity``; the wrapper's keys outside the network, left as initialised
        (only for a bare-network checkpoint).
    """
    expected = model.state_dict()
    as_is = sum(key in expected for key in state)
    best, best_hits = None, as_is
    for name, _child in model.named_children():
        hits = sum(f"{name}.{key}" in expected for key in state)
        if hits > best_hits and 2 * hits > len(state):  # most of the file fits under that prefix
            best, best_hits = name, hits
    if best is None:
        heads = [key for key in state if key not in expected and _replaced_head(model, key)]
        return {k: v for k, v in state.items() if k not in heads}, heads, []
    mapped, heads = {}, []
    for key, value in state.items():
        target = f"{best}.{key}"
        if target not in expected and _replaced_head(model, target):
            heads.append(key)
        else:
            mapped[target] = value
    kept = [key for key in expected if not key.startswith(f"{best}.")]
    return mapped, heads, kept


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Save ``model``'s state dict as safetensors (the published layout for MiewIdNet)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture (module types and parameter names/shapes) and all weights."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------- random weights, specs
def would_use_random_weights(spec: str, weights: WeightsSource = None) -> bool:
    """Whether :func:`load_model` would build ``spec`` with random initialisation.

    Decided from the spec alone (nothing is built, imported or read): ``timm:<arch>``,
    ``torchvision:<arch>`` and ``miewid`` without ``weights=`` (nor a path or ``hf://`` URL), and
    ``miewid-arch`` always; ``demo`` and ``python:`` factories never (a factory brings its own
    weights). ``weights`` is :func:`load_model`'s override argument.

    Raises:
        ModelLoadError: the spec's kind is unknown.
    """
    parsed = ModelSpec.parse(spec)
    if parsed.kind not in _REGISTRY:
        known = ", ".join(list_model_kinds())
        raise ModelLoadError(public_spec(spec), f"unknown model kind {parsed.kind!r}; known: {known}")
    mode = _RANDOM_WEIGHTS.get(parsed.kind, "never")
    if mode != "without_weights":
        return mode == "always"
    given = weights is not None or bool(parsed.options.get("weights"))
    if parsed.kind == "miewid":
        given = given or bool(parsed.name)  # miewid:<path> names the checkpoint
    return not given


def random_weights_hint(spec: str) -> str:
    """A ready-to-print explanation that ``spec`` has no weights, and how to give them."""
    shown = public_spec(spec)
    parsed = ModelSpec.parse(spec)
    if parsed.kind == "miewid-arch":
        own = "use `miewid?weights=PATH_OR_URL` for the same architecture with a MiewID checkpoint"
    elif parsed.kind == "miewid":
        own = "give the checkpoint: `miewid?weights=PATH_OR_URL` (a local file, s3://..., or hf://...)"
    elif parsed.kind in ("timm", "torchvision") and parsed.name:
        query = "&".join(f"{k}={v}" for k, v in parsed.options.items() if k != "weights")
        example = public_spec(f"{parsed.kind}:{parsed.name}?{query + '&' if query else ''}weights=PATH_OR_URL")
        own = f"give the weights: `{example}`"
    else:
        own = "give the weights with `?weights=PATH_OR_URL`"
    return (
        f"model {shown!r} has no weights and would run with random initialisation: its pictures, "
        "scores and re-rankings would look normal but mean nothing. "
        f"{own[0].upper()}{own[1:]} (safetensors or a weights-only torch file); "
        "for a MiewID checkpoint use `miewid?weights=...`; to try the pipeline, use `demo`"
    )


def ensure_weights(spec: str, *, allow_random_weights: bool = False, weights: WeightsSource = None) -> bool:
    """Refuse a spec that would run with random weights unless that is allowed explicitly.

    Returns:
        whether the model will have random weights (only ``True`` when allowed).

    Raises:
        RandomWeightsError: random weights and ``allow_random_weights`` is false; the message is
            :func:`random_weights_hint`.
        ModelLoadError: the spec's kind is unknown.
    """
    random = would_use_random_weights(spec, weights)
    if random and not allow_random_weights:
        raise RandomWeightsError(public_spec(spec), random_weights_hint(spec))
    return random



def weights_digest(model: nn.Module) -> str:
    """Hash of the weights only: parameter/buffer names, shapes, dtypes and values (16 hex chars).

    Unlike :func:`model_fingerprint` it ignores module class names, so the same weights in a
    user's own copy of an architecture give the same digest; use it to record *which weights*
    ran, and the fingerprint to key caches of *what computed* them.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
