"""The docs' instructions checked against the code (tests.helpers.docs_checks): every
command line of README.md, docs/*.md, the chart's values.yaml comments and NOTES.txt and the
Dockerfile's comments, and every setting, metric, value path and name they use. In process,
nothing run: the commands the tour runs for real are in tests/e2e/test_docs_tour.py.

Also here: the reader of the docs' shell (continuations, prompts, comments, environment
prefixes, pipes), one wrong line of each kind found, and the eleven instructions issue 35
found wrong, as they were, each found (the bench extra's, which needs an install, is
tests/e2e/test_docs_extras.py's)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import docs_commands as dc
from tests.helpers.docs_checks import Code, Finding, Report, Sources, check
from tests.helpers.paths import CHART, ROOT


@pytest.fixture(scope="module")
def code() -> Code:
    return Code()


def current(path: str) -> str:
    return (ROOT / path).read_text()


def test_every_instruction_in_the_docs_holds(code):
    report = check(code=code)
    print(report.summary())  # the counts, and the lines marked unverifiable with their reasons
    assert not report.findings, report.summary() + "\n" + "\n".join(map(str, report.findings))
    # The reader found what is there: the shell blocks' lines and the prose's commands.
    fenced = [line for line in report.checked if line.fenced]
    assert len(fenced) >= 60 and len(report.checked) >= 150 and report.names >= 300
    assert any(line.where.startswith("helm/resnet-serving/templates/NOTES.txt") for line in fenced)
    assert any(line.where.startswith("Dockerfile:") for line in fenced)


# --- the reader of the docs' shell ----------------------------------------------------------


def test_shell_lines_join_continuations_and_split_commands():
    block = [
        "# a comment line",
        "RESNET_SERVE_PORT=8001 .venv/bin/resnet-serve serve \\",
        "    --repository model_repository   # trailing comment",
        "curl -s localhost:8000/metrics | grep -E '^resnet_serve_' && make test; echo '#not' &",
        "# docs: unverified (needs a GPU)",
        "docker run --gpus all image > out.txt 2>&1",
    ]
    lines = list(dc.shell_lines(block, "p.md", 10, "p.md:9"))
    assert [line.where for line in lines] == ["p.md:11", "p.md:13", "p.md:15"]
    serve, pipe, gpu = lines
    assert serve.text == (
        "RESNET_SERVE_PORT=8001 .venv/bin/resnet-serve serve --repository model_repository"
    )
    assert serve.comment == "trailing comment"
    (cmd,) = serve.commands
    assert cmd.env == {"RESNET_SERVE_PORT": "8001"} and cmd.name == "resnet-serve"
    assert [c.argv for c in pipe.commands] == [
        ["curl", "-s", "localhost:8000/metrics"],
        ["grep", "-E", "^resnet_serve_"],
        ["make", "test"],
        ["echo", "#not"],
    ]
    assert gpu.marker and gpu.marker["reason"] == "needs a GPU"
    assert gpu.commands[0].argv == ["docker", "run", "--gpus", "all", "image"]


def test_console_prompts_and_unlabelled_blocks():
    page = dc.Page(
        "docs/x.md",
        "```console\n$ make serve\nserving on 127.0.0.1:8000\n$ make \\\n  test\n```\n\n"
        "```\nmake docs\n```\n\n```\nresnet_serve_ready 1.0\n```\n\n"
        "```python\nimport os\n```\n\nProse with `make lint` and `resnet-export\nvalidate -r DIR`.\n",
    )
    md = dc.read_markdown(page)
    assert [(line.where, line.text) for line in md.lines] == [
        ("docs/x.md:2", "make serve"),
        ("docs/x.md:4", "make test"),
        ("docs/x.md:9", "make docs"),  # an unlabelled block that starts with a command
    ]
    assert [(line.where, line.text) for line in dc.prose_lines(page, md)] == [
        ("docs/x.md:20", "make lint"),
        ("docs/x.md:20", "resnet-export validate -r DIR"),  # a span over a line break
    ]


# --- one wrong line of each kind --------------------------------------------------------


WRONG = """
```sh
resnet-export rollout digits --weight 1=1
resnet-export export --arch resnet50 --weights x --name n -r r --precision int9
resnet-serve bench --url http://h:8000 --model m --images i --output o --concurrencyy 4
resnet-serve servee
make serve-demo
make image TARGETS=gpu
helm install r helm/resnet-serving --set gateway.replicas=2
helm install r helm/resnet-serving --set gateway.replicaCount=two
docker build --target cuda .
docker build --build-arg VARIANT=gpu .
pip install 'resnet-serving[benchmark]'
curl localhost:8000/v1/clasify
python -c "from export.demo import load_splits"
kubectl -n ml rollout status deployment/nothing
wrk -c16 http://x
```

