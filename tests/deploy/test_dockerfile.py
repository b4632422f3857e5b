"""The gateway image (Dockerfile, .dockerignore) without a Docker engine: hadolint, the
configuration each target really ends up with (stages inherited as Docker does), the
build context checked against every COPY, the context itself built into the project's
wheel, and the image's install resolved by pip. The image itself is built and run by
tests/e2e/test_image.py."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from service.settings import Settings
from tests.helpers.dockerfile import Config, Dockerfile, DockerIgnore, duration_s, expand
from tests.helpers.paths import ROOT, tool

DOCKERFILE = Dockerfile(ROOT / "Dockerfile")
IGNORE = DockerIgnore(ROOT / ".dockerignore")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: What users build: `docker build .` (the last stage) and `docker build --target gpu .`.
TARGETS = {"cpu": DOCKERFILE.final, "gpu": DOCKERFILE.stage("gpu")}


def config(target: str) -> Config:
    return DOCKERFILE.config(TARGETS[target])


def pip_installs(
    stage_names: tuple[str, ...], build_args: dict[str, str] | None = None
) -> list[list[str]]:
    """The arguments of every ``pip install`` the named stages run (ARGs expanded: their
    defaults, or ``build_args`` as ``--build-arg`` gives them)."""
    out = []
    for name in stage_names:
        stage = DOCKERFILE.stage(name)
        args = {
            k: v
            for i in stage.all("ARG")
            for k, eq, v in [i.args.partition("=")]
            if eq  # ARG NAME=default (an empty default included)
        }
        args.update({k: v for k, v in (build_args or {}).items() if k in args})
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;", run.args):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    out.append([expand(w, args) for w in words])
    return out


def test_hadolint_has_nothing_to_say():
    """No finding at any level, style included; each inline ignore names its reason."""
    out = subprocess.run(
        [tool("hadolint"), "--format", "json", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout or "[]") == [], out.stdout
    assert out.returncode == 0, out.stderr
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for n, line in enumerate(lines):
        if m := re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip()):
            above = "\n".join(lines[max(0, n - 3) : n])
            for rule in m[1].split(","):
                assert f"{rule} (" in above, f"line {n + 1}: say why {rule} is ignored"


def test_base_image_is_one_pinned_slim_python_311_for_every_stage():
    base = DOCKERFILE.global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    # The venv's python is a link to the base's interpreter: builder and runtime must match.
    roots = [s for s in DOCKERFILE.stages if DOCKERFILE.parent(s) is None]
    assert {s.base for s in roots} == {"${PYTHON_IMAGE}"}
    assert {DOCKERFILE.base_image(s) for s in TARGETS.values()} == {base}


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_a_numeric_non_root_user_that_exists(target):
    user = config(target).user
    assert user is not None and re.fullmatch(r"\d+:\d+", user), user
    uid, gid = map(int, user.split(":"))
    assert uid >= 1000 and gid >= 1000  # outside the system and distribution ranges
    created = " ".join(i.args for s in DOCKERFILE.chain(TARGETS[target]) for i in s.all("RUN"))
    assert f"--uid {uid}" in created and f"--gid {gid}" in created


@pytest.mark.parametrize("target", TARGETS)
def test_serves_on_all_interfaces_the_ports_it_exposes(target):
    c = config(target)
    assert c.command == ["resnet-serve", "serve"]
    assert c.env["RESNET_SERVE_HOST"] == "0.0.0.0"  # the gateway's own default is loopback
    assert c.exposed == {c.env["RESNET_SERVE_PORT"], c.env["RESNET_SERVE_GRPC_PORT"]}
    assert c.env["RESNET_SERVE_REPOSITORY"] == "/models"


@pytest.mark.parametrize("target", TARGETS)
def test_writes_only_to_tmp(target):
    """HOME and TMPDIR in /tmp (the chart's emptyDir under a read-only root), no bytecode."""
    env = config(target).env
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # ONNX Runtime's telemetry would write under $HOME/.cache and upload events.
    assert env["ORT_DISABLE_TELEMETRY"] == "1"
    for stage in DOCKERFILE.chain(TARGETS[target]):
        # Nothing of the image's is made writable for the user at build time.
        assert not [i for i in stage.all("RUN") if re.search(r"\bchown\b|\bchmod\b", i.args)]
        assert not [i for i in stage.all("COPY") if "--chown" in i.args]


@pytest.mark.parametrize("target", TARGETS)
def test_every_variable_is_a_setting(target, monkeypatch):
    env = {k: v for k, v in config(target).env.items() if k.startswith("RESNET_SERVE_")}
    for key in env:
        assert key.removeprefix("RESNET_SERVE_").lower() in Settings.model_fields, key
    if target == "cpu":  # (the GPU providers are checked against onnxruntime-gpu at start)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert Settings().port == int(env["RESNET_SERVE_PORT"])


@pytest.mark.parametrize("target", TARGETS)
def test_healthcheck_needs_no_curl_and_follows_the_port(target):
    hc = config(target).healthcheck
    assert hc is not None, "no HEALTHCHECK"
    options, command = hc
    assert command[:2] == ["python", "-c"], command  # exec form, the venv's python
    assert "RESNET_SERVE_PORT" in command[2] and "/healthz" in command[2]
    assert duration_s(options["timeout"]) < duration_s(options["interval"])
    assert int(options["retries"]) >= 2


def test_labels():
    labels = config("cpu").labels
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.title"] == PYPROJECT["project"]["name"]
    assert labels["org.opencontainers.image.base.name"] == DOCKERFILE.global_args["PYTHON_IMAGE"]


def test_only_the_service_extra_and_never_torch():
    runs = " ".join(i.args for s in DOCKERFILE.stages for i in s.all("RUN"))
    assert not re.search(r"\btorch", runs)
    specs = [w for words in pip_installs(("builder", "builder-gpu")) for w in words[2:]]
    projects = [w for w in specs if w.startswith(".")]
    assert ".[service]" in projects and set(projects) <= {".[service]", "."}
    # The targets hold only a builder's venv.
    for target, builder in (("cpu", "builder"), ("gpu", "builder-gpu")):
        copies = [i.args.split() for s in DOCKERFILE.chain(TARGETS[target]) for i in s.all("COPY")]
        assert copies == [[f"--from={builder}", "/opt/venv", "/opt/venv"]]


def test_openvino_is_one_build_argument_away_and_off_by_default():
    """``--build-arg OPENVINO=1`` adds the ``openvino`` extra (pinned in pyproject.toml) to
    the builder's install; without it the image holds ONNX Runtime only."""
    pinned = PYPROJECT["project"]["optional-dependencies"]["openvino"]
    assert [p.partition("==")[0] for p in pinned] == ["openvino"] and "==" in pinned[0]

    def extras(build_args: dict[str, str]) -> list[str]:
        installs = pip_installs(("builder",), build_args)
        return [w for words in installs for w in words if w.startswith(".[")]

    assert extras({}) == [".[service]"]
    assert extras({"OPENVINO": "1"}) == [".[service,openvino]"]


def test_gpu_target_swaps_in_onnxruntime_gpu_of_the_pinned_release():
    pinned = next(
        r.split("==")[1]
        for r in PYPROJECT["project"]["optional-dependencies"]["service"]
        if r.startswith("onnxruntime==")
    )
    installs = pip_installs(("builder-gpu",))
    assert [w for words in installs for w in words if w.startswith("onnxruntime-gpu")] == [
        f"onnxruntime-gpu[cuda,cudnn]=={pinned}"
    ]
    runs = " ".join(i.args for i in DOCKERFILE.stage("builder-gpu").all("RUN"))
    assert runs.index("pip uninstall --yes onnxruntime") < runs.index("onnxruntime-gpu")
    providers = config("gpu").env["RESNET_SERVE_ORT_PROVIDERS"].split(",")
    assert providers[0] == "CUDAExecutionProvider" and "CPUExecutionProvider" in providers
    assert "RESNET_SERVE_ORT_PROVIDERS" not in config("cpu").env


def _context_sources() -> list[str]:
    sources = []
    for stage in DOCKERFILE.stages:
        for copy in stage.all("COPY"):
            words = copy.args.split()
            if not any(w.startswith("--from") for w in words):
                sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


def test_dockerignore_keeps_every_file_the_builder_copies():
    sources = _context_sources()
    assert sorted(s.rstrip("/") for s in sources) == ["README.md", "pyproject.toml", "service"]
    for source in sources:
        assert (ROOT / source).exists(), source
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", source],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert listed, f"git knows no file under {source}"
        dropped = [f for f in listed if IGNORE.excluded(f) and (ROOT / f).exists()]
        assert not dropped, f".dockerignore drops files the builder copies: {dropped}"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "tests/conftest.py",
        "helm/resnet-serving/Chart.yaml",
        "model_repository/digits/1/model.onnx",
        "export/cli.py",
        "deploy/benchmarks/__main__.py",
        "resnet_serving.egg-info/PKG-INFO",
        "service/__pycache__/app.cpython-311.pyc",
        "service/transports/grpc/__pycache__/server.cpython-311.pyc",
        "bench-results.json",
        "Dockerfile",
    ],
)
def test_dockerignore_leaves_out(path):
    assert IGNORE.excluded(path)


