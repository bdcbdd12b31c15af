"""Config files and command-line values in and out of the config tree (plait.config).

`load_config` layers defaults, a base, a TOML file and command-line
overrides, turning each value into its field's type or saying in one line
why it cannot be; `to_toml` writes the resolved tree back as TOML whose keys
are the options' flag names. The checks of the values themselves live with
the dataclasses in config.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import tomli_w

from plait.config import SECTIONS, Config, field_type, flag_of, key_of
from plait.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: dict[str, dict[str, Any]] | None = None) -> Config:
    """Build the config: defaults, then `base`, then the TOML file at `path`, then `overrides`.

    `overrides` maps "section.field" to a value (a string from the command line
    is converted to the field's type).
    """
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}  # by field (attribute) name
    for layer in (base or {}), (read_toml(path) if path else {}):
        for section, values in layer.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section [{section}]; known: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section [{section}] must be a table of values")
            raw[section].update(_by_field(section, values))
    for key, value in (overrides or {}).items():
        section, name = key.split(".", 1)
        raw[section].update(_by_field(section, {name: value}))
    built = {}
    for section, cls in SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {name: _coerce(section, cls, fields[name], v) for name, v in raw[section].items()}
        built[section] = cls(**values)
    return Config(**built)


def _by_field(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A TOML table's keys (the flags' names, or the older field names) as field names."""
    fields = dataclasses.fields(SECTIONS[section])
    names = {key_of(f): f.name for f in fields} | {f.name: f.name for f in fields}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            known = ", ".join(key_of(f) for f in fields)
            raise ConfigError(f"unknown config field {section}.{key}; known: {known}")
        if names[key] in out:
            canonical = key_of(next(f for f in fields if f.name == names[key]))
            raise ConfigError(f"config section [{section}] gives {canonical} twice, also as its older name "
                              f"{names[key]}; keep {canonical}")
        out[names[key]] = value
    return out


def read_toml(path: str | Path, what: str | None = None) -> dict:
    """The TOML file at `path`; any reason it cannot be read is one line naming `what` (default: --config PATH)."""
    what = what or f"--config {path}"
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: is a folder; give a TOML file (a run's is RUN_DIR/config.toml)") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot read it ({e.strerror or e}); give a readable TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: not valid TOML (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what}: not valid TOML ({e})") from None


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as nested plain values, None left out (TOML has no null)."""
    return {section: {key_of(f): getattr(getattr(cfg, section), f.name)
                      for f in dataclasses.fields(SECTIONS[section])
                      if getattr(getattr(cfg, section), f.name) is not None}
            for section in SECTIONS}


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, readable by `load_config`."""
    return tomli_w.dumps(to_dict(cfg))


def _coerce(section: str, cls: type, f: dataclasses.Field, value: Any) -> Any:
    """Turn a TOML or command-line value into the field's type, or say why not."""
    kind, optional = field_type(cls, f.name)
    where = f"{section}.{key_of(f)} = {value!r}"
    if f.metadata.get("listed") and isinstance(value, list):  # split = [3, 5] in TOML, as "3,5"
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"invalid {where}: must be whole numbers, e.g. [3, 5] or \"3,5\" ({flag_of(f)})")
        value = ",".join(str(v) for v in value)
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise ConfigError(f"invalid {where}: a value is required ({flag_of(f)})")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid {where}: must be true or false ({flag_of(f)})")
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ConfigError(f"invalid {where}: must be a whole number ({flag_of(f)})")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid {where}: must be a whole number ({flag_of(f)})") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid {where}: must be a number ({flag_of(f)})")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid {where}: must be a number ({flag_of(f)})") from None
    if not isinstance(value, str):
        raise ConfigError(f"invalid {where}: must be a string ({flag_of(f)})")
    return value
