"""The names and facts the docs state, looked up where they are defined (the part of the docs
checker that reads prose rather than command lines; tests.helpers.docs_checks has the rest
and runs both): settings, metrics and their labels, PromQL, Docker build arguments, chart
value paths, repository paths, Python names, the NVIDIA driver a CUDA 13 image needs, and
the values behind a Triton flag the docs say the chart sets."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from tests.helpers import docs_commands as dc
from tests.helpers import promql
from tests.helpers.docs_checks import (
    SCENARIOS,
    Checker,
    Finding,
    Sources,
    module_file,
    module_names,
    scenario_values,
)

_ENV = re.compile(r"RESNET_SERVE_[A-Z0-9_]+")
_METRIC = re.compile(r"(?<![\w:])resnet_serve_[a-z0-9_]+")
_RECORDED = re.compile(r"\b[a-z_]+:resnet_serve_[a-z0-9_]+:[a-z0-9_]+")
_BUILD_ARG = re.compile(r"--build-arg[ =]([A-Za-z_][A-Za-z0-9_]*)=")
_SET = re.compile(r"--set(?:-string)? ([A-Za-z][\w.\[\]]*)=")
_VALUE_PATH = re.compile(r"([a-z][A-Za-z0-9]*(?:\.[A-Za-z0-9]+)+)(?:=\S*)?")
_FILE_SUFFIX = re.compile(
    r"\.(py|pyi|yaml|yml|json|md|txt|toml|proto|lua|pbtxt|onnx|plan|npz|sh|cfg|conf|tpl)$"
)
_REPO_PATH = re.compile(
    r"(?:\.venv/bin/)?((?:service|export|deploy|tests|helm|docs)/[\w./-]*)(?:#[\w-]*)?"
)
_DOTTED = re.compile(r"((?:service|export|deploy|tests)(?:\.\w+)+)(?:\(\))?")
# `republish` copies it: a name in the role of a command (the subject of what it does to
# "it"), where a reader would try to run it.
_AS_COMMAND = re.compile(
    r"`([a-z][a-z0-9_-]*)` (?!is\b|was\b|has\b|does\b)[a-z]+s (it|them|the|a|an|every|each)\b"
)
_IDENT = re.compile(r"[a-z][a-z0-9_]*")
# A minimum driver version: "driver 575 or later", "R580 or later", ">= 580", "≥ 580".
_DRIVER = re.compile(r"(?:\bR?(\d{3})\s+or\s+later|(?:>=|≥)\s*R?(\d{3})\b)")


def code_spans(sources: Sources) -> Iterator[tuple[str, str]]:
    """(where, content) of every code span of the prose: pages, values.yaml and Dockerfile
    comments."""
    for page, md in sources.markdown():
        for start, paragraph in md.prose:
            for number, span in dc.code_spans(start, paragraph):
                yield f"{page.path}:{number}", span
    for path, text in (("helm/resnet-serving/values.yaml", sources.values_yaml),
                       ("Dockerfile", sources.dockerfile)):  # fmt: skip
        for first, run in dc.comment_blocks(path, text):
            for number, span in dc.code_spans(first, "\n".join(run)):
                yield f"{path}:{number}", span


def _located(path: str, text: str, pattern: re.Pattern[str]) -> Iterator[tuple[str, re.Match[str]]]:
    for number, line in enumerate(text.splitlines(), 1):
        for m in pattern.finditer(line):
            yield f"{path}:{number}", m


class Names:
    """Every name check; ``count`` is how many names were looked up."""

    def __init__(self, sources: Sources, checker: Checker) -> None:
        self.sources, self.checker, self.code = sources, checker, checker.code
        self.count = 0
        self.findings: list[Finding] = []

    def wrong(self, where: str, problem: str) -> None:
        self.findings.append(Finding(where, problem))

    def run(self) -> list[Finding]:
        self.settings_and_metrics()
        self.promql()
        self.metric_table()
        self.spans()
        self.driver()
        self.torch()
        self.chart_flags()
        return self.findings

    # ---- in every text ----

    def settings_and_metrics(self) -> None:
        for path, text in self.sources.texts():
            for where, m in _located(path, text, _ENV):
                name = m[0]
                if name.endswith("_") or m.string[m.end() : m.end() + 1] in ("*", "<"):
                    continue  # RESNET_SERVE_*, RESNET_SERVE_<FIELD>: the pattern, not a name
                self.count += 1
                if name not in self.code.env_names:
                    self.wrong(where, f"{name} is not a setting (service/settings.py)")
            for where, m in _located(path, text, _METRIC):
                name, after = m[0], m.string[m.end() : m.end() + 1]
                if name.endswith("_") or after == "*":
                    continue  # resnet_serve_shadow_*: a family of names
                self.count += 1
                if name not in self.code.metric_names:
                    self.wrong(where, f"{name} is not a metric of the gateway's registry")
            for where, m in _located(path, text, _RECORDED):
                self.count += 1
                if m[0] not in self.code.recorded:
                    self.wrong(
                        where, f"{m[0]} is not a recording rule of deploy/prometheus/alerts.yml"
                    )
            for where, m in _located(path, text, _BUILD_ARG):
                self.count += 1
                for problem in self.checker.build_arg(m[1]):
                    self.wrong(where, problem)
            for where, m in _located(path, text, _SET):
                self.count += 1
                for problem in self.value_path(m[1]):
                    self.wrong(where, problem)

    # ---- PromQL and the metric table ----

    def promql(self) -> None:
        queries: list[promql.Query] = []
        for where, span in code_spans(self.sources):
            if re.search(r"\b(resnet_serve_|nv_)\w+", span) and re.search(r"[({\[]", span):
                try:
                    queries.append(promql.parse(where, span))
                except (ValueError, IndexError):
                    continue  # prose with brackets, not a query
        for page, md in self.sources.markdown():
            for first, lang, body in md.blocks:
                if lang == "promql":
                    queries += [promql.parse(f"{page.path}:{first + i}", line)
                                for i, line in enumerate(body)
                                if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
        for q in queries:
            self.count += len(q.uses)
            selector = re.fullmatch(r"[\w:]+\s*(\{.*\})?", q.expr.strip())
            for problem in promql.gateway_metric_problems(q, self.code.metric_kinds):
                if selector and "rate()" in problem:
                    continue  # a bare selector says which series; rate() is for graphs
                self.wrong(q.where, problem.split(": ", 1)[1])
            for problem in promql.gateway_label_problems(q, self.code.metric_labels):
                self.wrong(q.where, problem.split(": ", 1)[1])
            for use in q.uses:
                if use.metric.startswith("nv_") and use.metric not in self.code.triton_metrics:
                    self.wrong(q.where, f"{use.metric} is not a metric Triton exports")

    def metric_table(self) -> None:
        """Tables with a `metric` and a `labels` column: each gateway metric's labels are
        the ones it has."""
        for page, md in self.sources.markdown():
            for start, paragraph in md.prose:
                rows = [r for r in paragraph.splitlines() if r.startswith("|")]
                if not rows:
                    continue
                header = [c.strip() for c in _cells(rows[0])]
                if "metric" not in header or "labels" not in header:
                    continue
                mi, li = header.index("metric"), header.index("labels")
                for offset, row in enumerate(rows[2:], 2):
                    cells = _cells(row)
                    listed = _label_list(cells[li])
                    for name in re.findall(r"`(resnet_serve_\w+)`", cells[mi]):
                        self.count += 1
                        sample = name if name in self.code.metric_labels else name + "_sum"
                        have = self.code.metric_labels.get(sample, set()) - {"le"}
                        if listed != have:
                            self.wrong(
                                f"{page.path}:{start + offset}",
                                f"{name}'s labels are {sorted(have)}, the table says {sorted(listed)}",
                            )

    # ---- code spans ----

    def spans(self) -> None:
        from tests.helpers.docs import doc_sections

        sections = doc_sections(self.code.root)
        subcommands = {c for g in self.code.clis.values() for c in g.commands}
        top_values = set(self.code.defaults)
        for where, span in code_spans(self.sources):
            if m := _DOTTED.fullmatch(span):
                self.count += 1
                if m[1] not in self.code.loggers and (problem := _dotted_problem(m[1])):
                    self.wrong(where, problem)
            elif (
                (m := _VALUE_PATH.fullmatch(span))
                and m[1].split(".")[0] in top_values
                and not _FILE_SUFFIX.search(m[1])
            ):
                self.count += 1
                for problem in self.value_path(m[1]):
                    self.wrong(where, problem)
            elif m := _REPO_PATH.fullmatch(span):
                self.count += 1
                if not (self.code.root / m[1]).exists():
                    self.wrong(where, f"{m[1]} does not exist in the repository")
                elif "#" in span and m[1].startswith("docs/") and span not in sections:
                    self.wrong(where, f"{span}: no such section (mkdocs' anchors)")
        targets = self.code.makefile[0]
        for page, md in self.sources.markdown():
            for start, paragraph in md.prose:
                flat = " ".join(paragraph.split())
                for m in _AS_COMMAND.finditer(flat):
                    name = m[1]
                    self.count += 1
                    if name in subcommands or name in targets:
                        continue
                    if name in self.code.functions:
                        self.wrong(f"{page.path}:{start}", f"`{name}` is used as a command, but it is a "
                                   f"function of {self.code.functions[name]}: no command a reader can run")  # fmt: skip

    def value_path(self, path: str) -> list[str]:
        """A chart value path (``triton.tensorrt.enabled``) the schema defines."""
        node: Any = self.code.schema
        walked = []
        for key in re.sub(r"\[\d+\]", ".[]", path).split("."):
            if key == "[]":
                node = node.get("items", {})
                continue
            walked.append(key)
            props = node.get("properties") or {}
            if key in props:
                node = props[key]
            elif isinstance(node.get("additionalProperties"), dict):
                node = node["additionalProperties"]
            elif node.get("additionalProperties") is False or props:
                return [f"chart value {'.'.join(walked)} is not in values.schema.json"]
            else:
                return []  # a free-form map (labels, annotations, resources)
        return []

    # ---- facts ----

    def driver(self) -> None:
        """Every statement of the NVIDIA driver a CUDA 13 image needs gives the same version."""
        seen: list[tuple[str, str]] = []
        for path, text in self.sources.texts():
            lines = text.splitlines()
            for i, line in enumerate(lines):
                window = " ".join(lines[max(0, i - 1) : i + 2]).lower()
                if "driver" not in window:
                    continue
                for m in _DRIVER.finditer(line):
                    seen.append((f"{path}:{i + 1}", m[1] or m[2]))
        self.count += len(seen)
        if len({v for _, v in seen}) > 1:
            for where, _version in seen:
                self.wrong(where, "the docs disagree on the minimum NVIDIA driver: "
                                  + ", ".join(f"{v} ({w})" for w, v in seen))  # fmt: skip

    def torch(self) -> None:
        """A paragraph that says which PyTorch `make setup` installs names the version
        pyproject.toml pins and where its CPU build comes from (the public index on Linux
        x86_64 serves that pin as the CUDA build)."""
        pin = self.code.pins.get("torch", "")
        for page, md in self.sources.markdown():
            for start, paragraph in md.prose:
                flat = " ".join(paragraph.split())
                for m in re.finditer(r"PyTorch (\d+\.\d+)", flat):
                    self.count += 1
                    where = f"{page.path}:{start}"
                    if not pin.startswith(m[1] + "."):
                        self.wrong(where, f"PyTorch {m[1]}, but pyproject.toml pins torch=={pin}")
                    elif f"torch=={pin}" not in flat or "download.pytorch.org/whl/cpu" not in flat:
                        self.wrong(where, f"PyTorch {m[1]}: say where its CPU build comes from "
                                   f"(torch=={pin} from https://download.pytorch.org/whl/cpu)")  # fmt: skip

    def chart_flags(self) -> None:
        """A Triton flag (`--model-config-name=tensorrt`) in a paragraph that says the chart
        sets it: the paragraph names the chart value(s) that decide whether it is set."""
        for page, md in self.sources.markdown():
            for start, paragraph in md.prose:
                if "chart" not in paragraph.lower():
                    continue
                for number, span in dc.code_spans(start, paragraph):
                    flag = span.split()[-1] if span.startswith("tritonserver ") else span
                    if not re.fullmatch(r"--[a-z-]+=\S+", flag):
                        continue
                    deciding = self.deciding_values(flag)
                    if not deciding:
                        continue  # never set, or set whatever the values
                    self.count += 1
                    if not any(v in paragraph for v in deciding):
                        self.wrong(f"{page.path}:{number}",
                                   f"the chart sets {flag} only when {' or '.join(sorted(deciding))} "
                                   "is set: the paragraph does not say so")  # fmt: skip

    def deciding_values(self, flag: str) -> set[str] | None:
        """The boolean values of the ci scenarios that, turned off, drop ``flag`` from
        Triton's arguments while Triton stays; None if no scenario sets the flag."""
        found: set[str] | None = None
        for name in SCENARIOS:
            values = scenario_values(name, self.code.chart)
            if flag not in (_triton_args(self.code.render(values)) or []):
                continue
            found = found or set()
            for path in _true_leaves(values):
                flipped = _with(values, path, False)
                try:
                    args = _triton_args(self.code.render(flipped))
                except Exception:
                    continue  # a combination the chart refuses
                if args is not None and flag not in args:
                    found.add(".".join(path))
        return found