def build_context(dest: Path) -> Path:
    """The files `docker build .` sends, copied to ``dest``."""
    for f in IGNORE.context(ROOT):
        target = dest / f.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return dest


def test_build_context_is_small_and_builds_the_gateway_wheel(tmp_path):
    """The context exactly as `docker build` sends it, copied out and built into the wheel
    the builder installs (setuptools from this venv, no network): every service module, the
    .proto, no export package."""
    files = IGNORE.context(ROOT)
    size = sum(f.stat().st_size for f in files)
    assert size < 2_000_000, f"{len(files)} files, {size} bytes"
    context = build_context(tmp_path / "context")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(context),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheels").glob("resnet_serving-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (ROOT / "service").rglob("*.py"):
        assert module.relative_to(ROOT).as_posix() in names
    assert "service/transports/grpc/classifier.proto" in names
    assert not [n for n in names if n.startswith(("export/", "tests/", "deploy/"))]


def test_image_install_resolves_without_torch(tmp_path):
    """pip resolves what the builders install (`.[service]`, with OpenVINO as
    ``--build-arg OPENVINO=1`` adds it, onnxruntime-gpu with its CUDA wheels), wheels only,
    as the Dockerfile asks: no torch, no export extra. Reads package
    metadata from the index (PEP 658), downloads no wheel: ~10-15 s."""
    context = build_context(tmp_path / "context")
    requirements = []
    for words in pip_installs(("builder", "builder-gpu"), {"OPENVINO": "1"}):
        if "--no-deps" in words:
            continue  # the project again, after its dependencies
        for w in words[2:]:
            if not w.startswith("-"):
                requirements.append(str(context) + w[1:] if w.startswith(".") else w)
    start = time.monotonic()
    report = tmp_path / "report.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--only-binary=:all:",
            "--report",
            str(report),
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    print(f"resolved {len(names)} distributions in {time.monotonic() - start:.1f}s")
    assert not {n for n in names if n.startswith("torch") or n.startswith("nvidia-nccl")}
    assert {"onnxruntime", "onnxruntime-gpu", "openvino", "fastapi", "grpcio"} <= names
    assert any(n.startswith("nvidia-cudnn") for n in names)
    assert not names & {"onnx", "scikit-learn", "safetensors", "pytest", "ruff"}


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("notes.txt", True),
        ("service/transports/http/app.py", False),
        ("service/transports/http/rest_v1.py", False),
        ("service/secret.key", True),
        ("service/a/b/secret.pem", True),
        ("service/x.pyc", True),
        ("lib/service/app.py", True),
        ("README.md", False),
    ],
)
def test_dockerignore_matching_follows_moby(tmp_path, path, excluded):
    """The matcher the tests above rely on: `*` stays in one directory, `**/` spans any
    number (none included), `!` re-includes, the last matching line wins, and a pattern
    that matches a parent directory matches what is in it."""
    ignore = tmp_path / ".dockerignore"
    ignore.write_text("# comment\n*\n!service/\n!/README.md\nservice/**/secret*\n**/*.py[co]\n")
    assert DockerIgnore(ignore).excluded(path) is excluded
