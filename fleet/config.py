"""Typed configuration: one draccus dataclass per process, nested the way the process is built.

Conventions (as in LeRobot, whose configs we embed):

- Every field has a one-line docstring right under it; that line is its ``--help`` text.
  Adding a knob is one field plus its docstring, in the config of the part that uses it,
  e.g. ``retention_max_bytes: int = 0`` + ``\"\"\"Bytes kept ...\"\"\"``; the flag
  (``--retention_max_bytes``), the config-file key and the help follow. Its one default lives there.
- Nested dataclasses are nested flags (``--spool.max_bytes=1e9``); one spelling per flag, the
  field's own name with underscores.
- A ``draccus.ChoiceRegistry`` field picks a class with ``--<field>.type=<name>`` and takes only
  that class's fields (``--policy.type=act --policy.dim_model=256``; ``--algorithm.type=recap``).
- ``--config_path=file.yaml`` (or .json) sets any of these; flags override the file.
- Values are YAML scalars or lists: ``--tasks='["reach the goal, carefully", "close the drawer"]'``;
  a bare string is one element (its commas are kept).
- Values are validated in ``__post_init__`` with the bad value in the message. Unknown keys, bad
  types and bad values end the process with status 2 and one line naming the key (``parse``).

This module is shared core: it imports neither ``edge`` nor ``cloud``; each process's config
lives next to the code that runs it, and ``fleet/cli.py`` composes them.
"""

from __future__ import annotations

import argparse
import ast
import contextvars
import dataclasses
import difflib
import functools
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from fleet.errors import ConfigError

T = TypeVar("T")

DEFAULT_TASKS = ("reach the goal", "press the button from the top", "close the drawer")
"""The MetaWorld tasks of the demo, the simulated fleet and the trainer's default task list."""


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``cond`` (for ``__post_init__`` validation)."""
    if not cond:
        raise ConfigError(message)



def suggest(word: str, choices, quote: str = "") -> str:
    """`` (did you mean X?)`` with the closest of ``choices`` (difflib), or ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {quote}{close[0]}{quote}?)" if close else ""


def flag_spelling(arg: str) -> str:
    """The flag of ``arg`` (``--a-b=1``) spelt as fields are (``--a_b``), to find the closest valid flag."""
    return "--" + arg.split("=", 1)[0][2:].replace("-", "_")


def _is_choice(tp: Any) -> bool:
    import draccus

    return isinstance(tp, type) and issubclass(tp, draccus.ChoiceRegistry)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_FACTORY_DEFAULTS: dict[Any, Any] = {}


def _default_of(f: dataclasses.Field) -> Any:
    """A field's default (a factory is called once: LeRobot's configs log when they pick a device)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    factory = f.default_factory
    if factory is dataclasses.MISSING:  # type: ignore[comparison-overlap]
        return dataclasses.MISSING
    if factory not in _FACTORY_DEFAULTS:
        _FACTORY_DEFAULTS[factory] = factory()  # type: ignore[operator]
    return _FACTORY_DEFAULTS[factory]


def _choice(tp: type, data: Any, default: Any, path: str) -> type:
    """The class a choice field ``tp`` picks: ``data["type"]`` if given, else the default's class."""
    name = data.get("type") if isinstance(data, dict) else None
    if name is None:
        if isinstance(default, tp):
            return type(default)
        name = tp.default_choice_name()
        if name is None:
            raise ConfigError(f"{path}.type is required: one of {', '.join(sorted(tp.get_known_choices()))}")
    try:
        return tp.get_choice_class(name)  # a registry may import its classes on demand (edge/robots/config.py)
    except KeyError:
        known = tp.get_known_choices()
        raise ConfigError(f'{path}.type "{name}" is not one of: {", ".join(sorted(known))}'
                          f"{suggest(str(name), known, quote=chr(34))}") from None


def _complete(cls: type, data: Any, path: str = "") -> dict:
    """Check ``data`` (a nested mapping) against ``cls``: raise ConfigError naming the first unknown key
    (with the closest valid one) and fill in the ``type`` of choice fields left at their default class."""
    what = f'"{path}"' if path else "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key == "type" and _is_choice(cls):
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            prefix = f"{path}." if path else ""
            moved = getattr(cls, "MOVED_KEYS", {}).get(key)
            hint = (f" (now {moved})" if moved else f' (did you mean "{prefix}{close[0]}"?)' if close
                    else f" (not a {cls.__name__} field; valid: {', '.join(fields)})")
            raise ConfigError(f'unknown key "{full}"{hint}')
        tp = _optional_of(hints[key]) if value is not None else hints[key]
        if _is_choice(tp) and isinstance(value, str):  # a bare choice name: "backend": "ros2"
            value = {"type": value}
        if _is_choice(tp):
            sub = _choice(tp, value, _default_of(fields[key]), full)
            inner = {k: v for k, v in value.items() if k != "type"} if isinstance(value, dict) else value
            out[key] = {"type": tp.get_choice_name(sub), **_complete(sub, inner, full)}
        elif _is_config(tp):
            out[key] = _complete(tp, value, full)
        else:
            out[key] = value
    return out


