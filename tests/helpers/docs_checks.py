"""The docs' instructions held against the code, without running them: each command line
that tests.helpers.docs_commands reads out of the docs (README.md, docs/*.md, the chart's
values.yaml comments and NOTES.txt, the Dockerfile's comments) goes to the check of its
program, and every name the docs use is looked up where it is defined.

- ``resnet-export``, ``resnet-serve``: the real command tree (typer's click commands): the
  subcommand exists, every option exists, values parse (choices, ranges), required options
  and arguments are there. A code span of prose that gives one option names a mode
  (`resnet-export demo --precision int8`); with an argument or two options it is a command
  a reader copies, checked whole. ``...`` stands for what was left out (no required check).
- ``make``: targets and variables the Makefile defines.
- ``helm``: the chart path; ``--set`` and ``-f`` values validated by values.schema.json over
  the chart's defaults, then rendered by Helm's engine; `helm test` of a release the docs
  installed: its test pod is admitted to the gateway's HTTP port by the rendered
  NetworkPolicies. ``kubectl`` on a release's objects: they exist, with those ports.
- ``docker``/``podman build``: ``--target`` a stage, ``--build-arg`` an ARG; ``run``: the
  published container ports are exposed by the image the docs built.
- ``pip install``: extras of this project exist; a pin of a package pyproject.toml pins is
  the same pin.
- ``curl``: a route of the gateway (method and path template) answers the URL's path.
- ``python``: ``-c`` code compiles and what it imports exists; ``-m`` modules exist.
- Names anywhere in the texts: ``RESNET_SERVE_*`` settings, ``resnet_serve_*`` metrics of
  the gateway's registry (and the recording rules), PromQL of the docs (metrics, labels,
  rate() of counters only), the metric table's label lists, ``--build-arg``, chart value
  paths, repository paths and dotted Python names; a project function named as if it were a
  command; every statement of the NVIDIA driver a CUDA 13 image needs agreeing; a Job's
  claim one the chart makes; a Triton flag the docs say the chart sets named with the value
  that sets it.

A line marked ``# docs: unverified (reason)`` is excused from having a check of its own
(it needs a GPU or a cluster); the parts that have one are still checked."""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import itertools
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import yaml

from tests.helpers import docs_commands as dc
from tests.helpers import promql
from tests.helpers.dockerfile import Dockerfile
from tests.helpers.paths import CHART, ROOT

#: Programs a command's output is piped through to look at it: nothing to check.
FILTERS = frozenset({"grep", "head", "tail", "jq", "sort", "uniq", "wc", "tee", "cut", "less"})
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*.yaml"))


@dataclass(frozen=True)
class Finding:
    where: str
    problem: str
    text: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}" + (f"\n    {self.text}" if self.text else "")


@dataclass
class Report:
    """What the checker read and what it found: command lines checked, command lines marked
    unverifiable (with the reason), names looked up, and the findings."""

    checked: list[dc.Line] = field(default_factory=list)
    marked: list[tuple[dc.Line, str]] = field(default_factory=list)
    names: int = 0
    findings: list[Finding] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"docs checker: {len(self.checked)} command lines checked, "
            f"{len(self.marked)} marked unverifiable, {self.names} names looked up, "
            f"{len(self.findings)} findings"
        ]
        lines += [
            f"  marked: {line.where}: {line.text}  ({reason})" for line, reason in self.marked
        ]
        return "\n".join(lines)


# --- the sources ------------------------------------------------------------------------


@dataclass
class Sources:
    """The texts the checker reads. Built from the repository, or (tests of the checker)
    with a page replaced: ``Sources.of(pages={"docs/api.md": text})``."""

    pages: list[dc.Page]
    values_yaml: str
    dockerfile: str
    chart: Path = CHART

    @classmethod
    def of(cls, root: Path = ROOT, pages: dict[str, str] | None = None) -> Sources:
        found = {p.path: p.text for p in dc.markdown_pages(root)}
        found.update(pages or {})
        values = found.pop("helm/resnet-serving/values.yaml", None)
        docker = found.pop("Dockerfile", None)
        return cls(
            [dc.Page(path, text) for path, text in found.items()],
            values
            if values is not None
            else (root / CHART.relative_to(ROOT) / "values.yaml").read_text(),
            docker if docker is not None else (root / "Dockerfile").read_text(),
        )

    def markdown(self) -> Iterator[tuple[dc.Page, dc.Markdown]]:
        for page in self.pages:
            yield page, dc.read_markdown(page)

    def notes(self) -> dict[str, str]:
        """NOTES.txt as each ci scenario's `helm install` prints it (and with no values)."""
        return {name: dc.notes(scenario_values(name, self.chart), chart=self.chart)
                for name in ["defaults", *SCENARIOS]}  # fmt: skip

    def texts(self) -> Iterator[tuple[str, str]]:
        """(path, text) of everything read for names: pages, values.yaml's comments, the
        Dockerfile's comments, NOTES.txt as written."""
        for page in self.pages:
            yield page.path, page.text
        yield "helm/resnet-serving/values.yaml", _comments(self.values_yaml)
        yield "Dockerfile", _comments(self.dockerfile)
        yield (
            "helm/resnet-serving/templates/NOTES.txt",
            (self.chart / "templates" / "NOTES.txt").read_text(),
        )

    def lines(self) -> list[dc.Line]:
        out: list[dc.Line] = []
        for page, md in self.markdown():
            out += md.lines
            out += dc.prose_lines(page, md)
        out += dc.commented_lines("helm/resnet-serving/values.yaml", self.values_yaml)
        out += dc.commented_lines("Dockerfile", self.dockerfile)
        for name, text in self.notes().items():
            out += dc.notes_lines(name, text)
        return out


