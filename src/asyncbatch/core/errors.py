"""The exceptions asyncbatch raises. Every one names what is wrong and, where there is a choice, the valid choices."""

from __future__ import annotations


class AsyncBatchError(Exception):
    """Base class of every asyncbatch error."""


class ConfigError(AsyncBatchError, ValueError):
    """A configuration value is missing, of the wrong type, out of range, or inconsistent with another."""

    def __init__(self, key: str, message: str, valid: list[str] | None = None) -> None:
        self.key = key
        self.message = message
        self.valid = sorted(valid) if valid is not None else None
        text = f"{key}: {message}" if key else message
        if self.valid is not None:
            text += f" (valid: {', '.join(self.valid)})" if self.valid else " (valid: none)"
        super().__init__(text)


class UnknownComponent(ConfigError):
    """A component name that no plugin registered for its family."""

    def __init__(self, family: str, name: str, valid: list[str], key: str | None = None) -> None:
        self.family = family
        self.name = name
        super().__init__(key or family, f"unknown {family} {name!r}", valid)


class RequestError(AsyncBatchError, ValueError):
    """A single request is invalid. The engine fails that request with this message and nothing else."""


class UnsupportedError(AsyncBatchError, RuntimeError):
    """A feature was asked for that this machine, runtime or model cannot provide."""


class PluginError(AsyncBatchError, RuntimeError):
    """A plugin's hook raised; the message names the plugin."""

    def __init__(self, plugin: str, hook: str, cause: BaseException, *, doing: str = "in hook") -> None:
        self.plugin = plugin
        self.hook = hook
        text = "; ".join(line.strip() for line in str(cause).splitlines() if line.strip())  # one line
        super().__init__(f"plugin {plugin!r} failed {doing} {hook}: {type(cause).__name__}: {text}")


class ComponentError(AsyncBatchError, RuntimeError):
    """A plugin's strategy (scheduler, buffer policy, ...) raised during a run; the message names it and its
    plugin, where the bare exception would read as asyncbatch's own failure."""

    def __init__(self, family: str, name: str, plugin: str, cause: BaseException) -> None:
        self.family, self.name, self.plugin = family, name, plugin
        super().__init__(f"{family} {name!r} of plugin {plugin!r} raised {type(cause).__name__}: {cause}")


class StrategyError(AsyncBatchError, ValueError):
    """A strategy broke its interface's contract (returned what its docstring rules out); the message names it."""
