"""The instructions a reader of the docs follows, read out of them: every command line of a
shell block in README.md and docs/*.md (and the command-shaped code spans of their prose),
the commands in the chart's values.yaml comments, its NOTES.txt and the Dockerfile's comments,
each split into the commands a shell would run. tests.helpers.docs_checks holds each against
the code; tests/unit/test_docs_commands.py runs it.

A command line that cannot be checked here (it needs a GPU or a cluster) carries a marker in
its comment, with the reason: ``# docs: unverified (needs a GPU)``."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.paths import CHART, ROOT

#: Fenced blocks read as shell; an unlabelled block is read as shell when its first line is
#: a command (SHELLISH), so that output blocks are left alone.
SHELL_LANGS = frozenset({"bash", "sh", "shell", "console", "zsh"})
#: The commands the docs give, as their first word (a path prefix such as .venv/bin/ aside).
KNOWN = ("make", "resnet-export", "resnet-serve", "helm", "docker", "podman", "pip", "curl",
         "kubectl", "python", "python3", "locust", "wrk")  # fmt: skip
SHELLISH = re.compile(
    r"^(\$ )?([A-Z_][A-Z0-9_]*=\S*\s+)*(\S*/)?(" + "|".join(map(re.escape, KNOWN)) + r")(\s|$)"
)
MARKER = re.compile(r"docs:\s*unverified\b\s*(?:\((?P<reason>[^)]*)\))?")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SEPARATORS = frozenset({"|", "||", "&&", ";", "&"})
_REDIRECT = re.compile(r"^\d?(>>?|<)")
_DUPLICATE = re.compile(r"(?<!\S)\d?>&\d+(?!\S)")


@dataclass(frozen=True)
class Command:
    """One simple command of a line: ``env`` assignments before it, its words."""

    env: dict[str, str]
    argv: list[str]

    @property
    def name(self) -> str:
        """The program, without the path it was called by (``.venv/bin/resnet-serve``)."""
        return self.argv[0].rsplit("/", 1)[-1] if self.argv else ""


@dataclass
class Line:
    """A command line as the reader sees it: in a shell block (``fenced``) or a code span of
    prose. ``where`` is ``path:line``; ``context`` names the block or page it belongs to
    (a `helm test` is checked against the release the same block installed)."""

    where: str
    text: str
    comment: str = ""
    fenced: bool = True
    context: str = ""
    commands: list[Command] = field(default_factory=list)
    error: str = ""  # what kept the line from being split into commands

    @property
    def marker(self) -> re.Match[str] | None:
        return MARKER.search(self.comment)


def split_commands(text: str) -> list[Command]:
    """A line's simple commands: split at pipes, ``&&``, ``||``, ``;`` and ``&``, with
    redirections and their targets dropped and leading ``NAME=value`` taken as the
    command's environment (raises ValueError where a shell could not read it either)."""
    text = _DUPLICATE.sub(" ", text)  # 2>&1: a redirection, not a `&`
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    words = list(lexer)
    out: list[Command] = []
    current: list[str] = []
    for word in [*words, ";"]:
        if word in _SEPARATORS:
            if current:
                out.append(_command(current))
            current = []
        else:
            current.append(word)
    return out


def _command(words: list[str]) -> Command:
    argv: list[str] = []
    env: dict[str, str] = {}
    skip = False
    for word in words:
        if skip:
            skip = False
        elif m := _REDIRECT.match(word):
            skip = m.end() == len(word)  # "> file": the target is the next word
        elif not argv and _ENV.match(word):
            key, value = word.split("=", 1)
            env[key] = value
        else:
            argv.append(word)
    return Command(env, argv)


def _strip_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one physical shell line: a ``#`` outside quotes that starts a
    word begins the comment."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def shell_lines(lines: list[str], where: str, first: int, context: str) -> Iterator[Line]:
    """The logical command lines of a shell block (``lines``, the first at line ``first``):
    ``\\`` continuations joined, ``$ `` prompts honoured (then only prompted lines are
    commands; the rest is output), comment-only lines skipped (one holding a marker marks
    the next command line)."""
    prompted = any(raw.lstrip().startswith("$ ") for raw in lines)
    i, pending = 0, ""  # a marker on a comment line of its own is for the next line
    while i < len(lines):
        start, raw = i, lines[i].strip()
        i += 1
        if prompted:
            if not raw.startswith("$ "):
                continue
            raw = raw[2:]
        code, comment = _strip_comment(raw)
        if not code:
            pending = comment if MARKER.search(comment) else pending
            continue
        parts, comments = [code], [c for c in (pending, comment) if c]
        pending = ""
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1]
            code, comment = _strip_comment(lines[i].strip())
            parts.append(code)
            comments += [comment] if comment else []
            i += 1
        text = " ".join(p.strip() for p in parts).strip()
        if text:
            yield _line(f"{where}:{first + start}", text, " ".join(comments), True, context)


def _line(where: str, text: str, comment: str, fenced: bool, context: str) -> Line:
    line = Line(where, text, comment, fenced, context)
    try:
        line.commands = split_commands(text)
    except ValueError as exc:  # an unclosed quote
        line.error = f"not a shell line ({exc})"
    return line


@dataclass
class Page:
    """A text the docs checker reads: its path (relative to the repository) and lines."""

    path: str
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


def markdown_pages(root: Path = ROOT) -> list[Page]:
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [Page(str(p.relative_to(root)), p.read_text()) for p in pages]


@dataclass
class Markdown:
    """A page split into its shell blocks' lines, its other blocks, and its prose."""

    lines: list[Line] = field(default_factory=list)
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line number, paragraph)
    blocks: list[tuple[int, str, list[str]]] = field(default_factory=list)  # every fenced one