Set `RESNET_SERVE_MAX_BATCH` and read `resnet_serve_request_total`; `gateway.config.maxBatch`
decides; `deploy/prometheus/alert.yml` and `service.model.contract.Contract` too.
"""

EXPECTED = {
    3: "resnet-export rollout: missing option --repository (required)",
    4: "Invalid value for '--precision'",
    5: "No such option: --concurrencyy",
    6: "resnet-serve has no command 'servee'",
    7: "make: no target 'serve-demo'",
    8: "make: the Makefile has no variable TARGETS",
    9: "gateway: Additional properties are not allowed ('replicas' was unexpected)",
    10: "gateway.replicaCount: 'two' is not of type 'integer'",
    11: "build: no stage 'cuda' in the Dockerfile",
    12: "--build-arg VARIANT: the Dockerfile declares no ARG VARIANT",
    13: "resnet-serving has no extra [benchmark]",
    14: "curl: the gateway has no route for /v1/clasify",
    15: "python -c: export.demo has no load_splits",
    16: "kubectl: no Deployment nothing in namespace ml",
    17: "no check for `wrk`",
    20: "RESNET_SERVE_MAX_BATCH is not a setting",
}


def findings_of(code: Code, pages: dict[str, str], chart: Path = CHART) -> list[Finding]:
    """The findings on ``pages`` alone (with the current values.yaml and Dockerfile)."""
    sources = Sources(
        [dc.Page(path, text) for path, text in pages.items()],
        current("helm/resnet-serving/values.yaml"),
        current("Dockerfile"),
        chart,
    )
    return check(sources, code).findings


def test_each_kind_of_wrong_instruction_is_found(code):
    found = findings_of(code, {"docs/wrong.md": WRONG})
    by_line: dict[int, list[str]] = {}
    for f in found:
        by_line.setdefault(int(f.where.rsplit(":", 1)[1]), []).append(f.problem)
    for line, fragment in EXPECTED.items():
        assert any(fragment in p for p in by_line.get(line, [])), (
            line,
            fragment,
            by_line.get(line),
        )
    problems = " | ".join(p for ps in by_line.values() for p in ps)
    for fragment in (
        "resnet_serve_request_total is not a metric",
        "chart value gateway.config.maxBatch is not in values.schema.json",
        "deploy/prometheus/alert.yml does not exist",
        "service.model.contract has no Contract",
    ):
        assert fragment in problems


def test_a_marker_without_its_reason_fails(code):
    page = "```sh\nwrk -c16 http://x   # docs: unverified\nwrk -c4 http://x  # docs: unverified (no wrk)\n```\n"
    found = findings_of(code, {"docs/m.md": page})
    assert [(f.where, f.problem) for f in found] == [
        ("docs/m.md:2", "a `docs: unverified` marker without its reason in parentheses")
    ]


def test_the_report_counts_checked_and_marked_lines(code):
    sources = Sources([dc.Page("docs/c.md", "```sh\nmake test\nwrk x  # docs: unverified (no wrk)\n```\n")],
                      current("helm/resnet-serving/values.yaml"), current("Dockerfile"))  # fmt: skip
    report: Report = check(sources, code)
    assert [(line.where, reason) for line, reason in report.marked] == [("docs/c.md:3", "no wrk")]
    assert "docs/c.md:2" in [line.where for line in report.checked]
    assert "1 marked unverifiable" in report.summary()


# --- issue 35's eleven, as they were ---------------------------------------------------------


@dataclass(frozen=True)
class Defect:
    """One of issue 35's wrong instructions, verbatim from the commit before its fix
    (`git show 3053d41:<path>`), added to today's page: the checker must report it there."""

    number: int
    path: str
    old: str
    expect: str


