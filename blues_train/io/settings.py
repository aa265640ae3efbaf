"""Typed settings: strict pydantic models, and their errors as one line naming the key.

Every settings file Blues reads (a project's config.json, `--training_config`) is a
`Settings` model: unknown keys, wrong types and out-of-range values are refused, and
`validated` turns pydantic's report into `FILE: training.max_step is not a known setting;
did you mean max_steps?`.
"""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel, ConfigDict, ValidationError

from blues_train.io import storage
from blues_train.io.errors import BluesError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def validated(model: type[BaseModel], raw: dict, where: str, flags: bool = False, advice: str = "") -> BaseModel:
    """`model` built from `raw`; a BluesError naming `where` and the first bad field otherwise
    (as `--field` when `flags`), then `advice` (what to do)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise BluesError(f"{where}{error_line(exc, model, flags)}{advice}") from None


def error_line(exc: ValidationError, model: type[BaseModel], flags: bool = False) -> str:
    """One line for the first error: the field's dotted path, what is wrong, and for an
    unknown key the nearest valid one."""
    error = exc.errors()[0]
    loc = error["loc"]
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "the top level"
    if flags:
        name = f"--{loc[0]}" if loc else "a flag"
    if error["type"] == "extra_forbidden":
        known = field_names(model, loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {near[0]}?" if near else f"known keys: {', '.join(known)}"
        return f"{name} is not a known setting; {hint}"
    if error["type"] == "missing":
        return f"{name} is required"
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{name}: {message[0].lower()}{message[1:]} (got {error['input']!r})"


def field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) model at `loc` inside `model`."""
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = next(t for t in _flatten(annotation) if isinstance(t, type) and issubclass(t, BaseModel))
    return list(model.model_fields)


def _flatten(annotation):
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _flatten(arg)


def read_json(path: str, flag: str) -> dict:
    raw = storage.read_json(path, flag)
    if not isinstance(raw, dict):
        raise BluesError(f"{flag} {path}: must hold a JSON object of settings")
    return raw