def read_markdown(page: Page) -> Markdown:
    out = Markdown()
    lines = page.lines
    i, para_start = 0, 0
    paragraph: list[str] = []
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            if not lines[i].strip():
                if paragraph:
                    out.prose.append((para_start, "\n".join(paragraph)))
                paragraph = []
            else:
                if not paragraph:
                    para_start = i + 1
                paragraph.append(lines[i])
            i += 1
            continue
        if paragraph:
            out.prose.append((para_start, "\n".join(paragraph)))
            paragraph = []
        indent, fence, lang = len(m["indent"]), m["fence"], m["lang"].lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            # A fence indented in a list: its lines carry the same indent.
            keep = not indent or lines[j][:indent].isspace()
            body.append(lines[j][indent:] if keep else lines[j].lstrip())
            j += 1
        out.blocks.append((i + 2, lang, body))
        first = next((b.strip() for b in body if b.strip()), "")
        if lang in SHELL_LANGS or (not lang and SHELLISH.match(first)):
            context = f"{page.path}:{i + 1}"
            out.lines += shell_lines(body, page.path, i + 2, context)
        i = j + 1
    if paragraph:
        out.prose.append((para_start, "\n".join(paragraph)))
    return out


_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def code_spans(start: int, text: str) -> Iterator[tuple[int, str]]:
    """(line number, content) of every code span of a paragraph that starts at ``start``
    (a span may run over a line break, which counts as a space)."""
    for m in _SPAN.finditer(text):
        yield start + text.count("\n", 0, m.start()), " ".join(m[2].split())


def prose_lines(page: Page, md: Markdown) -> Iterator[Line]:
    """The code spans of a page's prose that are commands (they start with one of KNOWN)."""
    for start, paragraph in md.prose:
        for number, span in code_spans(start, paragraph):
            if SHELLISH.match(span):
                yield _line(f"{page.path}:{number}", span, "", False, page.path)


def comment_blocks(path: str, text: str) -> Iterator[tuple[int, list[str]]]:
    """Runs of consecutive ``#`` comment lines (their text without the ``#``), with the
    line number of the first: the prose of a YAML or Dockerfile."""
    run: list[str] = []
    first = 0
    for number, raw in enumerate([*text.splitlines(), ""], 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            if not run:
                first = number
            run.append(stripped[1:])
        elif run:
            yield first, run
            run = []


def commented_lines(path: str, text: str) -> Iterator[Line]:
    """Commands in the comments of a YAML file or a Dockerfile: an indented comment line
    that starts with a command (``#   docker build ...``), continuations joined, and the
    command-shaped code spans of the comments' prose."""
    for first, run in comment_blocks(path, text):
        i = 0
        while i < len(run):
            if run[i].startswith("  ") and SHELLISH.match(run[i].strip()):
                body = [run[i]]
                while body[-1].rstrip().endswith("\\") and i + 1 < len(run):
                    i += 1
                    body.append(run[i])
                yield from shell_lines(body, path, first + i - len(body) + 1, f"{path}:{first}")
            i += 1
        for number, span in code_spans(first, "\n".join(run)):
            if SHELLISH.match(span):
                yield _line(f"{path}:{number}", span, "", False, path)


def notes(values: dict, release: str = "rel", namespace: str = "ml", chart: Path = CHART) -> str:
    """The chart's NOTES.txt as `helm install` prints it for ``values``."""
    import helm_python as helm

    with helm.Chart.load(chart) as loaded:
        out = loaded.render(values=values, name=release, namespace=namespace)
    return next(t for p, t in out.items() if p.endswith("NOTES.txt"))


def notes_lines(scenario: str, text: str) -> Iterator[Line]:
    """The commands NOTES.txt prints in one scenario: its indented command lines and the
    command-shaped code spans of its prose."""
    where = f"helm/resnet-serving/templates/NOTES.txt [{scenario}]"
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("  ") and SHELLISH.match(raw.strip()):
            yield from shell_lines([raw], where, number, scenario)
    for number, span in code_spans(1, text):
        if SHELLISH.match(span):
            yield _line(f"{where}:{number}", span, "", False, scenario)


@dataclass
class Step:
    """One shell block of a walkthrough, with the block that shows its output (if the next
    block is not a shell block)."""

    where: str
    lines: list[Line]
    output_lang: str | None = None
    output: list[str] = field(default_factory=list)


def walkthrough(page: Page, heading: str) -> list[Step]:
    """The shell blocks of the section of ``page`` under ``## heading``, in order (a block of
    another language is left out: tests.helpers.docs_commands.python_blocks has those)."""
    lines = page.lines
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    steps: list[Step] = []
    for first, lang, body in read_markdown(page).blocks:
        if not start < first <= end:
            continue
        shell = lang in SHELL_LANGS or (
            not lang and SHELLISH.match(body[0].strip() if body else "")
        )
        if shell:
            where = f"{page.path}:{first - 1}"
            steps.append(Step(where, list(shell_lines(body, page.path, first, where))))
        elif lang in ("", "json", "text") and steps and steps[-1].output_lang is None:
            steps[-1].output_lang, steps[-1].output = lang, body
    return steps


def python_blocks(page: Page, heading: str) -> list[tuple[str, str]]:
    """(where, code) of the ```python blocks of the section under ``## heading``."""
    lines = page.lines
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [
        (f"{page.path}:{first - 1}", "\n".join(body))
        for first, lang, body in read_markdown(page).blocks
        if lang == "python" and start < first <= end
    ]
