"""Options declared once: a config dataclass's fields are its command line, its YAML keys and, for a build,
what the fingerprint hashes and the manifest records.

A field is an option: its name (``cutoff_len`` is ``--cutoff-len`` on the command line and ``cutoff_len`` in
YAML), its type and default, and its docstring (the string literal right after it), which documents it;
the docstring's first sentence is the option's ``--help`` line unless ``option(help=...)`` gives a shorter
one. :func:`option` declares what a field alone cannot say:

- ``output``: ``"option"`` when the value decides the output's bytes (hashed into the build fingerprint and
  recorded in the manifest's ``options``), ``"input"`` when it names an input whose content is hashed
  instead (the data files, the processor files).
- ``common``: listed first in ``--help``.
- ``stage``: which ``qvl-data`` commands take it (``read``: convert, validate and build; ``encode``:
  validate and build; ``write``: build).
- ``name``: the public name when the field's differs (``set_vars`` is ``--set-var`` / ``set_var:``).
- ``choices``, ``metavar``, and ``cli_only`` (why a YAML file may not set it true).

Both tools parse through :func:`click_options` and print usage mistakes with :func:`usage_error_line`:
one line, a did-you-mean for a mistyped option, never a silent prefix match.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING
from typing import Any

import click

OUTPUT_OPTION = "option"  # the value decides the bytes: hashed, and recorded in the manifest's options
OUTPUT_INPUT = "input"  # names an input whose content is hashed (and recorded in the manifest's own fields)
STAGES = ("read", "encode", "write")

#: click's parser applied to every option name: ``--max_steps`` is ``--max-steps`` (the YAML spelling
#: works on the command line too, without a second flag in --help).
CONTEXT_SETTINGS = {
    "help_option_names": ["-h", "--help"],
    "token_normalize_func": lambda token: token.replace("_", "-"),
    "max_content_width": 80,  # wrapped to 78, or narrower on a narrower terminal
}
BOOLEAN_HELP = "A yes/no option alone means true; --x false turns off one that is on."


def option(
    default: Any = MISSING,
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    help: str | None = None,
    common: bool = False,
    output: str | None = None,
    stage: str | None = None,
    name: str | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    cli_only: str | None = None,
) -> Any:
    """A dataclass field with the option's declaration in its metadata (see the module docstring)."""
    if output not in (None, OUTPUT_OPTION, OUTPUT_INPUT):
        raise ValueError(f"output must be {OUTPUT_OPTION!r} or {OUTPUT_INPUT!r}, got {output!r}")
    if stage not in (None, *STAGES):
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    metadata = {
        "help": help,
        "common": common,
        "output": output,
        "stage": stage,
        "name": name,
        "choices": tuple(choices) if choices else None,
        "metavar": metavar,
        "cli_only": cli_only,
    }
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(f: dataclasses.Field, key: str) -> Any:
    """One item of a field's declaration (None when not declared)."""
    return f.metadata.get(key)


def public_name(f: dataclasses.Field) -> str:
    """The option's YAML key (``set_var``); the field name unless declared otherwise."""
    return declared(f, "name") or f.name


def flag(f: dataclasses.Field) -> str:
    """The option's command-line spelling (``--set-var``)."""
    return "--" + public_name(f).replace("_", "-")


def output_options(cls: type) -> list[str]:
    """The fields whose values decide the output's bytes, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if declared(f, "output") == OUTPUT_OPTION]


def yaml_aliases(cls: type) -> dict[str, str]:
    """Public name -> field name, where they differ (``set_var`` -> ``set_vars``)."""
    return {public_name(f): f.name for f in dataclasses.fields(cls) if public_name(f) != f.name}


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


# ---------------------------------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal right after the field in the class body), over the
    dataclass and its dataclass bases (a field a subclass declares again takes the subclass's text)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def first_sentence(doc: str) -> str:
    """The --help line of a docstring: up to the first full stop that a capitalised sentence follows."""
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", doc.replace("``", ""), maxsplit=1)[0]


def short_help(f: dataclasses.Field, doc: str) -> str:
    text = declared(f, "help") or first_sentence(doc)
    default = default_of(f)
    if default not in (None, "", False, []) and "default" not in text.lower():
        text += f" [default: {str(default).lower() if isinstance(default, bool) else default}]"
    return text


# ----------------------------------------------------------------------------------------- click options


class _Bool(click.types.BoolParamType):
    """click's boolean with a plain message (click's lists every spelling, the empty string first)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not true or false (yes/no, 1/0 and on/off work too)", param, ctx)


