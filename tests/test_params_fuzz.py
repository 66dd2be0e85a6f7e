"""Every key of params.yaml, generated from the config model: a wrong type, an out-of-range value
(a bound or a value outside a choice) and an unknown key (in each section and at the top) each give
one line naming the key and the bad value, a choice its allowed values, an unknown key the keys
allowed there (``stage_main`` turns that ConfigError into exit 2: test_config)."""
from __future__ import annotations

import typing
from typing import Any, Literal, get_args, get_origin

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel

from mtdiff.config import DEFAULT_PARAMS, ConfigError, Params, load_params


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaves(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _base_type(ann: Any) -> Any:
    if get_origin(ann) is typing.Union:
        return next(a for a in get_args(ann) if a is not type(None))
    return ann


def _wrong_type(base: Any) -> Any:
    if get_origin(base) is Literal or base is str:
        return 123
    if base is bool:
        return "maybe"
    if base in (int, float):
        return "abc"
    if get_origin(base) is list:
        return "not-a-list"
    raise AssertionError(f"no wrong value for {base}")


def _cases():
    for key, field in _leaves(Params):
        base = _base_type(field.annotation)
        yield pytest.param(key, _wrong_type(base), id=f"{key}-type")
        step = 1 if base is int else 0
        for m in field.metadata:
            bound = {Ge: lambda m: m.ge - 1, Gt: lambda m: m.gt - step, Le: lambda m: m.le + 1,
                     Lt: lambda m: m.lt + step}.get(type(m))
            if bound is not None:
                yield pytest.param(key, bound(m), id=f"{key}-{type(m).__name__.lower()}")
        if get_origin(base) is Literal:
            yield pytest.param(key, "zzz_not_allowed", id=f"{key}-choice")


CASES = list(_cases())
SECTIONS = [name for name, f in Params.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]


def test_the_cases_cover_every_key():
    keys = {c.values[0] for c in CASES}
    assert len(keys) == len(list(_leaves(Params))) > 80 and len(CASES) > 150


@pytest.mark.parametrize("key,value", CASES)
def test_bad_value_is_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        load_params(DEFAULT_PARAMS, overrides={key: value})
    message = str(err.value).strip()
    assert key in message and repr(value) in message and "\n" not in message, message
    if value == "zzz_not_allowed":  # a choice: the allowed values are listed
        allowed = get_args(_base_type(dict(_leaves(Params))[key].annotation))
        assert all(repr(a) in message or str(a) in message for a in allowed), message


@pytest.mark.parametrize("section", [*SECTIONS, ""])
def test_unknown_key_is_one_line_naming_it_and_the_allowed_keys(section):
    key = f"{section}.no_such_key" if section else "no_such_key"
    with pytest.raises(ConfigError) as err:
        load_params(DEFAULT_PARAMS, overrides={key: 1})
    message = str(err.value).strip()
    model = Params.model_fields[section].annotation if section else Params
    assert key in message and "\n" not in message, message
    assert "allowed keys here: " + ", ".join(sorted(model.model_fields)) in message, message
