"""Flags -> config: the one mapping every sub-command uses.

Flags that set config fields default to None ("not given"), so the config sees only
what the user typed and can tell an option that does not apply from one left alone.
"""

from __future__ import annotations

import dataclasses

def config_from_args(config_class, args, *, yaml_path=None, **fixed):
    """``config_class`` built from the flags of ``args`` that name its fields (None: not
    given), an optional YAML file under them, and ``fixed`` values the command sets itself."""
    names = {f.name for f in dataclasses.fields(config_class)}
    options = {k: v for k, v in vars(args).items() if k in names and v is not None}
    options.update(fixed)
    return config_class.from_options(options, yaml_path)


def int_list(text: str, flag: str) -> list[int]:
    """``"1,4,8"`` -> [1, 4, 8]; one line for anything else (an argparse type error, so
    that it reads like every other bad flag value)."""
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of integers such as 1,4,8, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must name at least one integer, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_quiet(parser) -> None:
    parser.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bars")


def add_config_flags(parser, config_class, skip=()) -> None:
    """One flag per field of a config dataclass (``--field-name``), typed from its hints;
    every flag defaults to None so that the config sees only what was typed."""
    import types
    import typing

    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        kind = hints[f.name]
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)  # X | None: the X
        args = [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]
        base = typing.get_origin(args[0]) or args[0]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "") + (f" (default {default})" if default not in (None, False) else "")
        if base is bool and f.name == "progress":
            add_quiet(parser)
        elif base is bool:
            if default is True:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    default=None, help=help_text)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        elif base in (list, tuple):
            item = (typing.get_args(args[0]) or (str,))[0]
            parser.add_argument(flag, dest=f.name, default=None, help=help_text + " (comma list)",
                                type=(lambda text, name=flag: int_list(text, name)) if item is int else name_list)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=base if base in (int, float) else str,
                                help=help_text)