def _comments(text: str) -> str:
    """A YAML file's or Dockerfile's comments, other lines blanked (numbers kept)."""
    return "\n".join(
        line.split("#", 1)[1] if line.strip().startswith("#") else "" for line in text.splitlines()
    )


def scenario_values(name: str, chart: Path = CHART) -> dict[str, Any]:
    if name == "defaults":
        return {}
    return yaml.safe_load((chart / "ci" / f"{name}-values.yaml").read_text()) or {}


# --- the code the docs are held against ---------------------------------------------------


class Code:
    """What the docs describe, read from the code once: the command trees, the Makefile, the
    Dockerfile, the chart, pyproject.toml, the settings, the gateway's metrics and routes."""

    def __init__(self, root: Path = ROOT, chart: Path = CHART) -> None:
        self.root, self.chart = root, chart

    @functools.cached_property
    def clis(self) -> dict[str, Any]:
        import typer

        from export.cli import app as export_app
        from service.tools.cli import app as serve_app

        return {
            "resnet-export": typer.main.get_command(export_app),
            "resnet-serve": typer.main.get_command(serve_app),
        }

    @functools.cached_property
    def makefile(self) -> tuple[set[str], set[str]]:
        text = (self.root / "Makefile").read_text()
        targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
        variables = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:+]?=", text, re.M))
        return targets, variables

    @functools.cached_property
    def pyproject(self) -> dict[str, Any]:
        return tomllib.loads((self.root / "pyproject.toml").read_text())

    @functools.cached_property
    def pins(self) -> dict[str, str]:
        """Package -> version, for every ``==`` pin of pyproject.toml."""
        project = self.pyproject["project"]
        out = {}
        specs = [s for group in project["optional-dependencies"].values() for s in group]
        for spec in [*project["dependencies"], *specs]:
            if m := re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)(?:\s*;.*)?", spec):
                out[_canonical(m[1])] = m[2]
        return out

    @functools.cached_property
    def env_names(self) -> set[str]:
        from service.settings import ENV_PREFIX, Settings

        return {ENV_PREFIX + name.upper() for name in Settings.model_fields}

    @functools.cached_property
    def app(self) -> Any:
        """The gateway as `resnet-serve serve` builds it (not started: routes and registry)."""
        from service.settings import Settings
        from service.transports.http.app import create_app

        return create_app(Settings())

    @functools.cached_property
    def metric_kinds(self) -> dict[str, str]:
        from tests.helpers.metrics import sample_kinds

        return sample_kinds(self.app.state.runtime.metrics.registry)

    @functools.cached_property
    def metric_labels(self) -> dict[str, set[str]]:
        from tests.helpers.metrics import declared_labels

        return declared_labels(self.app.state.runtime.metrics)

    @functools.cached_property
    def metric_names(self) -> set[str]:
        """Sample names, and a histogram's family name (docs name a histogram so)."""
        names = set(self.metric_kinds)
        names |= {n.removesuffix("_sum") for n, k in self.metric_kinds.items() if k == "histogram"}
        return names

    @functools.cached_property
    def recorded(self) -> set[str]:
        return {r["record"] for r in promql.rules() if "record" in r}

    @functools.cached_property
    def triton_metrics(self) -> set[str]:
        """nv_* names: the GPU families (tests/data/triton_gpu_metrics.txt) and those the
        rules and dashboard use (tests/e2e/test_observability_metrics.py holds them against
        a real Triton)."""
        gpu = (self.root / "tests" / "data" / "triton_gpu_metrics.txt").read_text()
        names = set(re.findall(r"^(nv_\w+)", gpu, re.M))
        return names | {u.metric for q in promql.all_queries() for u in q.uses}

    @functools.cached_property
    def dockerfile(self) -> Dockerfile:
        return Dockerfile(self.root / "Dockerfile")

    @functools.cached_property
    def build_args(self) -> set[str]:
        d = self.dockerfile
        declared = {i.args.split("=", 1)[0].strip() for s in d.stages for i in s.all("ARG")}
        # Docker's predefined ARGs (the proxies) need no declaration.
        proxies = {f"{p}_PROXY" for p in ("HTTP", "HTTPS", "FTP", "NO", "ALL")}
        return set(d.global_args) | declared | proxies | {p.lower() for p in proxies}

    @functools.cached_property
    def schema(self) -> dict[str, Any]:
        return json.loads((self.chart / "values.schema.json").read_text())

    @functools.cached_property
    def defaults(self) -> dict[str, Any]:
        return yaml.safe_load((self.chart / "values.yaml").read_text())

    def render(
        self, values: dict[str, Any], release: str = "rel", namespace: str = "ml"
    ) -> list[dict[str, Any]]:
        """The chart's objects (Helm's engine); raises on a render failure."""
        return _render(self.chart, json.dumps(values, sort_keys=True), release, namespace)

    @functools.cached_property
    def loggers(self) -> set[str]:
        """Logger names the code asks for by name (``service.access``)."""
        found: set[str] = set()
        for folder in ("export", "service"):
            for path in (self.root / folder).rglob("*.py"):
                found |= set(re.findall(r"getLogger\(\s*[\"']([\w.]+)[\"']", path.read_text()))
        return found

    @functools.cached_property
    def functions(self) -> dict[str, str]:
        """Top-level function name -> its file, in export/ and service/ (for a name used as
        if it were a command)."""
        out: dict[str, str] = {}
        for folder in ("export", "service"):
            for path in sorted((self.root / folder).rglob("*.py")):
                for node in ast.parse(path.read_text()).body:
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                        out.setdefault(node.name, str(path.relative_to(self.root)))
        return out


