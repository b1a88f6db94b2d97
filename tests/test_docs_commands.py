"""Every ``muse`` command line a reader can copy from README.md and docs/*.md parses with the CLI's own
parser, required options included (no command runs: this is about what the documents say).

The extraction rule (documents added later are checked the same way):

- fenced code blocks whose info string is ``bash``, ``sh`` or ``shell`` (every line is a command) or
  ``console`` (a command and its output: only the lines after a ``$ `` prompt are commands);
- a line ending in ``\\`` continues on the next; ``# ...`` comments are dropped (shell rules,
  :func:`shlex.split` with comments);
- leading ``VAR=value`` assignments are skipped, and so are ``docker compose run [OPTIONS] SERVICE``
  and ``python -m muse_cli`` in front of the command;
- what starts with the word ``muse`` then is a command line: it must parse, and it must give the
  options its command requires (argparse's required options, the keys a ``--config`` command
  requires unless ``--config`` is given, and ``muse compare``'s ``--dataset`` unless it shows or
  lists stored comparisons).

Placeholders are fine where the option takes a string (``--dataset NAME``); where it takes a number
the document must show one (``muse rank show 3``, not ``muse rank show RUN``). A synopsis (``[--json]``,
``scl|i2i``) is not copyable as written: it goes in a ``text`` block. A ``muse`` line in a block without
an info string fails the check until the block says which it is.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
from pathlib import Path

import pytest

from muse_cli import config_files
from muse_cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = ("bash", "sh", "shell")
PROMPT_BLOCKS = ("console",)
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def code_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, line number of the first line, lines) of every fenced code block."""
    out: list[tuple[str, int, list[str]]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(2)
                out.append((m.group(3), number + 1, []))
            continue
        if m and m.group(2).startswith(fence[0]) and len(m.group(2)) >= len(fence) and not m.group(3):
            fence = None
            continue
        out[-1][2].append(line)
    return out


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every command line of the document's shell code blocks."""
    out: list[tuple[int, str]] = []
    for info, first, lines in code_blocks(text):
        if info not in SHELL_BLOCKS + PROMPT_BLOCKS:
            continue
        pending, start = "", 0
        for number, line in enumerate(lines, first):
            stripped = line.strip()
            if not pending:
                if info in PROMPT_BLOCKS:
                    if not stripped.startswith("$ "):
                        continue  # output
                    stripped = stripped[2:]
                start = number
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            out.append((start, pending + stripped))
            pending = ""
    return out


def muse_argv(line: str) -> list[str] | None:
    """The arguments after ``muse`` when ``line`` is a muse command line (the rule above), else None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    if words[:3] == ["docker", "compose", "run"]:
        words = words[3:]
        while words and words[0].startswith("-"):
            words = words[1:] if "=" in words[0] or words[0] in ("--rm", "-d", "--no-deps", "-T") else words[2:]
        words = words[1:]  # the service
    if words[:3] in (["python", "-m", "muse_cli"], ["python3", "-m", "muse_cli"]):
        words = ["muse", *words[3:]]
    if not words or words[0] != "muse":
        return None
    return words[1:]


def documented_commands() -> list[tuple[str, list[str]]]:
    """``("FILE:LINE", argv)`` of every muse command line of the documents."""
    found = []
    for doc in DOCUMENTS:
        for number, line in shell_lines(doc.read_text(encoding="utf-8")):
            argv = muse_argv(line)
            if argv is not None:
                found.append((f"{doc.relative_to(ROOT)}:{number}", argv))
    return found


def check(argv: list[str]) -> str | None:
    """Why ``muse ARGV`` would not run as written (argparse's message or a missing required option),
    or None."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0:  # --help, --version
            return None
        return err.getvalue().strip().splitlines()[-1]
    func = getattr(args, "func", None)
    if isinstance(func, functools.partial) and func.func is config_files.run_with_config:
        parser, command, _, required = func.args
        keys = config_files.file_keys(parser)
        if not getattr(args, "config", None):
            for key in required:
                if getattr(args, keys[key].dest, None) in (None, [], ""):
                    return f"`{command}` needs {keys[key].option_strings[0]}"
            if command == "muse compare" and not (args.dataset or args.show is not None or args.list):
                return "`muse compare` needs --dataset (or --show ID / --list)"
    return None


COMMANDS = documented_commands()


def test_the_rule_finds_the_commands_of_every_kind() -> None:
    """The extraction itself: continuation lines, prompts, comments, assignments and wrappers."""
    text = ("Text `muse nothing`\n```bash\nmuse db upgrade   # comment\nMUSE_X=1 muse data list \\\n  --json\n"
            "docker compose run --rm worker-cpu muse backfill --source scl --dataset NAME\n"
            "python -m muse_cli rank list\necho muse\n```\n```python\nmuse = 1\n```\n"
            "```console\n$ muse compare --list\nmuse output that is no command\n```\n"
            "```text\nmuse data list [--json]\n```\n")
    argvs = [muse_argv(line) for _, line in shell_lines(text)]
    assert [a for a in argvs if a is not None] == [
        ["db", "upgrade"], ["data", "list", "--json"], ["backfill", "--source", "scl", "--dataset", "NAME"],
        ["rank", "list"], ["compare", "--list"]]
    assert check(["rank", "train", "--model", "muse"]) == "`muse rank train` needs --dataset"
    assert check(["retrieve", "search", "--source", "scl", "--user", "17", "--items", "5,9"]).endswith(
        "the following arguments are required: --dataset")
    assert check(["rank", "show", "RUN"]) is not None and check(["rank", "show", "3"]) is None
    assert len(COMMANDS) >= 20 and any(where.startswith("docs/") for where, _ in COMMANDS)


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where: str, argv: list[str]) -> None:
    problem = check(argv)
    assert problem is None, f"{where}: `muse {' '.join(argv)}`: {problem}"


def test_no_muse_line_sits_in_an_untagged_block() -> None:
    """A block without an info string is neither checked nor a synopsis: say which it is."""
    untagged = [f"{doc.relative_to(ROOT)}:{first}" for doc in DOCUMENTS
                for info, first, lines in code_blocks(doc.read_text(encoding="utf-8"))
                if not info and any(re.match(r"^(\$ )?muse\s", ln.strip()) for ln in lines)]
    assert untagged == [], "tag these blocks bash/console (copyable, checked) or text (a synopsis)"


def test_every_command_group_is_documented() -> None:
    """Each command group of the CLI appears in at least one copyable line."""
    groups = {argv[0] for _, argv in COMMANDS if argv}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) <= groups, set(sub.choices) - groups