def _optional_of(tp: Any) -> Any:
    """``X`` for ``X | None``, else ``tp``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def _overlay(base: Any, over: Any) -> Any:
    """``over`` merged into ``base`` (nested mappings); a choice section whose ``type`` changes is replaced."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        switched = isinstance(value, dict) and isinstance(old, dict) and value.get("type", old.get("type")) != old.get("type")
        out[key] = value if switched or key not in out else _overlay(old, value)
    return out


def load(cls: type[T], data: Any, source: str = "") -> T:
    """An instance of ``cls`` from a nested mapping (a config file's content), or ConfigError naming the key."""
    import draccus
    from draccus.utils import DecodingError, ParsingError

    where = f"{source}: " if source else ""
    try:
        data = _complete(cls, data)
        try:
            defaults = draccus.encode(cls())  # nested defaults set by a parent (a demo's robots) are kept
        except Exception:  # noqa: BLE001 - a config with required fields: decode from what was given
            defaults = {}
        return draccus.decode(cls, _overlay(defaults, data))
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    except DecodingError as e:
        key = ".".join(str(k) for k in e.key_path)
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{where}{cause}") from None
        raise ConfigError(f"{where}{key}: {str(e.message).splitlines()[0]}") from None
    except ParsingError as e:
        cause = e.__cause__
        raise ConfigError(f"{where}{cause if isinstance(cause, ConfigError) else e}") from None


def _field_type(cls: type, parts: Sequence[str], values: dict[str, Any]) -> Any:
    """The annotation of the dotted field ``parts`` of ``cls`` (choice fields resolved from ``values``)."""
    tp: Any = cls
    for i, part in enumerate(parts):
        if _is_choice(tp):
            name = values.get(".".join(parts[:i] + ["type"]))
            try:
                tp = tp.get_choice_class(name) if name else tp
            except KeyError:
                return None
        if not _is_config(tp):
            return None
        f = {f.name: f for f in dataclasses.fields(tp)}.get(part)
        if f is None:
            return None
        hint = _optional_of(typing.get_type_hints(tp)[part])
        if _is_choice(hint) and values.get(".".join(parts[:i + 1] + ["type"])) is None:
            default = _default_of(f)
            tp = type(default) if dataclasses.is_dataclass(default) else hint
        else:
            tp = hint
    return tp