DEFECTS = [
    Defect(1, "helm/resnet-serving/values.yaml",
           "# -- The gateway image (Dockerfile at the repository root; the GPU variant for an embedded\n"
           "# backend on GPU nodes: --build-arg VARIANT=gpu).\n",
           "the Dockerfile declares no ARG VARIANT"),
    Defect(2, "docs/lifecycle.md",
           "- **How unpinned traffic is split**: `DIR/MODEL/rollout.json`, written with\n"
           "  `resnet-export rollout MODEL --weight 1=90 --weight 2=10 [--shadow 3]` (`--clear` removes it:\n"
           "  everything to the newest served version).\n",
           "resnet-export rollout: missing option --repository"),
    Defect(2, "docs/lifecycle.md",
           "**Shadow.** `resnet-export rollout digits --weight 1=1 --shadow 2`: every unpinned request is\n"
           "answered by version 1, and after it is answered, its input tensors are copied to version 2.\n",
           "resnet-export rollout: missing option --repository"),
    Defect(3, "docs/load-testing.md",
           "Gateway: `.venv/bin/resnet-serve serve --repository REPO --port 18555`, with defaults. REPO held\n"
           "either a ResNet-50 (`resnet-export export --arch resnet50 --weights random --name resnet50\n"
           "--max-batch-size 16`: the server is the bottleneck, the realistic case) or the tests'\n",
           "resnet-export export: missing option --repository"),
    Defect(5, "helm/resnet-serving/values.yaml",
           "    # -- Tag; TensorRT engines must be built with the TensorRT of this release. 25.11 is\n"
           "    # CUDA 13.0: NVIDIA driver 575 or later (data-center GPUs: also R535, R545 with CUDA's\n"
           "    # forward compatibility).\n",
           "the docs disagree on the minimum NVIDIA driver"),
    Defect(5, "docs/kubernetes.md",
           "`triton.image` is NVIDIA's `nvcr.io/nvidia/tritonserver`, tag `25.11-py3` by default (the\n"
           "newest release on NVIDIA's list; CUDA 13.0, so NVIDIA driver 575 or later, or a data-center\n"
           "GPU's R535/R545 with CUDA's forward compatibility).\n",
           "the docs disagree on the minimum NVIDIA driver"),
    Defect(7, "docs/export.md",
           "```sh\n.venv/bin/resnet-export tensorrt-job -r model_repository --model resnet50 --output job.yaml\n```\n",
           "the Job mounts claim 'model-repository' (the command's default)"),
    Defect(8, "docs/export.md",
           "architecture and the exact TensorRT version it was built with, so serving it is a\n"
           "deployment-time choice: `tritonserver --model-config-name=tensorrt` (Triton's custom model\n"
           "configurations) serves the plan; without the flag Triton serves the ONNX graph. The Helm\n"
           "chart sets the flag only when its engine values say the GPU and TensorRT match.\n",
           "only when triton.tensorrt.enabled is set: the paragraph does not say so"),
    Defect(9, "README.md",
           "Nothing else needs installing: `make setup` (run by both) creates `.venv` from\n"
           "`pyproject.toml` — PyTorch 2.13 CPU, ONNX, ONNX Runtime, the `tritonserver` binary from the\n"
           "`nvidia-pytriton` wheel, mkdocs for the docs.\n",
           "say where its CPU build comes from"),
    Defect(10, "docs/operations.md",
           "| metric | labels | example query |\n|---|---|---|\n"
           "| `resnet_serve_model_info` (value 1) | model, version, precision, arch, backend | what each replica serves |\n",
           "resnet_serve_model_info's labels are"),
    Defect(11, "docs/export.md",
           "check that its backend computes what export verified before the version takes traffic.\n"
           "`republish` copies it; `validate` checks it against the contract (a version without one,\n"
           "from an older export, is fine).\n",
           "`republish` is used as a command, but it is a function of export/repository.py"),
]  # fmt: skip


def new_findings(code: Code, defect: Defect, chart: Path = CHART) -> list[Finding]:
    """What the checker reports on the page with the old text added, and not without it, at
    the added lines."""
    base = current(defect.path)
    added = base.rstrip("\n") + "\n\n" + defect.old
    first = base.rstrip("\n").count("\n") + 3
    if defect.path.endswith(".md"):
        before = findings_of(code, {defect.path: base}, chart)
        after = findings_of(code, {defect.path: added}, chart)
    else:  # values.yaml: the chart's comments, read beside a page of today's docs
        sources = [Sources([dc.Page("docs/kubernetes.md", current("docs/kubernetes.md"))],
                           text, current("Dockerfile"), chart) for text in (base, added)]  # fmt: skip
        before, after = (check(s, code).findings for s in sources)
    return [
        f for f in after
        if f not in before and f.where.startswith(defect.path + ":")
        and int(f.where.rsplit(":", 1)[1]) >= first
    ]  # fmt: skip


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: f"{d.number}-{d.path.rsplit('/', 1)[-1]}")
def test_issue_35s_wrong_instructions_as_they_were_are_found(code, defect):
    found = new_findings(code, defect)
    assert any(defect.expect in f.problem for f in found), [str(f) for f in found]


def test_helm_test_where_the_policy_kept_its_pod_out_is_found(tmp_path):
    """Issue 35's sixth: NOTES.txt prints `helm test` in every scenario, but before the fix
    the gateway's NetworkPolicy, narrowed by ingressFrom, admitted only the ingress and the
    scrapers. The chart copied, with the rule that admits the test pod taken out."""
    chart = tmp_path / "resnet-serving"
    shutil.copytree(CHART, chart, symlinks=False)
    policy = chart / "templates" / "networkpolicy.yaml"
    text = policy.read_text()
    start = text.index("    {{- if $np.ingressFrom }}\n    # The chart's own `helm test` pod")
    end = text.index("    {{- end }}\n", start) + len("    {{- end }}\n")
    policy.write_text(text[:start] + text[end:])
    sources = Sources([], current("helm/resnet-serving/values.yaml"), current("Dockerfile"), chart)
    found = check(sources, Code(chart=chart)).findings
    narrowed = {f.where.split("[")[1].split("]")[0] for f in found if "helm test" in f.problem}
    assert narrowed == {"gpu-triton"}, [str(f) for f in found]  # the one with ingressFrom
    assert all(
        "is not admitted to the gateway's HTTP port" in f.problem
        for f in found
        if "helm test" in f.problem
    )
