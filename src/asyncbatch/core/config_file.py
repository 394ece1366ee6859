"""Reading a config file: `load_yaml`, the one place asyncbatch reads YAML from disk.

It returns the file's plain mapping; `config` structures and validates it. A missing file, invalid YAML and a
top level that is not a mapping are `ConfigError`s naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .dotted import yaml_loader
from .errors import ConfigError


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The one place asyncbatch reads YAML."""
    import yaml

    path = Path(path)
    if path.is_dir():  # not "not found": it is there, and it is not a file
        raise ConfigError("", f"{path} is a directory, not a config file (an experiment or engine YAML file)")
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    with path.open() as fh:
        try:
            data = yaml.load(fh, Loader=yaml_loader())  # noqa: S506  (a safe loader)
        except yaml.YAMLError as exc:
            raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
        except ValueError as exc:  # e.g. an int of more than 4300 digits, which Python refuses to read
            raise ConfigError("", f"{path} holds a value that cannot be read: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data
