"""Configuration: Django-style ``CHANNEL_LAYERS`` mappings and environment variables.

Each backend's options are read from its constructor signature (keyword-only
parameters, their type hints and defaults), so the defaults live in one place
(the backend class), every option is settable from a mapping and from the
environment, and an unknown or ill-typed value is refused with a message that
names the key or variable, the bad value and what is accepted.

The consumer settings (``CONSUMER_SETTINGS``: allowed origins and frame limits)
use the same parsers and checks, from ``FASTAPI_WEBSOCKETS_*`` variables or
consumer class attributes.
"""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import inspect
import json
import logging
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.backends.urls import redact_url
from fastapi_websockets.exceptions import InvalidChannelLayerConfig

__all__ = [
    "BACKEND_ALIASES",
    "CONSUMER_SETTINGS",
    "DEFAULT_BACKEND",
    "DEFAULT_ENV_PREFIX",
    "DEFAULT_LAYER_ALIAS",
    "BackendSettings",
    "Option",
    "backend_options",
    "build_channel_layer",
    "check_consumer_setting",
    "consumer_settings_from_env",
    "get_channel_layer",
    "get_channel_layer_from_env",
    "load_backend_class",
    "parse_channel_layers",
    "parse_channel_layers_from_env",
    "warn_unread_environment",
]

logger = logging.getLogger("fastapi_websockets.config")