@functools.lru_cache(maxsize=64)
def _render(chart: Path, values: str, release: str, namespace: str) -> list[dict[str, Any]]:
    import helm_python as helm

    with helm.Chart.load(chart) as loaded:
        out = loaded.render(values=json.loads(values), name=release, namespace=namespace)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: many renders
    return [
        d
        for p, t in out.items()
        if not p.endswith("NOTES.txt")
        for d in yaml.load_all(t, Loader=loader)
        if d
    ]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def placeholder(value: str) -> bool:
    """A value the reader fills in: DIR, MODEL, <digest>, $KEY, ..."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*|.*[<>$].*|\.\.\..*", value))


# --- commands -----------------------------------------------------------------------------


@dataclass
class Release:
    """A `helm install` the docs give: what a later `helm test` or `kubectl` line acts on."""

    name: str
    namespace: str
    values: dict[str, Any]
    context: str
    where: str = ""  # the install's line


@dataclass
class State:
    """What earlier lines of the docs made: releases installed, images built (tag -> stage)."""

    releases: list[Release] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)

    def release(self, name: str, line: dc.Line) -> Release | None:
        """The release ``name`` a line acts on: the last one installed above it in its
        block, else one installed anywhere in the docs."""
        number = _number(line.where)
        same = [
            r for r in self.releases
            if r.name == name and r.context == line.context and _number(r.where) < number
        ]  # fmt: skip
        named = same or [r for r in self.releases if r.name == name]
        return named[-1] if named else None


def _number(where: str) -> int:
    tail = where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


#: A command's check: its problems, or None where it has no check for this command.
Check = Callable[["Checker", dc.Command, dc.Line], list[str] | None]


class Checker:
    def __init__(self, code: Code | None = None) -> None:
        self.code = code or Code()
        self.state = State()
        self.handlers: dict[str, Check] = {
            "resnet-export": Checker.cli,
            "resnet-serve": Checker.cli,
            "make": Checker.make,
            "helm": Checker.helm,
            "docker": Checker.container_engine,
            "podman": Checker.container_engine,
            "pip": Checker.pip,
            "pip3": Checker.pip,
            "curl": Checker.curl,
            "python": Checker.python,
            "python3": Checker.python,
            "kubectl": Checker.kubectl,
        }

    # ---- the command trees ----

    def cli(self, cmd: dc.Command, line: dc.Line) -> list[str] | None:
        from typer import _click

        args = [a.strip("[]") for a in cmd.argv[1:] if a.strip("[]")]
        group, prog = self.code.clis[cmd.name], cmd.name
        if args[:1] == ["..."]:  # `resnet-export ... --repository`: some command's option
            return self._any_command_has(group, prog, args[1:])
        elided = "..." in args
        args = [a for a in args if a != "..."]
        if not args or args[0] in ("--help", "--version"):
            if not args:
                return None if not line.fenced else [f"{prog}: no command given"]
            return []
        if args[0].startswith("-"):
            return [f"{prog} has no option {args[0]} (its commands: {', '.join(group.commands)})"]
        sub = group.commands.get(args[0])
        if sub is None:
            return [
                f"{prog} has no command {args[0]!r} (its commands: {', '.join(group.commands)})"
            ]
        rest, ctx = args[1:], _click.core.Context(sub, info_name=f"{prog} {args[0]}")
        try:
            opts, extra, _ = sub.make_parser(ctx).parse_args(args=list(rest))
        except _click.exceptions.BadOptionUsage as exc:
            if not line.fenced and "requires an argument" in exc.format_message():
                return []  # prose naming an option: `resnet-serve bench --concurrency`
            return [f"{prog} {args[0]}: {exc.format_message()}"]
        except _click.exceptions.UsageError as exc:
            return [f"{prog} {args[0]}: {exc.format_message()}"]
        problems = [f"{prog} {args[0]}: unexpected argument {a!r}" for a in extra]
        problems += self._values(sub, ctx, opts, f"{prog} {args[0]}")
        arguments = sum(1 for p in sub.params if p.param_type_name == "argument" and p.name in opts)
        options = sum(1 for a in rest if a.startswith("-"))
        # Prose that gives one option names a mode; more is a command a reader copies.
        if (line.fenced or arguments or options >= 2) and not elided:
            problems += [
                f"{prog} {args[0]}: missing "
                + (
                    f"option {p.opts[0]}"
                    if p.param_type_name == "option"
                    else f"argument {p.name.upper()}"
                )
                + " (required)"
                for p in sub.params
                if p.required and p.name not in opts
            ]
            if args[0] == "tensorrt-job" and not problems:
                problems += self._claim(sub, opts)
        return problems

    def _any_command_has(self, group: Any, prog: str, args: list[str]) -> list[str]:
        options = {o for c in group.commands.values() for p in c.params for o in p.opts}
        return [
            f"{prog}: no command has option {a}"
            for a in args
            if a.startswith("-") and a not in options
        ]

    def _values(self, sub: Any, ctx: Any, opts: dict[str, Any], prog: str) -> list[str]:
        problems = []
        for param in sub.params:
            if param.name not in opts or getattr(param, "is_flag", False):
                continue
            raw = opts[param.name]
            for value in raw if isinstance(raw, list) else [raw]:
                if not isinstance(value, str) or placeholder(value):
                    continue
                for alternative in value.split("|"):  # `--precision int8|fp16`
                    try:
                        param.process_value(ctx, [alternative] if param.multiple else alternative)
                    except Exception as exc:  # the parser's own message: BadParameter
                        message = getattr(exc, "format_message", lambda e=exc: str(e))()
                        problems.append(f"{prog}: {message}")
        return problems

    def _claim(self, sub: Any, opts: dict[str, Any]) -> list[str]:
        """A TensorRT build Job mounts the repository's claim: one the chart makes."""
        param = next(p for p in sub.params if p.name == "claim")
        claim = opts.get("claim", param.default)
        releases = self.state.releases or [Release("rel", "ml", {}, "")]
        made = set()
        for r in releases:
            existing = ((r.values.get("modelRepository") or {}).get("pvc") or {}).get(
                "existingClaim"
            )
            made |= {existing} if existing else set()
            for obj in self.code.render(r.values, r.name, r.namespace):
                if obj["kind"] == "PersistentVolumeClaim":
                    made.add(obj["metadata"]["name"])
                    made.add(obj["metadata"]["name"].replace(r.name, "<release>", 1))
        if claim in made:
            return []
        how = "the command's default" if "claim" not in opts else "--claim"
        return [
            f"the Job mounts claim {claim!r} ({how}), which the chart as the docs install it "
            f"does not make (its claims: {', '.join(sorted(made))}): pass --claim"
        ]

    # ---- make ----

    def make(self, cmd: dc.Command, line: dc.Line) -> list[str] | None:
        targets, variables = self.code.makefile
        problems = []
        for word in cmd.argv[1:]:
            if "=" in word:
                var = word.split("=", 1)[0]
                if var not in variables:
                    problems.append(f"make: the Makefile has no variable {var}")
            elif word.startswith("-"):
                problems.append(f"make: option {word} is not one the docs should need")
            elif word not in targets:
                problems.append(f"make: no target {word!r} in the Makefile")
        return problems

    # ---- helm, kubectl ----

    _HELM_VALUE_OPTS = frozenset({"-n", "--namespace", "--set", "--set-string", "-f", "--values",
                                  "--timeout", "--version", "--kube-context"})  # fmt: skip
    _HELM_FLAGS = frozenset({"--create-namespace", "--wait", "--atomic", "--install", "--dry-run",
                             "--debug", "--logs", "--keep-history", "--wait-for-jobs"})  # fmt: skip

    def helm(self, cmd: dc.Command, line: dc.Line) -> list[str] | None:
        if len(cmd.argv) < 2:
            return None if not line.fenced else ["helm: no command given"]
        sub, words = cmd.argv[1], cmd.argv[2:]
        opts: dict[str, list[str]] = {}
        positional, problems, i = [], [], 0
        while i < len(words):
            w = words[i]
            name, eq, value = w.partition("=")
            if name in self._HELM_VALUE_OPTS:
                if not eq:
                    i += 1
                    value = words[i] if i < len(words) else ""
                opts.setdefault(name, []).append(value)
            elif w in self._HELM_FLAGS:
                opts.setdefault(w, [])
            elif w.startswith("-"):
                problems.append(f"helm {sub}: option {w} is not one the checker knows")
            else:
                positional.append(w)
            i += 1
        namespace = (opts.get("-n") or opts.get("--namespace") or ["default"])[-1]
        if sub in ("install", "upgrade", "template"):
            if len(positional) != 2:
                return None if not line.fenced else [f"helm {sub}: expected RELEASE CHART"]
            return problems + self._install(positional, opts, namespace, line)
        if sub in ("test", "uninstall", "status"):
            if not positional:
                return None if not line.fenced else [f"helm {sub}: expected RELEASE"]
            release = self.state.release(positional[0], line)
            if release is None:
                return [
                    *problems,
                    f"helm {sub}: no release {positional[0]!r} was installed by the docs",
                ]
            if release.namespace != namespace:
                problems.append(
                    f"helm {sub}: release {release.name} is in namespace {release.namespace}, not {namespace}"
                )
            if sub == "test":
                problems += self._helm_test(release)
            return problems
        return None  # no check for this helm command

    def _install(
        self, positional: list[str], opts: dict[str, list[str]], namespace: str, line: dc.Line
    ) -> list[str]:
        release, chart = positional
        if (self.code.root / chart).resolve() != self.code.chart.resolve():
            return [f"helm: {chart} is not the chart (helm/resnet-serving)"]
        values: dict[str, Any] = {}
        problems = []
        for path in opts.get("-f", []) + opts.get("--values", []):
            file = self.code.root / path
            if not file.is_file():
                problems.append(f"helm: values file {path} does not exist")
                continue
            _merge(values, yaml.safe_load(file.read_text()) or {})
        for flag in ("--set", "--set-string"):
            for assignment in opts.get(flag, []):
                try:
                    for keys, value in _strvals(assignment, flag == "--set-string"):
                        _put(values, keys, value)
                except ValueError as exc:
                    problems.append(f"helm {flag} {assignment}: {exc}")
        problems += self.values_problems(values)
        if not problems:
            try:
                self.code.render(values, release, namespace)
            except Exception as exc:  # the engine's failure: a template's `fail`
                problems.append(
                    f"helm: the chart does not render with these values: {str(exc)[:300]}"
                )
        self.state.releases.append(Release(release, namespace, values, line.context, line.where))
        return problems

    def values_problems(self, values: dict[str, Any]) -> list[str]:
        """``values`` over the chart's defaults, as Helm validates them (values.schema.json)."""
        import jsonschema

        merged = _merge(copy.deepcopy(self.code.defaults), values)
        validator = jsonschema.Draft7Validator(self.code.schema)
        return [
            f"helm values: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(merged)
        ]

    def _helm_test(self, release: Release) -> list[str]:
        """`helm test` runs the chart's test pod, which must reach the gateway's HTTP port
        through the release's NetworkPolicies."""
        from tests.helpers.netpol import admitted

        objs = self.code.render(release.values, release.name, release.namespace)
        pods = [o for o in objs if o["kind"] == "Pod"]
        if not pods:
            return ["helm test: the chart has no test pod with these values"]
        gateway = next(
            o for o in objs
            if o["kind"] == "Deployment"
            and o["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
        )  # fmt: skip
        spec = gateway["spec"]["template"]["spec"]
        (container,) = [c for c in spec["containers"] if c["name"] == "gateway"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
        dst = {"namespace": release.namespace,
               "labels": gateway["spec"]["template"]["metadata"]["labels"],
               "containers": spec["containers"]}  # fmt: skip
        policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
        for pod in pods:
            src = {
                "namespace": release.namespace,
                "labels": pod["metadata"]["labels"],
                "ip": "10.0.0.1",
            }
            if not admitted(policies, dst, src, port):
                return [
                    f"helm test: the test pod {pod['metadata']['name']} is not admitted to the "
                    f"gateway's HTTP port {port} by the NetworkPolicies of this release"
                ]
        return []

    def kubectl(self, cmd: dc.Command, line: dc.Line) -> list[str] | None:
        words, namespace, i, rest = cmd.argv[1:], "default", 0, []
        while i < len(words):
            if words[i] in ("-n", "--namespace"):
                namespace, i = words[i + 1], i + 2
                continue
            rest.append(words[i])
            i += 1
        if rest[:2] == ["rollout", "status"] and len(rest) >= 3:
            return self._kube_object(rest[2], namespace, [])
        if rest[:1] == ["port-forward"] and len(rest) >= 3:
            ports = [int(p.split(":")[-1]) for p in rest[2:] if re.fullmatch(r"\d+(:\d+)?", p)]
            return self._kube_object(rest[1], namespace, ports)
        return None  # no check for this kubectl command

    _KINDS: ClassVar[dict[str, str]] = {"deployment": "Deployment", "deploy": "Deployment", "svc": "Service",
              "service": "Service", "pod": "Pod"}  # fmt: skip

    def _kube_object(self, ref: str, namespace: str, ports: list[int]) -> list[str]:
        kind, _, name = ref.partition("/")
        kind = self._KINDS.get(kind.lower(), kind)
        for release in self.state.releases or [Release("rel", "ml", {}, "")]:
            if release.namespace != namespace:
                continue
            for obj in self.code.render(release.values, release.name, release.namespace):
                if obj["kind"] == kind and obj["metadata"]["name"] == name:
                    have = {p["port"] for p in obj.get("spec", {}).get("ports", [])}
                    if kind == "Service" and not set(ports) <= have:
                        return [f"kubectl: Service {name} has no port {sorted(set(ports) - have)}"]
                    return []
        return [
            f"kubectl: no {kind} {name} in namespace {namespace} in any release the docs install"
        ]

    # ---- container images ----

    def container_engine(self, cmd: dc.Command, line: dc.Line) -> list[str] | None:
        words = cmd.argv[1:]
        if words[:1] == ["build"]:
            return self._build(words[1:])
        if words[:1] == ["run"]:
            return self._run(words[1:])
        return None  # no check for this command of the engine

    def _build(self, words: list[str]) -> list[str]:
        stages = [s.name for s in self.code.dockerfile.stages if s.name]
        problems, target, tags, i = [], None, [], 0
        while i < len(words):
            w = words[i]
            value = words[i + 1] if i + 1 < len(words) else ""
            if w == "--target":
                target = value
                if value not in stages:
                    problems.append(
                        f"build: no stage {value!r} in the Dockerfile (its stages: {', '.join(stages)})"
                    )
            elif w == "--build-arg":
                problems += self.build_arg(value)
            elif w in ("-t", "--tag"):
                tags.append(value)
            elif w in ("-f", "--file") and not (self.code.root / value).is_file():
                problems.append(f"build: no Dockerfile {value}")
            i += 2 if w.startswith("-") and w not in ("--no-cache", "--pull", "-q") else 1
        for tag in tags:
            self.state.images[tag] = target or self.code.dockerfile.final.name or ""
        return problems

    def build_arg(self, assignment: str) -> list[str]:
        name = assignment.split("=", 1)[0]
        if name in self.code.build_args:
            return []
        return [
            f"--build-arg {name}: the Dockerfile declares no ARG {name} (its ARGs: {', '.join(sorted(a for a in self.code.build_args if a.isupper() and not a.endswith('_PROXY')))})"
        ]

    def _run(self, words: list[str]) -> list[str]:
        with_value = {"-p", "--publish", "-v", "--volume", "--tmpfs", "-e", "--env", "--name",
                      "--gpus", "--user", "-u", "--network", "--entrypoint", "-w"}  # fmt: skip
        published, i, image = [], 0, None
        while i < len(words):
            w = words[i]
            if w in with_value:
                if w in ("-p", "--publish"):
                    published.append(words[i + 1].rsplit(":", 1)[-1].split("/")[0])
                i += 2
            elif w.startswith("-"):
                i += 1
            else:
                image = w
                break
        if image is None:
            return ["run: no image"]
        stage = self.state.images.get(image)
        if stage is None:
            return [f"run: image {image} is not one the docs build"]
        exposed = {
            p.split("/")[0]
            for p in self.code.dockerfile.config(self.code.dockerfile.stage(stage)).exposed
        }
        return [
            f"run: the image exposes no port {p} (it exposes {sorted(exposed)})"
            for p in published
            if p not in exposed
        ]

    # ---- pip ----

    def pip(self, cmd: dc.Command, line: dc.Line) -> list[str] | None:
        words = cmd.argv[1:]
        if not words or words[0] != "install":
            return None  # uninstall, freeze, ...: nothing of ours to check
        problems, skip = [], False
        extras = set(self.code.pyproject["project"]["optional-dependencies"])
        for w in words[1:]:
            if skip:
                skip = False
                continue
            if w in ("-r", "--requirement", "--index-url", "-i", "--extra-index-url", "-c"):
                skip = True
                continue
            if w.startswith("-"):
                continue
            m = re.fullmatch(r"([A-Za-z0-9_.\-/]+)(?:\[([^\]]*)\])?(?:==(\S+))?", w)
            if not m:
                problems.append(f"pip install: cannot read {w!r}")
                continue
            name, wanted, version = m[1], m[2], m[3]
            ours = name in (".", "./") or _canonical(name) == _canonical(
                self.code.pyproject["project"]["name"]
            )
            if wanted is not None:
                if not ours:
                    continue
                problems += [f"pip install: resnet-serving has no extra [{e}] (its extras: {', '.join(sorted(extras))})"
                             for e in (x.strip() for x in wanted.split(",")) if e not in extras]  # fmt: skip
            if version and (pin := self.code.pins.get(_canonical(name))) and pin != version:
                problems.append(
                    f"pip install: {name}=={version}, but pyproject.toml pins {name}=={pin}"
                )
        return problems

    # ---- curl ----

    _CURL_VALUE = frozenset({"-H", "--header", "-d", "--data", "--data-binary", "--data-raw", "-F",
                             "--form", "-X", "--request", "-o", "--output", "-w", "--write-out",
                             "-u", "--user", "-m", "--max-time", "--connect-timeout", "-A",
                             "--cacert", "-b", "-c"})  # fmt: skip

    def curl(self, cmd: dc.Command, line: dc.Line) -> list[str] | None:
        from starlette.routing import Match

        words, method, url, i = cmd.argv[1:], None, None, 0
        sends = False
        while i < len(words):
            w = words[i]
            if w in self._CURL_VALUE:
                if w in ("-X", "--request"):
                    method = words[i + 1]
                sends |= w in ("-d", "--data", "--data-binary", "--data-raw", "-F", "--form")
                i += 2
                continue
            if not w.startswith("-") and url is None:
                url = w
            i += 1
        if url is None:
            return ["curl: no URL"]
        path = urlsplit(url if "://" in url else "http://" + url.removeprefix("...")).path
        if url.startswith("..."):
            path = url[3:].split("?")[0]
        method = method or ("POST" if sends else "GET")
        found = {r.matches({"type": "http", "path": path, "method": method})[0]
                 for r in self.code.app.routes}  # fmt: skip
        if Match.FULL in found:
            return []
        if Match.PARTIAL in found:
            return [f"curl: {path} does not take {method}"]
        return [f"curl: the gateway has no route for {path}"]

    # ---- python ----

    def python(self, cmd: dc.Command, line: dc.Line) -> list[str] | None:
        words = cmd.argv[1:]
        if not words:
            return []
        if words[0] == "-c" and len(words) > 1:
            return python_code_problems(words[1], self.code.root)
        if words[0] == "-m" and len(words) > 1:
            return [] if _module_exists(words[1]) else [f"python -m {words[1]}: no such module"]
        script = words[0]
        if (self.code.root / script).is_file():
            return []
        if script.split("/")[0] in ("export", "service", "deploy", "tests"):
            return [f"python: no script {script}"]
        return None  # a script somewhere else (a pod's /scripts): nothing here to check

    # ---- one line ----

    def line(self, line: dc.Line) -> tuple[list[str], bool]:
        """(problems, whether some part of it had a check) of one command line."""
        if line.error:
            return [line.error], True
        problems, checked = [], False
        for cmd in line.commands:
            handler = self.handlers.get(cmd.name)
            if handler is None and cmd.name in FILTERS and cmd is not line.commands[0]:
                continue  # `... | grep -E ...`: what the reader looks at, not what runs
            if not line.fenced and len(cmd.argv) == 1:
                continue  # prose naming a program (`curl`, `resnet-serve`)
            found = None if handler is None else handler(self, cmd, line)
            if found is None:
                if line.fenced and not line.marker:
                    what = " ".join(cmd.argv[:2]) if handler else cmd.name
                    problems.append(f"no check for `{what}`: check it in a test, or mark the line")
                continue
            checked = True
            problems += found
        return problems, checked


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a module, found without importing anything: the project's by
    path (importing export.pipeline would import torch), others under their top-level
    package's folder."""
    parts = name.split(".")
    if (root / parts[0] / "__init__.py").is_file():
        base = root.joinpath(*parts)
        return next(
            (c for c in (base.with_suffix(".py"), base / "__init__.py") if c.is_file()), None
        )
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ModuleNotFoundError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        return Path(spec.origin or parts[0])
    for location in spec.submodule_search_locations or []:
        base = Path(location).joinpath(*parts[1:])
        candidates = [
            base.with_suffix(".py"),
            base / "__init__.py",
            *base.parent.glob(base.name + ".*.so"),
        ]
        if found := next((c for c in candidates if c.is_file()), None):
            return found
    return None


def _module_exists(name: str) -> bool:
    return module_file(name) is not None


def python_code_problems(code: str, root: Path) -> list[str]:
    """``python -c`` code: it compiles, and every ``from M import a, b`` names things M has."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [f"python -c: {exc.msg}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            defined = module_names(node.module)
            if defined is None:
                problems.append(f"python -c: no module {node.module}")
                continue
            problems += [f"python -c: {node.module} has no {a.name}" for a in node.names
                         if a.name not in defined and not _module_exists(f"{node.module}.{a.name}")]  # fmt: skip
    return problems


def module_names(module: str) -> set[str] | None:
    """Names a module defines at its top level (read, not imported); None if no module."""
    path = module_file(module)
    if path is None:
        return None
    if path.suffix != ".py":
        return set()  # compiled: nothing to read, nothing to refuse
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


# --- helm's --set syntax -------------------------------------------------------------------


def _strvals(text: str, as_string: bool) -> Iterator[tuple[list[str | int], Any]]:
    """Helm's ``--set`` assignments: ``a.b=c,d[0].e=f``; values typed as Helm types them
    (true/false/null, integers) unless ``--set-string``; ``\\,`` and ``\\.`` escaped."""
    for part in re.split(r"(?<!\\),", text):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"{part!r} has no '='")
        path: list[str | int] = []
        for piece in re.split(r"(?<!\\)\.", key):
            m = re.fullmatch(r"((?:[^\[\\]|\\.)+)((?:\[\d+\])*)", piece)
            if not m:
                raise ValueError(f"cannot read the key {key!r}")
            path.append(m[1].replace("\\.", ".").replace("\\,", ","))
            path += [int(i) for i in re.findall(r"\[(\d+)\]", m[2])]
        value = value.replace("\\,", ",")
        if not as_string:
            value = {"true": True, "false": False, "null": None}.get(value, value)
            if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
                value = int(value)
        yield path, value


def _put(values: dict[str, Any], path: list[str | int], value: Any) -> None:
    node: Any = values
    for key, nxt in itertools.pairwise(path):
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(key, int):
            while len(node) <= key:
                node.append(None)
            node[key] = node[key] if node[key] is not None else empty
            node = node[key]
        else:
            node = node.setdefault(key, empty)
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


# --- the whole check ----------------------------------------------------------------------


def check(sources: Sources | None = None, code: Code | None = None) -> Report:
    """Every command line and every name of the docs, held against the code."""
    from tests.helpers.docs_names import Names

    sources = sources or Sources.of()
    checker = Checker(code or Code(chart=sources.chart))
    lines = sources.lines()
    # The releases NOTES.txt speaks of: the scenario's own install.
    for name in ["defaults", *SCENARIOS]:
        checker.state.releases.append(
            Release("rel", "ml", scenario_values(name, sources.chart), name)
        )
    # Installs and builds first: a page may name a release or an image another page makes.
    for line in lines:
        if any(c.argv[1:2] in (["install"], ["upgrade"], ["build"]) for c in line.commands):
            checker.line(line)
    report = Report()
    for line in lines:
        problems, checked = checker.line(line)
        marker = line.marker
        if marker is not None and not (marker["reason"] or "").strip():
            problems.append("a `docs: unverified` marker without its reason in parentheses")
        report.findings += [Finding(line.where, p, line.text) for p in problems]
        if marker is not None:
            report.marked.append((line, (marker["reason"] or "").strip()))
        elif checked:
            report.checked.append(line)
    names = Names(sources, checker)
    report.findings += names.run()
    report.names = names.count
    return report
