"""Click options generated from the job config dataclasses, so a default or help text is
written once (in the dataclass) and the command line, the TOML config and the job agree.

`@config_options(PrecomputeConfig, "batch_size", "dtype")` adds `--batch-size`, `--dtype`;
a bool field becomes `--flag/--no-flag`; a field whose metadata has "choices" becomes a
click.Choice. `config_from(PrecomputeConfig, kwargs)` builds the dataclass from the parsed
values, turning its validation error into a click.BadParameter-style usage error.
"""

from __future__ import annotations

import dataclasses

import click

_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}


def _option(f: dataclasses.Field, prefix: str):
    name = f.name.replace("_", "-")
    dest = prefix.replace("-", "_") + f.name
    help_ = f.metadata.get("help", "")
    if f.type == "bool":
        return click.option(f"--{prefix}{name}/--no-{prefix}{name}", dest, default=f.default, show_default=True,
                            help=help_)
    kind = click.Choice(f.metadata["choices"]) if "choices" in f.metadata else _TYPES[str(f.type)]
    default = None if f.default is dataclasses.MISSING else f.default
    return click.option(f"--{prefix}{name}", dest, type=kind, default=default, show_default=default is not None,
                        help=help_)


def config_options(cls, *names: str, prefix: str = ""):
    """Decorator adding one option per named field of `cls` (all fields when none named)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # A field with metadata {"cli": False} (ModelConfig.fusion: written by `embsum align`) gets no option.
    chosen = [fields[n] for n in names] if names else [f for f in fields.values() if f.metadata.get("cli", True)]

    def decorate(fn):
        for f in reversed(chosen):
            fn = _option(f, prefix)(fn)
        return fn

    return decorate


def config_from(cls, values: dict, prefix: str = ""):
    """The dataclass from parsed options (pops the keys it uses from `values`)."""
    key = prefix.replace("-", "_")
    kwargs = {f.name: values.pop(key + f.name) for f in dataclasses.fields(cls) if key + f.name in values}
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