DEFAULT_LAYER_ALIAS = "default"
DEFAULT_ENV_PREFIX = "FASTAPI_WEBSOCKETS_"
DEFAULT_BACKEND = "fastapi_websockets.backends.inmemory.InMemoryChannelLayer"
#: Short backend names accepted wherever a dotted path is.
BACKEND_ALIASES: dict[str, str] = {
    "inmemory": DEFAULT_BACKEND,
    "redis": "fastapi_websockets.backends.redis.RedisChannelLayer",
    "postgresql": "fastapi_websockets.backends.postgresql.PostgreSQLChannelLayer",
    "nats": "fastapi_websockets.backends.nats.NATSChannelLayer",
    "rabbitmq": "fastapi_websockets.backends.rabbitmq.RabbitMQChannelLayer",
}
_ALIAS_KEYS = frozenset({"BACKEND", "CONFIG"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A repr'd string: a quote after no letter (so not the apostrophe of "layer's") up to its mate.
_QUOTED = re.compile(r"(?<![A-Za-z0-9])(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")


@dataclass(frozen=True)
class BackendSettings:
    """One alias's settings: the backend's dotted path and its CONFIG options."""

    backend: str = DEFAULT_BACKEND
    config: dict[str, Any] = field(default_factory=dict)
    #: Where each option of ``config`` was given (``FASTAPI_WEBSOCKETS_REDIS_CAPACITY``,
    #: ``CHANNEL_LAYERS['default']['CONFIG']['capacity']``), for the backend's errors.
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:
        # Settings get logged and printed: never with a password from a URL or DSN.
        return f"BackendSettings(backend={self.backend!r}, config={_shown(self.config)!r})"


def _shown(value: Any) -> Any:
    """``value`` as it may appear in a message: URLs (also inside lists and dicts) without a password."""
    if isinstance(value, str):
        return redact_url(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {key: _shown(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shown(item) for item in value]
    return value


@dataclass(frozen=True)
class Option:
    """One constructor option of a backend: name, type hint and default."""

    name: str
    annotation: Any
    default: Any

    @property
    def env_settable(self) -> bool:
        """Whether the option can be given as an environment variable."""
        return _env_parser(self.annotation) is not None


# ------------------------------------------------------------------ backends


def _resolve_backend_path(value: str) -> str:
    return BACKEND_ALIASES.get(value.strip().lower(), value.strip())


def load_backend_class(path: str) -> type[BaseChannelLayer]:
    """Import a backend class from a short name (``"redis"``) or a dotted path.

    Importing a backend never imports its broker driver; that happens when the
    layer first connects, with an error naming the extra to install.
    """
    if not isinstance(path, str) or not path.strip():
        raise InvalidChannelLayerConfig(
            f"BACKEND must be one of {sorted(BACKEND_ALIASES)} or a dotted path "
            f"'package.module.Class', got {path!r}"
        )
    dotted = _resolve_backend_path(path)
    module_path, _, class_name = dotted.rpartition(".")
    if not module_path:
        raise InvalidChannelLayerConfig(
            f"unknown BACKEND {path!r}: use one of {sorted(BACKEND_ALIASES)} or a dotted "
            "path 'package.module.Class'"
        )
    try:
        module = import_module(module_path)
    except ImportError as exc:
        raise InvalidChannelLayerConfig(
            f"cannot import backend module {module_path!r} (BACKEND {path!r}): {exc}"
        ) from exc
    backend = getattr(module, class_name, None)
    if not (isinstance(backend, type) and issubclass(backend, BaseChannelLayer)):
        raise InvalidChannelLayerConfig(
            f"BACKEND {path!r} must name a BaseChannelLayer subclass; "
            f"{module_path}.{class_name} is {backend!r}"
        )
    return backend


def backend_options(backend: type[BaseChannelLayer]) -> dict[str, Option]:
    """The options a backend accepts, read from its (and its bases') ``__init__``."""
    options: dict[str, Option] = {}
    for klass in backend.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        has_var_kw = False
        for param in inspect.signature(init).parameters.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                has_var_kw = True
            elif (
                param.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                and param.name != "self"
                and param.name not in options
            ):
                options[param.name] = Option(param.name, hints.get(param.name, Any), param.default)
        if not has_var_kw:
            break
    return options


def _env_name(backend: type[BaseChannelLayer]) -> str:
    name = backend.backend_name or backend.__name__
    return re.sub(r"[^A-Za-z0-9]+", "_", name).upper()


# -------------------------------------------------------------- value checks


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return annotation, False


def _describe(annotation: Any) -> str:
    inner, optional = _strip_optional(annotation)
    origin = typing.get_origin(inner)
    if inner is bool:
        text = "a boolean (true/false, 1/0, yes/no, on/off)"
    elif inner is int:
        text = "an integer"
    elif inner is float:
        text = "a number"
    elif inner is str:
        text = "a string"
    elif origin in (list, collections.abc.Sequence):
        text = "a list of strings (comma-separated in the environment)"
    elif origin in (dict, collections.abc.Mapping):
        text = "a mapping (a JSON object in the environment)"
    else:
        text = str(inner)
    return f"{text} or empty/None" if optional else text


def _check_value(where: str, option: Option, value: Any) -> Any:
    """Type-check a value given in a mapping; return it, normalized."""
    inner, optional = _strip_optional(option.annotation)
    if value is None:
        if optional:
            return None
        raise InvalidChannelLayerConfig(f"{where} must be {_describe(option.annotation)}, got None")
    origin = typing.get_origin(inner)
    ok = True
    if inner is bool:
        ok = isinstance(value, bool)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif inner is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif inner is str:
        ok = isinstance(value, str)
    elif origin in (list, collections.abc.Sequence):
        if isinstance(value, str):
            value = _split_list(value)
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    elif origin in (dict, collections.abc.Mapping):
        ok = isinstance(value, Mapping)
    if not ok:
        raise InvalidChannelLayerConfig(
            f"{where} must be {_describe(option.annotation)}, got {type(value).__name__} {_shown(value)!r}"
        )
    return value


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


def _parse_json_mapping(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


def _env_parser(annotation: Any) -> Callable[[str], Any] | None:
    inner, optional = _strip_optional(annotation)
    origin = typing.get_origin(inner)
    base: Callable[[str], Any] | None
    if inner is bool:
        base = _parse_bool
    elif inner is int:
        base = lambda text: int(text.strip())  # noqa: E731
    elif inner is float:
        base = lambda text: float(text.strip())  # noqa: E731
    elif inner is str:
        base = str
    elif origin in (list, collections.abc.Sequence):
        base = _split_list
    elif origin in (dict, collections.abc.Mapping):
        base = _parse_json_mapping
    else:
        return None
    if not optional:
        return base
    parse = base

    def parse_optional(text: str) -> Any:
        return None if not text.strip() else parse(text)

    return parse_optional


# -------------------------------------------------------------------- mapping


def _validate_config(
    backend: type[BaseChannelLayer], config: Mapping[str, Any], where: str
) -> dict[str, Any]:
    options = backend_options(backend)
    checked: dict[str, Any] = {}
    for key, value in config.items():
        option = options.get(key)
        if option is None:
            raise InvalidChannelLayerConfig(
                f"{where}: unknown option {key!r} for {backend.__name__}; "
                f"valid options are {', '.join(sorted(options))}"
            )
        checked[key] = _check_value(f"{where}[{key!r}]", option, value)
    return checked


def parse_channel_layers(settings: Mapping[str, Mapping[str, Any]] | None) -> dict[str, BackendSettings]:
    """Validate a ``CHANNEL_LAYERS`` mapping and return ``{alias: BackendSettings}``.

    ``None`` or an empty mapping means one in-memory ``"default"`` alias.
    Backend names may be short (``"redis"``) or dotted paths; options are
    checked against the backend's constructor.
    """
    if not settings:
        return {DEFAULT_LAYER_ALIAS: BackendSettings()}
    if not isinstance(settings, Mapping):
        raise InvalidChannelLayerConfig(
            f"CHANNEL_LAYERS must be a mapping of alias to settings, got {type(settings).__name__}"
        )
    parsed: dict[str, BackendSettings] = {}
    for alias, entry in settings.items():
        if not isinstance(alias, str) or not alias:
            raise InvalidChannelLayerConfig(f"channel layer aliases must be non-empty strings, got {alias!r}")
        if not isinstance(entry, Mapping):
            raise InvalidChannelLayerConfig(
                f"CHANNEL_LAYERS[{alias!r}] must be a mapping with BACKEND and CONFIG keys, "
                f"got {_shown(entry)!r}"
            )
        unknown = set(entry) - _ALIAS_KEYS
        if unknown:
            raise InvalidChannelLayerConfig(
                f"CHANNEL_LAYERS[{alias!r}] has unknown key(s) {sorted(unknown)}; "
                "valid keys are BACKEND, CONFIG"
            )
        raw_backend = entry.get("BACKEND", DEFAULT_BACKEND)
        backend = load_backend_class(raw_backend)  # first: it says what a BACKEND that is no str should be
        backend_path = _resolve_backend_path(raw_backend)
        config = entry.get("CONFIG", {})
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise InvalidChannelLayerConfig(
                f"CHANNEL_LAYERS[{alias!r}]['CONFIG'] must be a mapping, got {type(config).__name__}"
            )
        where = f"CHANNEL_LAYERS[{alias!r}]['CONFIG']"
        checked = _validate_config(backend, config, where)
        sources = {key: f"{where}[{key!r}]" for key in checked}
        parsed[alias] = BackendSettings(backend=backend_path, config=checked, sources=sources)
    return parsed


def build_channel_layer(
    backend: str | BackendSettings, config: Mapping[str, Any] | None = None
) -> BaseChannelLayer:
    """Create a layer from a backend name or path and its options (or a ``BackendSettings``)."""
    if isinstance(backend, BackendSettings):
        if config is not None:
            raise TypeError("pass either BackendSettings or (backend, config), not both")
        path, config, sources = backend.backend, backend.config, backend.sources
    else:
        path, sources = backend, {}
    backend_class = load_backend_class(path)
    checked = _validate_config(backend_class, config or {}, f"CONFIG of {backend_class.__name__}")
    try:
        return backend_class(**checked)
    except InvalidChannelLayerConfig as exc:
        # The constructor names the option ("capacity must be ..."); the user knows the variable
        # or mapping key they wrote, so the error leads with that.
        given = _sources_named(str(exc), sources)
        if not given:
            raise
        raise InvalidChannelLayerConfig(f"{', '.join(given)}: {exc}") from exc


def _sources_named(message: str, sources: Mapping[str, str]) -> list[str]:
    """Where the options ``message`` names were given, in the order the message names them.

    Every constructor check names the option it refuses (``capacity must be...``,
    ``sentinels and sentinel_master go together``); quoted values are skipped, so that a
    URL or a pattern that happens to contain an option's name does not count.
    """
    unquoted = _QUOTED.sub("", message)
    named = {
        match.start(): sources[word]
        for match in _WORD.finditer(unquoted)
        if (word := match.group()) in sources
    }
    return list(dict.fromkeys(named[start] for start in sorted(named)))


def get_channel_layer(
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    alias: str = DEFAULT_LAYER_ALIAS,
) -> BaseChannelLayer:
    """Create the layer of ``alias`` from a ``CHANNEL_LAYERS`` mapping (in-memory if None).

    Each call creates a new layer: create one per process at startup and reuse it.
    """
    layers = parse_channel_layers(settings)
    if alias not in layers:
        raise InvalidChannelLayerConfig(
            f"channel layer alias {alias!r} is not configured; configured aliases: {sorted(layers)}"
        )
    return build_channel_layer(layers[alias])


# ---------------------------------------------------------------- environment


def _alias_infix(alias: str) -> str:
    token = re.sub(r"[^A-Za-z0-9]+", "_", alias).strip("_").upper()
    if not token:
        raise InvalidChannelLayerConfig(f"alias {alias!r} must contain letters or digits")
    return token + "_"


def _parse_env_alias(environ: Mapping[str, str], prefix: str) -> BackendSettings:
    backend_var = f"{prefix}BACKEND"
    raw_backend = environ.get(backend_var, "").strip() or "inmemory"
    try:
        backend = load_backend_class(raw_backend)
    except InvalidChannelLayerConfig as exc:
        raise InvalidChannelLayerConfig(f"{backend_var}={raw_backend!r}: {exc}") from exc
    options = backend_options(backend)
    option_prefix = f"{prefix}{_env_name(backend)}_"
    by_var = {option_prefix + name.upper(): option for name, option in options.items()}
    config: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for var, text in environ.items():
        if not var.startswith(option_prefix):
            continue
        option = by_var.get(var)
        if option is None:
            settable = sorted(v for v, o in by_var.items() if o.env_settable)
            raise InvalidChannelLayerConfig(
                f"unknown environment variable {var} for {backend.__name__}; "
                f"valid variables are {', '.join(settable)}"
            )
        parse = _env_parser(option.annotation)
        if parse is None:
            raise InvalidChannelLayerConfig(
                f"{var}: option {option.name!r} cannot be set from the environment; set it in CONFIG"
            )
        try:
            config[option.name] = parse(text)
        except ValueError as exc:
            raise InvalidChannelLayerConfig(
                f"{var}={_shown(text)!r} is not valid: expected {_describe(option.annotation)}"
            ) from exc
        sources[option.name] = var
    return BackendSettings(backend=_resolve_backend_path(raw_backend), config=config, sources=sources)


def parse_channel_layers_from_env(
    environ: Mapping[str, str] | None = None,
    prefix: str = DEFAULT_ENV_PREFIX,
    alias: str = DEFAULT_LAYER_ALIAS,
) -> dict[str, BackendSettings]:
    """Read layer settings from environment variables.

    Without ``{prefix}ALIASES``, the unaliased variables (``{prefix}BACKEND``,
    ``{prefix}REDIS_URL``, ...) configure ``alias``. With
    ``{prefix}ALIASES=default,events`` each alias reads its own
    ``{prefix}{ALIAS}_BACKEND``, ``{prefix}{ALIAS}_REDIS_URL``, ...
    Unset variables take the backend's defaults.
    """
    env = os.environ if environ is None else environ
    prefixes = _alias_prefixes(env, prefix, alias)
    parsed = {name: _parse_env_alias(env, alias_prefix) for name, alias_prefix in prefixes.items()}
    _warn_unread(env, prefix, list(prefixes.values()))
    return parsed


def _alias_prefixes(env: Mapping[str, str], prefix: str, alias: str) -> dict[str, str]:
    """``{alias: the prefix of its variables}``: each alias of ``{prefix}ALIASES``, else ``alias`` alone."""
    aliases_var = f"{prefix}ALIASES"
    if aliases_var not in env:
        return {alias: prefix}
    aliases = _split_list(env[aliases_var])
    if not aliases:
        raise InvalidChannelLayerConfig(f"{aliases_var} is set but names no alias; e.g. 'default,events'")
    return {name: prefix + _alias_infix(name) for name in aliases}


def warn_unread_environment(environ: Mapping[str, str] | None = None) -> None:
    """Log the ``FASTAPI_WEBSOCKETS_*`` variables nothing reads, once each (see below).

    Called when a consumer is mounted, so that a misspelled consumer setting
    (``FASTAPI_WEBSOCKETS_MAX_FRAME_BYTE``) is reported even by an app whose
    layers come from a mapping. A wrong value is not this function's business:
    it is an error where the layer or the consumer reads it.
    """
    env = os.environ if environ is None else environ
    with contextlib.suppress(InvalidChannelLayerConfig):
        prefixes = _alias_prefixes(env, DEFAULT_ENV_PREFIX, DEFAULT_LAYER_ALIAS)
        _warn_unread(env, DEFAULT_ENV_PREFIX, list(prefixes.values()))


def _warn_unread(env: Mapping[str, str], prefix: str, alias_prefixes: list[str]) -> None:
    """Log the ``prefix`` variables nothing reads, and backend options that a missing BACKEND ignores.

    Another backend's options are fine when ``BACKEND`` picks one (``.env.sample``
    sets every backend's), but a misspelled name, an alias's variables without
    ``ALIASES``, or a backend's options with ``BACKEND`` unset (so in-memory: each
    process on its own) are mistakes that would otherwise pass unnoticed.
    """
    # What a misspelled name is compared with: the variables this configuration reads.
    readable = {f"{prefix}ALIASES", *(prefix + name.upper() for name in CONSUMER_SETTINGS)}
    claimed: dict[str, str] = {}  # option prefix of a backend -> its alias's BACKEND variable
    for alias_prefix in alias_prefixes:
        backend_var = f"{alias_prefix}BACKEND"
        readable.add(backend_var)
        chosen = load_backend_class(env.get(backend_var, "").strip() or "inmemory")
        for backend in {chosen, *map(load_backend_class, BACKEND_ALIASES)}:
            option_prefix = f"{alias_prefix}{_env_name(backend)}_"
            claimed[option_prefix] = backend_var
            if backend is chosen:
                readable.update(option_prefix + option.upper() for option in backend_options(backend))
    unset_backends: dict[str, list[str]] = {}
    for var in sorted(env):
        if not var.startswith(prefix):
            continue
        owner = next((start for start in claimed if var.startswith(start)), None)
        if var not in readable and owner is None:
            close = difflib.get_close_matches(var, sorted(readable), n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            if alias_prefixes == [prefix] and var.endswith("_BACKEND"):
                hint = f"; an alias's variables are read only when {prefix}ALIASES names the alias"
            _warn_once(f"environment variable {var} is set but no setting reads it{hint}")
        elif owner is not None and claimed[owner] not in env and not owner.endswith("_INMEMORY_"):
            unset_backends.setdefault(owner, []).append(var)
    for owner, variables in unset_backends.items():
        backend_var = claimed[owner]
        name = owner[len(backend_var) - len("BACKEND") :].rstrip("_").lower()
        _warn_once(
            f"{', '.join(variables)} set but {backend_var} is not, so the layer is in-memory (each "
            f"process on its own) and ignores them; set {backend_var}={name}"
        )


#: Warnings already logged: a process may read its settings once per alias and event loop.
_warned: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        logger.warning("%s", text)


def get_channel_layer_from_env(
    environ: Mapping[str, str] | None = None,
    prefix: str = DEFAULT_ENV_PREFIX,
    alias: str = DEFAULT_LAYER_ALIAS,
) -> BaseChannelLayer:
    """Create the layer of ``alias`` from environment variables (in-memory when unset)."""
    layers = parse_channel_layers_from_env(environ, prefix=prefix, alias=alias)
    if alias not in layers:
        raise InvalidChannelLayerConfig(
            f"channel layer alias {alias!r} is not listed in {prefix}ALIASES ({sorted(layers)}); "
            f"add it there, with its {prefix}{_alias_infix(alias)}BACKEND and options"
        )
    return build_channel_layer(layers[alias])


# ------------------------------------------------------------ consumer settings

#: Settings every consumer of an app shares; each is also an environment variable
#: (``FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS``...). A value set on a consumer class wins over
#: the environment, and the environment over the defaults, which are the class
#: attributes of ``AsyncWebSocketConsumer``.
CONSUMER_SETTINGS: dict[str, Any] = {
    "allowed_origins": list[str] | None,
    "max_frame_bytes": int,
    "max_frames_per_second": float | None,
}
_POSITIVE_SETTINGS = frozenset({"max_frame_bytes", "max_frames_per_second"})


def check_consumer_setting(where: str, name: str, value: Any) -> Any:
    """Type- and range-check one consumer setting (``where`` names its source); return it normalized.

    A list given as a string is split on commas; limits must be positive.
    """
    annotation = CONSUMER_SETTINGS[name]
    value = _check_value(where, Option(name, annotation, None), value)
    # `not value > 0` also refuses NaN, which would make every comparison false.
    if name in _POSITIVE_SETTINGS and value is not None and not value > 0:
        raise InvalidChannelLayerConfig(f"{where} must be positive, got {value!r}")
    return value


def consumer_settings_from_env(
    environ: Mapping[str, str] | None = None, prefix: str = DEFAULT_ENV_PREFIX
) -> dict[str, Any]:
    """The consumer settings the environment sets, checked; unset variables are left out.

    ``{prefix}ALLOWED_ORIGINS`` is comma-separated (empty: the same-origin
    default), ``{prefix}MAX_FRAME_BYTES`` an integer and
    ``{prefix}MAX_FRAMES_PER_SECOND`` a number (empty: no limit).
    """
    env = os.environ if environ is None else environ
    settings: dict[str, Any] = {}
    for name, annotation in CONSUMER_SETTINGS.items():
        var = prefix + name.upper()
        text = env.get(var)
        if text is None:
            continue
        parse = _env_parser(annotation)
        if parse is None:  # pragma: no cover - every annotation above has a parser
            raise TypeError(f"no environment parser for {annotation}")
        try:
            value = parse(text)
        except ValueError as exc:
            raise InvalidChannelLayerConfig(
                f"{var}={text!r} is not valid: expected {_describe(annotation)}"
            ) from exc
        settings[name] = check_consumer_setting(f"{var}={text!r}", name, value)
    return settings