BOOL = _Bool()
BOOL_METAVAR = "[BOOL]"
_CLICK_TYPES = {int: (click.INT, "N"), float: (click.FLOAT, "X"), bool: (BOOL, BOOL_METAVAR)}


def _click_type(kind: Any, f: dataclasses.Field) -> tuple[Any, str | None, bool]:
    """(click type, metavar, multiple) of a field's type: int, float, bool, str, ``str | None``, list[str]."""
    metavar = declared(f, "metavar")
    if declared(f, "choices"):
        return click.Choice(list(declared(f, "choices"))), metavar, False
    if typing.get_origin(kind) is list:
        return click.STRING, metavar or "TEXT", True
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    click_type, default_metavar = _CLICK_TYPES.get(args[0] if args else kind, (click.STRING, "TEXT"))
    return click_type, metavar or default_metavar, False


class ConfigOption(click.Option):
    """A generated option; ``common`` ones are listed first in --help."""

    def __init__(self, *args: Any, common: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.common = common

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record and self.type is BOOL:  # listed as a flag; the help's last line says --x false
            return record[0].removesuffix(" " + BOOL_METAVAR), record[1]
        return record


def click_options(cls: type, stages: Iterable[str] | None = None) -> list[click.Option]:
    """One click option per field of the config dataclass ``cls`` (only those of ``stages`` when given), the
    class's own fields first, then the ones it inherits. Every default is None: an option not given leaves
    the YAML's value or the field's default. A boolean takes ``--x`` alone (true) or ``--x true|false``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    own = list(cls.__dict__.get("__annotations__", {}))
    fields = sorted(dataclasses.fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own))
    wanted = None if stages is None else set(stages)
    options = []
    for f in fields:
        if wanted is not None and declared(f, "stage") not in wanted:
            continue
        click_type, metavar, multiple = _click_type(hints[f.name], f)
        # a boolean: --x alone is true; --x false (or no, 0, off) sets it off
        extra = {"is_flag": False, "flag_value": True} if click_type is BOOL else {}
        options.append(
            ConfigOption(
                [flag(f), f.name],
                type=click_type,
                default=None,
                multiple=multiple,
                metavar=metavar,
                help=short_help(f, docs.get(f.name, "")),
                common=declared(f, "common"),
                **extra,
            )
        )
    return options


def add_options(options: Sequence[click.Option]) -> Callable[[Callable], Callable]:
    """A decorator adding ``options`` to a click command, in order."""

    def decorate(fn: Callable) -> Callable:
        fn.__click_params__ = [*getattr(fn, "__click_params__", []), *reversed(options)]  # type: ignore[attr-defined]
        return fn

    return decorate


class OptionsCommand(click.Command):
    """A command whose --help lists the common options first, then the others."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        common, other = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            first = getattr(param, "common", False) or param.name == "config_path"
            (common if first else other).append(record)
        if not any(getattr(p, "common", False) for p in self.params):
            common, other = common + other, []
        with formatter.section("Options" if not other else "Common options"):
            formatter.write_dl(common)
        if other:
            with formatter.section("More options"):
                formatter.write_dl(other)
        if any(isinstance(p, ConfigOption) and p.type is BOOL for p in self.params):
            formatter.write_paragraph()
            formatter.write_text(BOOLEAN_HELP)


def config_option(help_text: str) -> click.Option:
    return click.Option(
        ["--config", "config_path"], type=click.Path(dir_okay=False), metavar="FILE.yaml", help=help_text
    )


def usage_error_line(error: click.ClickException, prog: str | None = None) -> str:
    """A click usage error in one line: the mistake, a did-you-mean for a mistyped option, where help is."""
    command = error.ctx.command_path if getattr(error, "ctx", None) else prog
    where = f" (see {command} --help)" if command else ""
    if isinstance(error, click.NoSuchOption):
        close = error.possibilities or _close_options(error)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"no such option {error.option_name}{hint}{where}"
    return error.format_message().rstrip(".") + where


def _close_options(error: click.NoSuchOption) -> list[str]:
    """click proposes a close option only for some mistakes; ask difflib over the command's options too."""
    if not getattr(error, "ctx", None):
        return []
    names = [n for p in error.ctx.command.params for n in getattr(p, "opts", []) if n.startswith("--")]
    return difflib.get_close_matches(error.option_name, names, n=3, cutoff=0.6)


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``known``, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
