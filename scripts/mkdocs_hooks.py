"""MkDocs hook: the command-line reference (docs/reference/cli.md), generated from the
`zdr` typer app when the docs are built.

The page holds the line ``<!-- zdr-cli-reference -->``; this hook puts every command
there (``zdr embedded ...`` too): its help, its usage, and a table of its arguments and
options with their types, defaults and environment variables.

Why not ``::: mkdocs-click``: the typer zdr uses (0.29) builds its commands on a copy
of click of its own (``typer._click``), whose options have no ``type``; mkdocs-click
0.9 reads ``click.Option.type`` and finds no option at all. Building the click command
also costs every `zdr` start, so it happens here, at build time, not in zdr.cli.
"""

from __future__ import annotations

import html
from typing import Any

MARKER = "<!-- zdr-cli-reference -->"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    import typer

    import zdr.cli.main

    command = typer.main.get_command(zdr.cli.main.app)
    return markdown.replace(MARKER, "\n".join(_command_docs(command, ["zdr"], depth=2)))


def _cell(text: str) -> str:
    """Text for a table cell: one line, no pipes that would cut the row."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "&#124;")


def _kind(param: Any, ctx: Any) -> str:
    """What the option takes: a flag, its metavar (URL, MODULE:CLASS), else its type."""
    if getattr(param, "is_flag", False):
        return "flag"
    if param.metavar and param.param_type_name == "option":
        return str(param.metavar)
    # typer 0.2x's own click: display_type() and min/max on the parameter; click 8.1
    # (under typer 0.12): the type's name and min/max on the type.
    display = getattr(param, "display_type", None)
    kind = str(display(ctx) if display is not None else param.type.name)
    kind = kind.strip("<>").replace("list[str]", "text, repeated")
    kind = {
        "str": "text",
        "int range": "integer",
        "integer range": "integer",
        "float range": "number",
    }.get(kind, kind)
    kind_of = getattr(param, "type", None)
    low = getattr(param, "min", getattr(kind_of, "min", None))
    high = getattr(param, "max", getattr(kind_of, "max", None))
    bounds = [f"≥ {low}" if low is not None else "", f"≤ {high}" if high is not None else ""]
    return " ".join([kind, *filter(None, bounds)])


def _command_docs(command: Any, path: list[str], depth: int) -> list[str]:
    ctx = command.context_class(command, info_name=path[-1])
    lines: list[str] = []
    if len(path) > 1:
        lines += [f"{'#' * depth} `{' '.join(path)}`", ""]
    if command.help:
        lines += [" ".join(command.help.split()), ""]
    usage = " ".join([*path, *command.collect_usage_pieces(ctx)])
    lines += ["```text", usage, "```", ""]
    rows = []
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        names = ", ".join(f"`{name}`" for name in [*param.opts, *param.secondary_opts])
        if param.param_type_name == "argument":
            names = f"`{param.metavar or param.name.upper()}`"
        kind = _kind(param, ctx)
        default = "" if param.required or param.default in (None, ()) else f"`{param.default}`"
        if param.required:
            default = "required"
        envvar = param.envvar if isinstance(param.envvar, str) else ", ".join(param.envvar or [])
        help_text = _cell(param.help or "")
        if envvar:
            help_text += f" (environment: `{envvar}`)"
        rows.append(f"| {names} | {_cell(str(kind))} | {help_text} | {default} |")
    if rows:
        lines += ["| argument or option | type | meaning | default |", "|---|---|---|---|"]
        lines += [*rows, ""]
    sub = getattr(command, "commands", None) or {}
    for name, child in sub.items():
        if not child.hidden:
            lines += _command_docs(child, [*path, name], depth + (len(path) > 1))
    return lines
