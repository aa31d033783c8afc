"""Stage configs: one dataclass per pipeline stage, checked once, when it is made.

Every stage function (train, evaluate, predict, quantize, calibrate, export, bench, ...) takes
one of these. Making one checks each field's type (an int where a float is expected is
widened, a path may be a ``Path``), then the stage's own rules (:meth:`StageConfig.check`):
ranges, and which options apply to which method or format. Options that apply only to some
methods default to ``None`` ("not set"), so setting one where it does not apply is an error
instead of being silently ignored. Errors name the option as the command line spells it
(``--image-size``), which is also the config key with dashes.

``from_options`` builds a config from a mapping (CLI flags, a YAML file, keyword arguments),
refusing unknown keys with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path

from edgekit.errors import EdgekitError

MAX_IMAGE_SIZE = 4096  # the model input side; larger scenes are tiled, never fed whole
MODEL_STRIDE = 32      # ConvNeXt downsamples by 32: every stage's input side is a multiple of it


def flag(key: str) -> str:
    """How the command line spells a config key: ``image_size`` -> ``--image-size``."""
    return "--" + key.replace("_", "-")


def require(ok: bool, key: str, value, rule: str) -> None:
    """One line when a rule fails: ``--key must be RULE, got VALUE``."""
    if not ok:
        raise EdgekitError(f"{flag(key)} must be {rule}, got {value!r}")


def check_image_size(size, key: str = "image_size") -> None:
    """The one image-size rule of every stage: a multiple of the model stride, bounded."""
    require(isinstance(size, int) and MODEL_STRIDE <= size <= MAX_IMAGE_SIZE and size % MODEL_STRIDE == 0, key, size,
            f"a multiple of {MODEL_STRIDE} between {MODEL_STRIDE} and {MAX_IMAGE_SIZE} (larger scenes are tiled)")


def check_finite(value, key: str) -> None:
    if value is not None and isinstance(value, float) and not math.isfinite(value):
        raise EdgekitError(f"{flag(key)} must be a finite number, got {value!r}")


def only_for(config, keys: typing.Iterable[str], selector: str, allowed: typing.Iterable[str]) -> None:
    """Refuse options set (not None) when ``config.<selector>`` is not one of ``allowed``."""
    allowed = tuple(allowed)
    chosen = getattr(config, selector)
    if chosen in allowed:
        return
    for key in keys:
        if getattr(config, key) is not None:
            raise EdgekitError(f"{flag(key)} applies to {flag(selector)} {' | '.join(allowed)}, not "
                               f"{flag(selector)} {chosen}; remove it")


@dataclasses.dataclass
class StageConfig:
    """Base of the stage configs: type checks on creation, then :meth:`check`."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            setattr(self, field.name, _coerce(field.name, getattr(self, field.name), hints[field.name]))
        self.check()

    def check(self) -> None:
        """The stage's own rules; subclasses raise :class:`EdgekitError` with one line."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        """A copy with some fields changed, checked again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: dict | None = None, yaml_path: str | Path | None = None):
        """A config from an optional YAML file, then ``options`` (None values mean "not given")."""
        values: dict = {}
        source = {}
        if yaml_path is not None:
            for key, value in read_yaml_mapping(yaml_path).items():
                values[key], source[key] = value, str(yaml_path)
        for key, value in (options or {}).items():
            if value is not None:
                values[key], source[key] = value, "option"
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise EdgekitError(f"{source[key]}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        return cls(**values)


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; one line for a missing, unreadable or non-mapping file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"config file {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise EdgekitError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise EdgekitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise EdgekitError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def _coerce(key: str, value, hint):
    """``value`` checked against the type hint: ints widen to float, paths become str,
    strings of numbers (YAML reads 2e-3 as a string) become floats; anything else is an error."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _union_type()) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise EdgekitError(f"{flag(key)} must be given")
    for kind in allowed:
        if kind is type(None):
            continue
        ok, converted = _convert(value, kind)
        if ok:
            if isinstance(converted, float) and not math.isfinite(converted):
                raise EdgekitError(f"{flag(key)} must be a finite number, got {value!r}")
            return converted
    names = " or ".join(_type_name(t) for t in allowed if t is not type(None))
    raise EdgekitError(f"{flag(key)} must be {names}, got {value!r}")


def _union_type():
    import types

    return getattr(types, "UnionType", typing.Union)


def _convert(value, kind) -> tuple[bool, object]:
    origin = typing.get_origin(kind) or kind
    if kind is typing.Any:
        return True, value
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if origin is str:
        if isinstance(value, os.PathLike):
            return True, os.fspath(value)
        return isinstance(value, str), value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(kind)
        item = args[0] if args else typing.Any
        converted = []
        for v in value:
            ok, c = _convert(v, item)
            if not ok:
                return False, value
            converted.append(c)
        return True, origin(converted)
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, origin), value


def _type_name(kind) -> str:
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        args = typing.get_args(kind)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text",
            dict: "a mapping"}.get(origin or kind, getattr(kind, "__name__", str(kind)))
