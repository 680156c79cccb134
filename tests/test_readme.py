"""The README and docs stay true: the first two commands are the ones CI and a fresh machine run, Markdown
tables are unbroken, every `captioner ...` command line parses with the real parser, the checkpoint the
README names is the one the code loads, and every linked file exists."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from captioner.apps.cli import build_parser

README = REPO_ROOT / "README.md"
DOCS = [README, *sorted((REPO_ROOT / "docs").glob("*.md")), *sorted((REPO_ROOT / "checkpoints").glob("*/MODEL_CARD.md"))]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # D, F, RUN, CKPT, E, LR: a value the reader fills in
SUBCOMMANDS = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse keeps them there)


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def _readme_commands() -> list[str]:
    return _bash_blocks(README.read_text())


def test_first_command_installs_and_captions_the_examples():
    first = _readme_commands()[0]
    assert first.startswith("pip install -e .") and "captioner caption demo/examples" in first
    assert (REPO_ROOT / "demo" / "examples").is_dir()


def test_ci_runs_the_readme_test_command_in_a_fresh_venv_with_shared_data_required():
    test_command = _readme_commands()[1]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    lines = ci.splitlines()
    assert test_command in lines
    assert "CAPTIONER_REQUIRE_SHARED_DATA=1" in ci
    venv = next(i for i, line in enumerate(lines) if re.match(r"python3? -m venv --clear", line))
    activate = next(i for i, line in enumerate(lines) if re.search(r"^\. \S+/bin/activate$", line))
    assert venv < activate < lines.index(test_command)


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 250


def _broken_tables(text: str) -> list[str]:
    """Lines starting with '|' outside code that are not part of a table (no header separator above)."""
    problems, fence, in_table = [], False, False
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fence = not fence
        if fence:
            continue
        row = line.lstrip().startswith("|")
        if row and not in_table:
            following = lines[number] if number < len(lines) else ""
            if re.match(r"^\s*\|?\s*:?-{3,}", following):
                in_table = True
            else:
                problems.append(f"line {number}: {line[:80]}")
        elif not row:
            in_table = False
    return problems


def test_the_table_checker_finds_a_broken_table():
    assert _broken_tables("| a | b |\n| --- | --- |\n| 1 | 2 |\n") == []
    assert _broken_tables("| a | b |\n| --- | --- |\n| 1 | 2 |\ntext\n| 3 | 4 |\n") == ["line 5: | 3 | 4 |"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_markdown_tables_are_unbroken(path):
    assert _broken_tables(path.read_text()) == [], f"{path.name}: a paragraph line breaks a table"


def _command_lines(text: str) -> list[tuple[str, bool]]:
    """(command, complete) for every `captioner SUBCOMMAND ...`: the lines of bash blocks are complete
    commands (continuations joined; `torchrun ... -m captioner` and `python -m captioner` too); inline code
    spans that start with `captioner SUBCOMMAND` may be fragments that name a command and some of its flags."""
    found = []
    for block in _bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|;|\|", line.split(" #")[0]):
                command = re.sub(r"^.*?(?:\btorchrun\b.*?|python3? )-m captioner\b", "captioner", command.strip())
                if command.startswith("captioner "):
                    found.append((command, True))
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    found += [(span, False) for span in re.findall(r"`(captioner [^`]+)`", prose)]
    return [(c, complete) for c, complete in found if c.split()[1] in SUBCOMMANDS]


def _lenient_parser(complete: bool = True) -> argparse.ArgumentParser:
    """The real parser, except that a typed option accepts a placeholder (`--epochs E`): docs may name values
    the reader fills in; and, for a fragment (`complete` False), nothing is required. Errors raise instead of
    exiting."""
    parser = build_parser()
    parsers = [parser, *parser._subparsers._group_actions[0].choices.values()]  # noqa: SLF001
    for each in parsers:
        each.exit_on_error = False
        for action in each._actions:  # noqa: SLF001
            if callable(action.type):
                action.type = (lambda original: lambda value: value if PLACEHOLDER.match(value) else original(value))(
                    action.type)
            if not complete and each is not parser:
                action.required = False
                if not action.option_strings:  # a positional argument
                    action.nargs = "*" if action.nargs in ("+", "*") else "?"
                    action.default = action.default if action.nargs == "*" else None
                elif action.nargs is None:  # prose may name an option without its value
                    action.nargs = "?"

        def fail(message, each=each):
            raise ValueError(f"{each.prog}: {message}")

        each.error = fail
    return parser


def _argv(command: str) -> list[str]:
    """The words of a documented command, with optional parts `[--strategy greedy]` taken and `...` dropped."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))[1:]
    return [w for w in words if w not in ("...", "…")]


def _documented_commands() -> list[tuple[str, str, bool]]:
    return [(str(path.relative_to(REPO_ROOT)), command, complete) for path in DOCS
            for command, complete in _command_lines(path.read_text())]


def test_the_docs_name_commands():
    commands = [c for _, c, complete in _documented_commands() if complete]
    assert any(c.startswith("captioner caption demo/examples") for c in commands)
    assert any(c.startswith("captioner train ") for c in commands) and len(commands) > 20


@pytest.mark.parametrize("where, command, complete", _documented_commands())
def test_documented_command_parses(where, command, complete, capsys):
    try:
        _lenient_parser(complete).parse_args(_argv(command))
    except SystemExit as done:  # --help and --version print and exit 0
        assert done.code == 0, f"{where}: `{command}` exits {done.code}"
    except (ValueError, argparse.ArgumentError) as error:
        pytest.fail(f"{where}: `{command}` does not parse: {error}")


def test_a_wrong_flag_in_the_docs_would_be_caught():
    with pytest.raises(ValueError, match="unrecognized arguments"):
        _lenient_parser().parse_args(_argv("captioner evaluate --data D --no-such-flag"))
    with pytest.raises((ValueError, argparse.ArgumentError)):
        _lenient_parser().parse_args(_argv("captioner train --data D --features F --out R --epochs two"))
    with pytest.raises(ValueError, match="required"):
        _lenient_parser().parse_args(_argv("captioner train --data D"))
    _lenient_parser(complete=False).parse_args(_argv("captioner train --init-from CKPT"))  # a fragment
    with pytest.raises(ValueError, match="unrecognized arguments"):
        _lenient_parser(complete=False).parse_args(_argv("captioner train --no-such-flag"))


def test_the_readme_names_the_checkpoint_the_code_loads():
    from captioner.checkpoint import SHIPPED_CHECKPOINT, default_checkpoint_path

    readme = README.read_text()
    assert f"`{SHIPPED_CHECKPOINT}`" in readme and f"checkpoints/{SHIPPED_CHECKPOINT}/MODEL_CARD.md" in readme
    assert default_checkpoint_path().name == SHIPPED_CHECKPOINT
    shipped_rows = [line for line in readme.splitlines() if line.startswith("| **shipped")]
    assert shipped_rows and all(SHIPPED_CHECKPOINT in row for row in shipped_rows)


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_linked_files_exist(path):
    missing = [target for target in _links(path) if not (path.parent / target.split("#")[0]).exists()]
    assert missing == [], f"{path.name} links to files that do not exist: {missing}"