def _triton_args(objs: list[dict[str, Any]]) -> list[str] | None:
    for obj in objs:
        if obj["kind"] != "Deployment":
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            if c["name"] == "triton":
                return list(c.get("args") or [])
    return None


def _true_leaves(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _true_leaves(value, (*prefix, key))
        elif value is True:
            yield (*prefix, key)


def _with(values: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(values)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _cells(row: str) -> list[str]:
    return re.split(r"(?<!\\)\|", row.strip().strip("|"))


def _label_list(cell: str) -> set[str]:
    """The label names a table cell lists before its first colon: ``transport (`http`,
    `grpc`), route, outcome (...): every request ...`` is {transport, route, outcome}."""
    text = cell.replace("\\|", "|")
    while (stripped := re.sub(r"\([^()]*\)", "", text)) != text:
        text = stripped
    head = text.split(":", 1)[0]
    return {w.split()[0] for w in head.split(",") if w.split() and _IDENT.fullmatch(w.split()[0])}


def _dotted_problem(name: str) -> str | None:
    """``export.pipeline.export``: the longest module prefix defines the next name."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module_file(module) is None:
            continue
        if cut == len(parts) or parts[cut] in (module_names(module) or set()):
            return None
        return f"{module} has no {parts[cut]}"
    return f"no module {parts[0]}"