def cli_value(tp: Any, text: str) -> Any:
    """A flag's text as a value of type ``tp``: strings are kept as typed, other values read as YAML;
    a bare string given for a list is one element (its commas are kept)."""
    from draccus import cfgparsing

    if tp is str:
        return text
    value = cfgparsing.parse_string(text)
    if typing.get_origin(tp) in (tuple, list) and isinstance(value, str):
        return [value]
    return value


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of ``cls`` and its bases (from the class source, with ``ast``:
    draccus' own line scanner mistakes a docstring holding one colon for a field). ``tests/fleet/test_config.py``
    checks that every process config field has one, so a missing source cannot silently empty ``--help``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _help_of(cls: type, dest: str) -> str:
    """The docstring of the field ``dest`` (dotted), looked up in every choice class that may own it."""
    *parents, name = dest.split(".")
    owners: list[Any] = [cls]
    for part in [*parents, name]:
        found = []
        for owner in owners:
            for klass in (owner.get_known_choices().values() if _is_choice(owner) else [owner]):
                if not _is_config(klass) or part not in {f.name for f in dataclasses.fields(klass)}:
                    continue
                if part == name:
                    doc = field_docs(klass).get(name)
                    if doc:
                        return doc
                else:
                    found.append(_optional_of(typing.get_type_hints(klass)[part]))
        owners = found
    return ""


_NAMED_CHOICES: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("named_choices",
                                                                                      default=None)


def named_choices() -> frozenset[str] | None:
    """While ``parse`` builds its flag parser: the words of the command line (a superset of the choice names
    it gives, ``--backend.type=ros2``); else None, meaning all. draccus lists every registered class of a
    choice field to make its flags; a registry that imports its classes on demand (edge/robots/config.py)
    imports only the named ones then, so ``fleet edge`` of a simulated robot never imports LeRobot's device
    packages. A flag of a class named only in a ``--config_path`` file is found by a second, full build."""
    return _NAMED_CHOICES.get()


_HELP_WANTED: contextvars.ContextVar[bool] = contextvars.ContextVar("help_wanted", default=True)


def _docstrings_only_for_help() -> None:
    """draccus reads every field's docstring from its class's source (``inspect.getsource`` and a tokenizer
    per field: about a second for an edge config) to make help text. Only ``--help`` shows it: without it
    draccus gets an empty docstring, and with it each one is read once per process."""
    from draccus.wrappers import docstring

    read = docstring.get_attribute_docstring
    if getattr(read, "fleet_wrapped", False):
        return
    cached = functools.lru_cache(maxsize=None)(read)

    def get_attribute_docstring(some_dataclass: type, field_name: str) -> Any:
        if not _HELP_WANTED.get():
            return docstring.AttributeDocString()
        return cached(some_dataclass, field_name)

    get_attribute_docstring.fleet_wrapped = True  # type: ignore[attr-defined]
    docstring.get_attribute_docstring = get_attribute_docstring


def _flag_parser(cls: type, prog: str, description: str | None, named: frozenset[str] | None, helping: bool):
    from draccus.argparsing import ArgumentParser

    _docstrings_only_for_help()
    tokens = _NAMED_CHOICES.set(named), _HELP_WANTED.set(helping)
    try:
        parser = ArgumentParser(cls, prog=prog, description=description, preferred_help="below").parser
        parser.usage = f"{prog} [-h] [--config_path FILE] [--FIELD=VALUE ...]"
        for action in parser._actions:
            if action.dest not in ("help", "config_path") and not action.dest.endswith(".type"):
                if helping:
                    action.help = _help_of(cls, action.dest) or action.help
                if _field_type(cls, action.dest.split("."), {}) is bool:  # a bare --flag means true
                    action.nargs, action.const = "?", "true"
    finally:
        _NAMED_CHOICES.reset(tokens[0])
        _HELP_WANTED.reset(tokens[1])
    return parser


def parse(cls: type[T], args: Sequence[str], prog: str, description: str | None = None,
          exit_on_error: bool = True) -> T:
    """``cls`` from command-line ``args`` (draccus flags, ``--config_path``); exits 2 with one line naming
    the key on an unknown key, a bad type or a bad value (``exit_on_error=False``: raises ConfigError
    for those found after flag parsing), and 0 after ``--help``."""
    from draccus.utils import deflatten

    args = list(args)
    helping = "--help" in args or "-h" in args
    unknown = None
    if not helping:
        parser = _flag_parser(cls, prog, description, frozenset(a.split("=", 1)[-1] for a in args), helping)
        _raw_text(parser)
        parser.exit_on_error = False
        try:
            namespace, unknown = parser.parse_known_args(args)
        except argparse.ArgumentError:  # e.g. a misspelt choice: the full parser lists them all
            pass
    if unknown is None or any("." in flag_spelling(a) for a in unknown if a.startswith("--")):
        # --help, or a flag of a choice class the command line did not name (--backend.robot.port): all of them
        parser = _flag_parser(cls, prog, description, None, helping)
        if not helping:
            _raw_text(parser)
        namespace, unknown = parser.parse_known_args(args)
    if unknown:
        options = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})
        parts = [a + (suggest(flag_spelling(a), options) if a.startswith("--") else "") for a in unknown]
        parser.error(f"unrecognized arguments: {' '.join(parts)}")
    values = {k: v for k, v in vars(namespace).items() if v is not None}
    source = values.pop("config_path", None) or ""
    try:
        data: Any = {}
        if source:
            data = _read(source)
        flags: dict[str, Any] = {}
        for key, text in values.items():
            tp = _field_type(cls, key.split("."), values)
            if _is_config(tp) and not key.endswith(".type"):  # draccus: --section=file for one nested section
                flags[key] = {"type": text} if _is_choice_name(cls, key, text) else _read(text)
            else:
                flags[key] = cli_value(tp, text)
        merged = _overlay(data, deflatten(flags, sep=".")) if isinstance(data, dict) else data
        return load(cls, merged, source)
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _raw_text(parser: argparse.ArgumentParser) -> None:
    """As draccus does: raw text in, decoding in ``load`` (defaults are the config's)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.type = str


def _is_choice_name(cls: type, key: str, text: str) -> bool:
    """Whether ``--key=text`` names a class of the choice field ``key`` (``--backend=ros2``), not a file."""
    *parents, name = key.split(".")
    owner = _field_type(cls, parents, {}) if parents else cls
    if not _is_config(owner):
        return False
    hint = _optional_of(typing.get_type_hints(owner).get(name))
    return _is_choice(hint) and text in hint.get_known_choices()


def _read(path: str) -> Any:
    """A YAML or JSON config file's content, or ConfigError."""
    from draccus import cfgparsing

    try:
        with open(path) as fh:
            return cfgparsing.load_config(fh, file=path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"config file {path}: not YAML or JSON: {e}") from None


__all__ = ["DEFAULT_TASKS", "load", "named_choices", "parse", "require", "suggest", "cli_value", "flag_spelling"]
