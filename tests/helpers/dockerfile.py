"""Just enough of Docker's own reading of a Dockerfile and a .dockerignore for the tests
to ask what an image would be (no Docker engine here): stages, the configuration a stage
inherits (ENV, USER, EXPOSE, ENTRYPOINT, CMD, HEALTHCHECK, LABEL), the build context.

Follows the Dockerfile reference: line continuations, comments (also inside continued
instructions), exec (JSON) and shell forms, ``ENV k=v`` and legacy ``ENV k v``, ``$VAR``
and ``${VAR}`` from ARG and ENV; .dockerignore as moby's patternmatcher (``*``, ``?``,
``**``, ``!`` exceptions, last match wins, a match on a parent directory counts)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array form (``["a", "b"]``), or None for the shell form."""
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value)
            return value
        return None


@dataclass
class Stage:
    name: str | None
    base: str
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Config:
    """An image's configuration at the end of a stage (what `docker inspect` shows)."""

    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    exposed: set[str] = field(default_factory=set)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    healthcheck: tuple[dict[str, str], list[str]] | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        return [*(self.entrypoint or []), *(self.cmd or [])]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments, also between continued lines, are dropped
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1])
            continue
        buf.append(stripped)
        out.append((start, " ".join(b.strip() for b in buf if b.strip())))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


_VAR = re.compile(r"\$(?:\{(\w+)(:\+[^}]*)?\}|(\w+))")


def expand(value: str, variables: dict[str, str]) -> str:
    """``$X`` / ``${X}`` from ``variables``, and ``${X:+WORD}`` (WORD where X is set and not
    empty, else nothing) as the shell expands it; unknown ones (the base image's) stay as is."""

    def value_of(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name not in variables:
            return m.group(0)
        if m.group(2):
            return m.group(2)[2:] if variables[name] else ""
        return variables[name]

    return _VAR.sub(value_of, value)


class Dockerfile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.global_args: dict[str, str] = {}
        self.stages: list[Stage] = []
        for line, text in _logical_lines(path.read_text()):
            keyword, _, args = text.partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                words = args.split()
                words = [w for w in words if not w.startswith("--")]
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                self.stages.append(Stage(name, words[0], len(self.stages)))
            elif not self.stages:
                assert keyword == "ARG", f"line {line}: {keyword} before FROM"
                key, _, default = args.partition("=")
                self.global_args[key.strip()] = default.strip()
            else:
                self.stages[-1].instructions.append(Instruction(keyword, args, line))

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def final(self) -> Stage:
        """What ``docker build`` without ``--target`` produces."""
        return self.stages[-1]

    def parent(self, stage: Stage) -> Stage | None:
        """The earlier stage this one starts from (``FROM builder``), if any."""
        return next((s for s in self.stages[: stage.index] if s.name == stage.base), None)

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it builds on, the oldest first."""
        out = [stage]
        while (parent := self.parent(out[0])) is not None:
            out.insert(0, parent)
        return out

    def base_image(self, stage: Stage) -> str:
        return expand(self.chain(stage)[0].base, self.global_args)

    def config(self, stage: Stage) -> Config:
        config = Config()
        for s in self.chain(stage):
            args: dict[str, str] = {}
            for ins in s.instructions:
                variables = {**args, **config.env}
                if ins.keyword == "ARG":
                    key, eq, default = ins.args.partition("=")
                    key = key.strip()
                    args[key] = default.strip() if eq else self.global_args.get(key, "")
                elif ins.keyword == "ENV":
                    config.env.update(_pairs(ins.args, variables))
                elif ins.keyword == "LABEL":
                    config.labels.update(_pairs(ins.args, variables))
                elif ins.keyword == "USER":
                    config.user = expand(ins.args.strip(), variables)
                elif ins.keyword == "EXPOSE":
                    config.exposed |= {p.split("/")[0] for p in ins.args.split()}
                elif ins.keyword == "ENTRYPOINT":
                    config.entrypoint = ins.exec_form() or ["/bin/sh", "-c", ins.args]
                    config.cmd = None  # a new ENTRYPOINT resets CMD
                elif ins.keyword == "CMD":
                    config.cmd = ins.exec_form() or ["/bin/sh", "-c", ins.args]
                elif ins.keyword == "HEALTHCHECK":
                    config.healthcheck = _healthcheck(ins.args)
        return config


def _pairs(text: str, variables: dict[str, str]) -> dict[str, str]:
    words = shlex.split(text)
    if words and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
        return {words[0]: expand(" ".join(words[1:]), variables)}
    out: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        out[key] = expand(value, {**variables, **out})
    return out


def _healthcheck(text: str) -> tuple[dict[str, str], list[str]] | None:
    options: dict[str, str] = {}
    rest = text.strip()
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    kind, _, command = rest.partition(" ")
    if kind.upper() == "NONE":
        return None
    assert kind.upper() == "CMD", text
    ins = Instruction("CMD", command, 0)
    return options, ins.exec_form() or ["/bin/sh", "-c", command]


def duration_s(value: str) -> float:
    """A Dockerfile duration (``30s``, ``1m30s``, ``500ms``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


# --- .dockerignore ----------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    def __init__(self, path: Path) -> None:
        self.patterns: list[tuple[bool, re.Pattern[str], str]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            line = line[1:].strip() if negated else line
            cleaned = "/".join(p for p in line.strip("/").split("/") if p not in ("", "."))
            self.patterns.append((negated, _pattern_regex(cleaned), raw))

    def may_reinclude(self, rel_dir: str) -> bool:
        """Could an exception (``!pattern``) bring back something under this directory?"""
        dirs = rel_dir.split("/")
        for negated, _, raw in self.patterns:
            parts = raw.strip().lstrip("!").strip().strip("/").split("/")
            if not negated:
                continue
            if any("**" in p for p in parts):
                return True
            if len(parts) > len(dirs) and all(
                _pattern_regex(p).match(d) for p, d in zip(parts, dirs, strict=False)
            ):
                return True
        return False

    def excluded(self, rel: str) -> bool:
        """Is this context-relative path left out of the build context?"""
        parts = rel.strip("/").split("/")
        parents = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        matched = False
        for negated, regex, _ in self.patterns:
            if negated != matched:
                continue  # cannot change the outcome
            if regex.match(rel) or any(regex.match(p) for p in parents):
                matched = not negated
        return matched

    def context(self, root: Path) -> list[Path]:
        """Every file ``docker build root`` would send."""
        out = []
        stack = [root]
        while stack:
            for entry in sorted(stack.pop().iterdir()):
                rel = entry.relative_to(root).as_posix()
                if entry.is_dir() and not entry.is_symlink():
                    # A left-out directory is entered only if an exception may re-include
                    # something under it (moby does the same).
                    if not self.excluded(rel) or self.may_reinclude(rel):
                        stack.append(entry)
                elif not self.excluded(rel):
                    out.append(entry)
        return out
