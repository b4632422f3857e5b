"""The Helm chart, rendered by Helm's own engine (helm-python-sdk) for every `ci/` scenario,
linted, every object validated against the Kubernetes 1.30 schemas, and the properties a
production deployment relies on asserted on what Helm really renders."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from deploy.settings_doc import CHART_OWNED, SCHEMA, config_schema
from service.settings import Settings, helm_key
from tests.helpers import promql
from tests.helpers.netpol import RELEASE_NS, admitted
from tests.helpers.paths import CHART, ROOT, tool

KUBE_VERSION = "1.30.0"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
# Kinds prometheus-operator defines (no Kubernetes schema): checked below by other means.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
#: The gateway's key sets: the values that hold them, the variable each becomes.
KEY_SETS = [("apiKeys", "RESNET_SERVE_API_KEYS"), ("adminKeys", "RESNET_SERVE_ADMIN_KEYS")]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as c:
        yield c


def scenario(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = chart.render(values=values or {}, name="rel", namespace="ml", is_install=True)
    return [
        doc
        for path, text in sorted(out.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def component(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [
        o
        for o in objs
        if o["kind"] == kind and o["metadata"]["labels"].get("app.kubernetes.io/component") == name
    ]
    assert len(matches) == 1, f"{len(matches)} {kind} of component {name}"
    return matches[0]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- every scenario: lint, schemas, hardening ---------------------------------------------------


def test_every_scenario_is_in_ci() -> None:
    assert {
        "default-values.yaml",
        "gpu-sidecar-values.yaml",
        "gpu-triton-values.yaml",
        "minimal-values.yaml",
    } <= set(SCENARIOS)


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, scenario(name), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("name", SCENARIOS)
def test_objects_validate_against_kubernetes_1_30(chart, name: str) -> None:
    objs = render(chart, scenario(name))
    assert objs
    for obj in objs:
        if obj["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {exc.path}")


@pytest.mark.parametrize("name", SCENARIOS)
def test_pods_are_restricted(chart, name: str) -> None:
    objs = render(chart, scenario(name))
    pods = [pod_spec(d) for d in by_kind(objs, "Deployment").values()]
    pods += [o["spec"] for o in objs if o["kind"] == "Pod"]  # the helm test pod
    assert pods
    for spec in pods:
        assert spec["automountServiceAccountToken"] is False
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        tmp_volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True, c["name"]
            assert csc["allowPrivilegeEscalation"] is False, c["name"]
            assert csc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert c["resources"].get("limits", {}).get("memory"), c["name"]
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if spec.get("restartPolicy") != "Never":  # long-running: a sized /tmp
                assert tmp_volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"], c["name"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_selectors_are_stable_and_find_their_pods(chart, name: str) -> None:
    objs = render(chart, scenario(name))
    deployments = by_kind(objs, "Deployment")
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for n, d in deployments.items():
        selector = d["spec"]["selector"]["matchLabels"]
        # Selectors are immutable: nothing that changes with an upgrade may be in them.
        assert not {"helm.sh/chart", "app.kubernetes.io/version"} & set(selector)
        assert matches(selector, pod_labels[n])
        others = [m for m in deployments if m != n and matches(selector, pod_labels[m])]
        assert not others, f"{n}'s selector also selects {others}"
    for svc in by_kind(objs, "Service").values():
        chosen = [n for n, labels in pod_labels.items() if matches(svc["spec"]["selector"], labels)]
        assert len(chosen) == 1, (svc["metadata"]["name"], chosen)
        # Any container's ports: in sidecar mode the gateway Service also names Triton's.
        ports = {
            p["name"] for c in pod_spec(deployments[chosen[0]])["containers"] for p in c["ports"]
        }
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for o in by_kind(objs, kind).values():
            sel = o["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            assert [n for n, labels in pod_labels.items() if matches(sel["matchLabels"], labels)]
    for hpa in by_kind(objs, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments


# --- the gateway ----------------------------------------------------------------------------------


def test_gateway_probes_and_ports(chart) -> None:
    gw = component(render(chart), "Deployment", "gateway")
    c = container(gw, "gateway")
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = c["startupProbe"]
    # The HTTP port opens once models are loaded: room for a slow load before liveness.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    env = env_of(c)
    assert env["RESNET_SERVE_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "http": int(env["RESNET_SERVE_PORT"]),
        "grpc": int(env["RESNET_SERVE_GRPC_PORT"]),
    }


@pytest.mark.parametrize("name", SCENARIOS)
def test_grace_period_covers_drain_and_the_longest_request(chart, name: str) -> None:
    values = scenario(name)
    gw = component(render(chart, values), "Deployment", "gateway")
    env = env_of(container(gw, "gateway"))
    needed = float(env["RESNET_SERVE_DRAIN_SECONDS"]) + float(env["RESNET_SERVE_REQUEST_TIMEOUT_S"])
    assert pod_spec(gw)["terminationGracePeriodSeconds"] >= needed + 5


def test_a_grace_period_too_short_fails_the_render(chart) -> None:
    values = {"gateway": {"config": {"drainSeconds": 20, "requestTimeoutS": 30}}}
    gw = component(render(chart, values), "Deployment", "gateway")
    assert pod_spec(gw)["terminationGracePeriodSeconds"] == 55
    values["gateway"]["terminationGracePeriodSeconds"] = 54
    with pytest.raises(
        helm.HelmRenderError, match=r"shorter than drainSeconds \+ requestTimeoutS \+ 5 = 55"
    ):
        render(chart, values)
    values["gateway"]["terminationGracePeriodSeconds"] = 90
    assert (
        pod_spec(component(render(chart, values), "Deployment", "gateway"))[
            "terminationGracePeriodSeconds"
        ]
        == 90
    )


def test_values_map_one_to_one_onto_the_settings(chart) -> None:
    """Every setting is a value or set by the chart; every value is a setting; Helm's own
    snakecase turns each value's name into its variable; the defaults are the gateway's."""
    config = chart.values["gateway"]["config"]
    fields = set(Settings.model_fields)
    assert {helm_key(f) for f in fields - CHART_OWNED} == set(config), "values.yaml vs settings"
    # values.schema.json's gateway.config is generated from the settings (make docs).
    schema = json.loads((ROOT / SCHEMA).read_text())
    assert schema["properties"]["gateway"]["properties"]["config"] == config_schema(), (
        "values.schema.json is stale: run `make docs`"
    )
    env = env_of(container(component(render(chart), "Deployment", "gateway"), "gateway"))
    names = {n.removeprefix("RESNET_SERVE_").lower() for n in env if n.startswith("RESNET_SERVE_")}
    # null values (defaultModel, maxBatchSize, exclusiveCpus...) stay unset: the gateway's
    # own default decides; without Triton or keys, so do those.
    null = {f for f in fields - CHART_OWNED if config[helm_key(f)] is None}
    assert {"default_model", "exclusive_cpus"} <= null
    assert names == fields - {"api_keys", "admin_keys", "triton_url", "triton_admin_key", *null}
    # The rendered environment is one the gateway accepts, and means what values.yaml says.
    settings = Settings.model_validate(
        {n.removeprefix("RESNET_SERVE_").lower(): v for n, v in env.items()}
    )
    defaults = Settings.model_construct()
    differs = {f for f in fields - CHART_OWNED if getattr(settings, f) != getattr(defaults, f)}
    # The one deliberate difference: a pod must drain while endpoints stop sending to it.
    assert differs == {"drain_seconds"}


def test_every_value_reaches_the_gateway_as_typed(chart) -> None:
    """Numbers keep their integer form (Helm reads every number as a float), lists are
    comma-separated, and the gateway reads each back to the value given."""
    given = {
        "grpcMaxMessageBytes": 123456789,
        "maxBatchDelayMs": 2.5,
        "models": ["a", "b"],
        "maxBatchSize": 16,
        "jpegDraft": False,
        "logLevel": "debug",
        "defaultModel": "a",
        "targetP99Ms": 240,
        "pollIntervalS": 2.5,
    }
    env = env_of(
        container(
            component(render(chart, {"gateway": {"config": given}}), "Deployment", "gateway"),
            "gateway",
        )
    )
    assert env["RESNET_SERVE_GRPC_MAX_MESSAGE_BYTES"] == "123456789"
    assert env["RESNET_SERVE_MODELS"] == "a,b"
    settings = Settings.model_validate(
        {
            n.removeprefix("RESNET_SERVE_").lower(): v
            for n, v in env.items()
            if n.startswith("RESNET_SERVE_") and isinstance(v, str)
        }
    )
    for key, value in given.items():
        field = next(f for f in Settings.model_fields if helm_key(f) == key)
        assert getattr(settings, field) == value, key


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"config": {"maxBatchDelayMs": -1}}}, "/gateway/config/maxBatchDelayMs"),
        ({"gateway": {"config": {"maxBatchDelay": 5}}}, "additional properties 'maxBatchDelay'"),
        ({"gateway": {"config": {"logLevel": "verbose"}}}, "/gateway/config/logLevel"),
        ({"gateway": {"config": {"requestTimeoutS": "10s"}}}, "/gateway/config/requestTimeoutS"),
        ({"triton": {"image": {"tag": 25.01}}}, "/triton/image/tag"),
        ({"modelRepository": {"source": "s3"}}, "/modelRepository/source"),
        ({"gateway": {"ports": {"http": 70000}}}, "/gateway/ports/http"),
        ({"gateway": {"apiKeys": {"keys": ["a,b"]}}}, "/gateway/apiKeys/keys/0"),
        ({"gateway": {"adminKeys": {"keys": ["a b"]}}}, "/gateway/adminKeys/keys/0"),
        # Keys are never a plain gateway.config value: they come from a Secret.
        ({"gateway": {"config": {"adminKeys": ["k"]}}}, "additional properties 'adminKeys'"),
        (
            {"gateway": {"config": {"tritonAdminKey": "k"}}},
            "additional properties 'tritonAdminKey'",
        ),
        ({"gateway": {"config": {"pollIntervalS": -1}}}, "/gateway/config/pollIntervalS"),
        ({"triton": {"extraArgs": ["model-control-mode=poll"]}}, "/triton/extraArgs/0"),
        ({"triton": {"shmSizeLimit": "1G"}}, "/triton/shmSizeLimit"),  # the chart adds Ki/Mi/Gi
        ({"triton": {"sidecar": {"bytesPerImage": 0}}}, "/triton/sidecar/bytesPerImage"),
        ({"replicas": 3}, "additional properties 'replicas'"),
    ],
)
def test_bad_values_are_refused_at_render(chart, values, message) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, values)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gateway": {"extraEnv": [{"name": "RESNET_SERVE_PORT", "value": "1"}]}},
            "RESNET_SERVE_PORT is a gateway setting",
        ),
        (
            {"gateway": {"extraEnv": [{"name": "RESNET_SERVE_ADMIN_KEYS", "value": "k"}]}},
            "RESNET_SERVE_ADMIN_KEYS is a gateway setting",
        ),
        (
            {"gateway": {"extraEnv": [{"name": "RESNET_SERVE_TRITON_ADMIN_KEY", "value": "k"}]}},
            "RESNET_SERVE_TRITON_ADMIN_KEY is a gateway setting",
        ),
        ({"modelRepository": {"source": "fetch"}}, "modelRepository.fetch.url is required"),
        ({"triton": {"enabled": True}, "gateway": {"gpus": 1}}, "the gateway needs no GPU"),
        (
            {
                "triton": {
                    "enabled": True,
                    "autoscaling": {"enabled": True, "keda": {"enabled": True}},
                }
            },
            "triton.autoscaling.keda.serverAddress is required",
        ),
        (
            {
                "triton": {
                    "enabled": True,
                    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2},
                }
            },
            "triton.autoscaling: minReplicas 3 is above maxReplicas 2",
        ),
        (
            # The previous default: none of the fixes of NVIDIA's 2026 Triton bulletins.
            {"triton": {"enabled": True, "image": {"tag": "25.11-py3"}}},
            r"triton\.image\.tag 25\.11-py3 lacks fixes for [^:]*CVE-2026-24207[^:]*: use ",
        ),
        (
            {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
            "minReplicas 5 is above maxReplicas 2",
        ),
    ],
)
def test_inconsistent_values_fail_with_the_reason(chart, values, message) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


# --- Triton's release and its fixes (files/triton-releases.yaml) ---------------------------------

TRITON_RELEASES = CHART / "files" / "triton-releases.yaml"


def triton_releases() -> dict[str, Any]:
    return yaml.safe_load(TRITON_RELEASES.read_text())


def fixed_in() -> dict[str, str]:
    """Each CVE of the data file and the release that fixes it, computed here, apart from
    the template's own reading of the file."""
    return {
        fix["cve"]: release["release"]
        for release in triton_releases()["releases"]
        for fix in release.get("fixes") or []
    }


def newest_fixing_release() -> str:
    return max(set(fixed_in().values()), key=float)


def default_triton_tag() -> str:
    return yaml.safe_load((CHART / "values.yaml").read_text())["triton"]["image"]["tag"]


def triton_image(objs: list[dict[str, Any]]) -> str:
    return container(component(objs, "Deployment", "triton"), "triton")["image"]


def test_triton_release_data_cites_a_bulletin_for_every_cve() -> None:
    """Every CVE comes with the NVIDIA bulletin it is read from (listed, with its URL in
    NVIDIA/product-security, and cited in the file's header), once, under one YY.MM
    release; the releases are ascending."""
    data = triton_releases()
    text = TRITON_RELEASES.read_text()
    bulletins = {int(k): v for k, v in data["bulletins"].items()}
    checked = data["checked"]
    assert checked == "2026-12-07"
    for bid, b in bulletins.items():
        year = b["published"][:4]
        assert (
            b["url"]
            == f"https://github.com/NVIDIA/product-security/blob/main/{year}/{bid}/{bid}.md"
        )
        assert f"{year}/{bid}/{bid}.md" in text.split("\nchecked:")[0]  # the header cites it
        assert b["published"] <= checked and "Triton Inference Server" in b["title"]
    releases = [r["release"] for r in data["releases"]]
    assert all(isinstance(r, str) and re.fullmatch(r"\d{2}\.\d{2}", r) for r in releases)
    assert releases == sorted(releases, key=float) and len(set(releases)) == len(releases)
    cves = [fix["cve"] for r in data["releases"] for fix in r.get("fixes") or []]
    assert len(cves) == len(set(cves)), "a CVE under two releases"
    cited = set()
    for r in data["releases"]:
        for fix in r.get("fixes") or []:
            assert re.fullmatch(r"CVE-\d{4}-\d{4,}", fix["cve"]), fix
            assert fix["bulletin"] in bulletins, fix
            assert fix["url"] == bulletins[fix["bulletin"]]["url"], fix
            assert 0 < float(fix["cvss"]) <= 10, fix
            cited.add(fix["bulletin"])
    assert cited == set(bulletins)  # no bulletin listed for nothing
    # What DESIGN.md's Triton row says, as the bulletins have it.
    by_cve = {f["cve"]: (r["release"], f) for r in data["releases"] for f in r["fixes"] or []}
    for cve, release, bulletin in (
        ("CVE-2026-24207", "26.03", 5828),
        ("CVE-2026-47627", "26.06", 5865),
    ):
        assert by_cve[cve][0] == release and by_cve[cve][1]["bulletin"] == bulletin
        assert float(by_cve[cve][1]["cvss"]) == 9.8


def test_default_triton_is_the_newest_fully_fixed_release(chart) -> None:
    """The default tag is the newest release of the data file (one listed with no fixes
    may be newer than the last that fixes something), so it has every fix the file lists;
    the TensorRT images (the chart's engine builds and resnet-export's build Job) follow it,
    and the docs name it."""
    from export.build_job import TRT_IMAGE

    newest = max((r["release"] for r in triton_releases()["releases"]), key=float)
    assert float(newest) >= float(newest_fixing_release())
    tag = default_triton_tag()
    assert tag == f"{newest}-py3"
    assert not [cve for cve, release in fixed_in().items() if float(release) > float(newest)]
    assert triton_image(render(chart, {"triton": {"enabled": True}})) == (
        f"nvcr.io/nvidia/tritonserver:{tag}"
    )
    assert TRT_IMAGE.rsplit(":", 1) == ["nvcr.io/nvidia/tensorrt", tag]
    assert f"`{tag}`" in (ROOT / "docs" / "kubernetes.md").read_text()


@pytest.mark.parametrize(
    "tag",
    # Each listed release, a release the list skips (25.11, the previous default), one
    # older than all, one newer than all, and other suffixes.
    [f"{r['release']}-py3" for r in yaml.safe_load(TRITON_RELEASES.read_text())["releases"]]
    + ["24.11-py3", "25.11-py3", "27.01-py3", "26.06-py3-min", "26.01"],
)
def test_a_triton_release_renders_only_with_every_fix(chart, tag: str) -> None:
    """A release older than a release that fixes a CVE fails the render with one line that
    names exactly the CVEs it lacks (computed here from the data file) and the release that
    has them all, in the tag's own flavour; the others render."""
    release = tag[:5]
    missing = sorted(cve for cve, fix in fixed_in().items() if float(fix) > float(release))
    values = {"triton": {"enabled": True, "image": {"tag": tag}}}
    if not missing:
        assert triton_image(render(chart, values)) == f"nvcr.io/nvidia/tritonserver:{tag}"
        return
    with pytest.raises(helm.HelmRenderError) as err:
        render(chart, values)
    message = str(err.value).split("): ", 1)[1]  # after Helm's "execution error at (...)"
    assert "\n" not in message.strip()
    assert message.strip() == (
        f"triton.image.tag {tag} lacks fixes for {', '.join(missing)}: use "
        f"{newest_fixing_release()}{tag[5:]} or later, or set triton.image.acceptUnpatched=true"
    )


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ({}, None),  # the default: the newest release, with every fix
        ({"tag": "25.11-py3", "acceptUnpatched": True}, "nvcr.io/nvidia/tritonserver:25.11-py3"),
        ({"tag": "24.12-py3", "acceptUnpatched": True}, "nvcr.io/nvidia/tritonserver:24.12-py3"),
        (
            {"repository": "registry.local/triton", "tag": "our-build-7"},
            "registry.local/triton:our-build-7",
        ),
    ],
)
def test_tritons_tag_is_a_patched_release_unless_accepted(chart, image, expected) -> None:
    """The render takes a Triton release with every listed fix, an older one only when
    acceptUnpatched says so (then in the TensorRT engine builds too), and a tag that is no
    release number as it is."""
    objs = render(
        chart, {"triton": {"enabled": True, "tensorrt": {"enabled": True}, "image": image}}
    )
    got = triton_image(objs)
    if expected is None:
        assert got == f"nvcr.io/nvidia/tritonserver:{default_triton_tag()}"
    else:
        assert got == expected
    (init,) = pod_spec(component(objs, "Deployment", "triton"))["initContainers"]
    assert init["image"] == f"nvcr.io/nvidia/tensorrt:{got.rsplit(':', 1)[1]}"


@pytest.mark.parametrize(("keys", "variable"), KEY_SETS)
def test_keys_come_from_a_secret(chart, keys: str, variable: str) -> None:
    objs = render(chart, {"gateway": {keys: {"keys": ["k1", "k2"]}}})
    (secret,) = by_kind(objs, "Secret").values()
    env = env_of(container(component(objs, "Deployment", "gateway"), "gateway"))
    ref = env[variable]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == "k1,k2"
    assert set(env) & {v for _, v in KEY_SETS} == {variable}  # the other set stays off
    objs = render(
        chart, {"gateway": {keys: {"existingSecret": "mine", "existingSecretKey": "keys"}}}
    )
    assert not by_kind(objs, "Secret")
    env = env_of(container(component(objs, "Deployment", "gateway"), "gateway"))
    assert env[variable]["secretKeyRef"] == {"name": "mine", "key": "keys"}
    env = env_of(container(component(render(chart), "Deployment", "gateway"), "gateway"))
    assert variable not in env  # no keys: no variable, no Secret


def test_api_and_admin_keys_are_kept_apart(chart) -> None:
    """Two Secrets, so that access to one does not give the other; the `helm test` pod
    gets the API key only."""
    objs = render(
        chart, {"gateway": {"apiKeys": {"keys": ["api"]}, "adminKeys": {"keys": ["admin"]}}}
    )
    secrets = by_kind(objs, "Secret")
    env = env_of(container(component(objs, "Deployment", "gateway"), "gateway"))
    refs = {v: env[v]["secretKeyRef"] for _, v in KEY_SETS}
    assert len({r["name"] for r in refs.values()}) == 2
    for variable, value in (("RESNET_SERVE_API_KEYS", "api"), ("RESNET_SERVE_ADMIN_KEYS", "admin")):
        data = secrets[refs[variable]["name"]]["data"]
        assert list(data) == [refs[variable]["key"]]
        assert base64.b64decode(data[refs[variable]["key"]]).decode() == value
    (pod,) = by_kind(objs, "Pod").values()
    (test_env,) = [env_of(c) for c in pod["spec"]["containers"]]
    assert test_env["API_KEY"]["secretKeyRef"] == refs["RESNET_SERVE_API_KEYS"]
    assert "admin" not in json.dumps(pod) and refs["RESNET_SERVE_ADMIN_KEYS"]["name"] not in (
        json.dumps(pod)
    )


@pytest.mark.parametrize(("keys", "variable"), KEY_SETS)
def test_pods_roll_when_keys_given_in_values_change(chart, keys: str, variable: str) -> None:
    """The gateway reads its keys at start: a checksum of the keys given in values changes
    the pod template, so an upgrade that changes them rolls the pods."""

    def annotations(values: dict[str, Any]) -> dict[str, str]:
        gw = component(render(chart, {"gateway": {keys: values}}), "Deployment", "gateway")
        return gw["spec"]["template"]["metadata"].get("annotations") or {}

    name = f"checksum/{'api-keys' if keys == 'apiKeys' else 'admin-keys'}"
    one, two = annotations({"keys": ["k1"]}), annotations({"keys": ["k2"]})
    assert one[name] != two[name]
    assert {k for k in one if k.startswith("checksum/")} == {name}
    # An existing Secret is the operator's: the chart cannot see it change.
    assert name not in annotations({"existingSecret": "mine"})


def test_pdb_only_where_it_can_hold(chart) -> None:
    assert component(render(chart), "PodDisruptionBudget", "gateway")["spec"]["maxUnavailable"] == 1
    # One replica: a PDB with maxUnavailable 1 would still allow it, but blocks nothing;
    # with minAvailable it would block node drains forever. None is rendered.
    assert not by_kind(render(chart, {"gateway": {"replicaCount": 1}}), "PodDisruptionBudget")


def test_hpa_on_cpu_and_queue_depth(chart) -> None:
    objs = render(chart, scenario("gpu-triton-values.yaml"))
    hpa = component(objs, "HorizontalPodAutoscaler", "gateway")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "resnet_serve_queue_depth"
    # The HPA owns the replica count: the Deployment must not fight it on every upgrade.
    assert "replicas" not in component(objs, "Deployment", "gateway")["spec"]
    assert not by_kind(render(chart), "HorizontalPodAutoscaler")


def test_triton_scales_on_its_own_queue(chart) -> None:
    """triton.autoscaling: an HPA on Triton's pending requests and queue time per pod (the
    Pods metrics deploy/prometheus/adapter-rules.yaml serves, as it serves the gateway's),
    or a KEDA ScaledObject with the same two signals queried from Prometheus; either owns
    the replica count, and a PDB keeps one Triton through node drains."""
    values = {
        "gateway": {"autoscaling": {"enabled": True, "queueDepth": {"enabled": True}}},
        "triton": {"enabled": True, "autoscaling": {"enabled": True, "maxReplicas": 6}},
    }
    objs = render(chart, values)
    hpa = component(objs, "HorizontalPodAutoscaler", "triton")
    triton = component(objs, "Deployment", "triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == triton["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
    assert "replicas" not in triton["spec"]
    assert component(objs, "PodDisruptionBudget", "triton")
    metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"]}
    assert metrics == {
        "nv_inference_pending_request_count": {"type": "AverageValue", "averageValue": "16"},
        "nv_inference_queue_duration_us_per_request": {
            "type": "AverageValue",
            "averageValue": "20000",
        },
    }
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    # What both HPAs ask for is what the adapter rules serve.
    pods_metrics = {
        m["pods"]["metric"]["name"]
        for h in by_kind(objs, "HorizontalPodAutoscaler").values()
        for m in h["spec"]["metrics"]
        if m["type"] == "Pods"
    }
    assert pods_metrics == {r["name"]["as"] for r in promql.adapter_rules()}

    keda = {"enabled": True, "serverAddress": "http://prometheus-operated.monitoring:9090"}
    values["triton"]["autoscaling"]["keda"] = keda
    objs = render(chart, values)
    assert "triton" not in {
        h["metadata"]["labels"]["app.kubernetes.io/component"]
        for h in by_kind(objs, "HorizontalPodAutoscaler").values()
    }
    (scaled,) = by_kind(objs, "ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == triton["metadata"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 6)
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["spec"]["behavior"]
    triggers = scaled["spec"]["triggers"]
    assert [(t["type"], t["metricType"], t["metadata"]["threshold"]) for t in triggers] == [
        ("prometheus", "AverageValue", "16"),
        ("prometheus", "Value", "20000"),
    ]
    for t in triggers:
        assert t["metadata"]["serverAddress"] == keda["serverAddress"]
        q = promql.parse("keda", t["metadata"]["query"])
        # This release's Triton pods only, by the labels their scrape targets carry.
        for use in q.uses:
            assert use.metric.startswith("nv_inference_"), use
            assert use.labels == {"namespace", "service"}, use
        assert f'service="{triton["metadata"]["name"]}"' in t["metadata"]["query"]
        assert 'namespace="ml"' in t["metadata"]["query"]
    # The same two signals as the adapter's rules.
    uses = {u.metric for t in triggers for u in promql.parse("k", t["metadata"]["query"]).uses}
    adapted = {u.metric for q in promql.adapter_queries() for u in q.uses}
    assert uses <= adapted


def test_rolling_update_keeps_capacity(chart) -> None:
    for d in by_kind(render(chart, scenario("gpu-triton-values.yaml")), "Deployment").values():
        assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


# --- the model repository -------------------------------------------------------------------------


def test_gateway_and_triton_read_the_same_repository(chart) -> None:
    objs = render(chart, scenario("gpu-triton-values.yaml"))
    gw = component(objs, "Deployment", "gateway")
    triton = component(objs, "Deployment", "triton")
    claims = {
        n: {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec(d)["volumes"]
            if "persistentVolumeClaim" in v
        }
        for n, d in (("gateway", gw), ("triton", triton))
    }
    assert claims["gateway"] == claims["triton"] == {"resnet-models"}
    env = env_of(container(gw, "gateway"))
    mount = {m["name"]: m for m in container(gw, "gateway")["volumeMounts"]}["models"]
    assert env["RESNET_SERVE_REPOSITORY"] == mount["mountPath"] and mount["readOnly"] is True


def test_fetch_copies_the_repository_into_each_pod(chart) -> None:
    objs = render(chart, scenario("fetch-gpu-embedded-values.yaml"))
    gw = component(objs, "Deployment", "gateway")
    (fetch,) = pod_spec(gw)["initContainers"]
    env = env_of(fetch)
    assert env["SOURCE_URL"] == "s3://models/resnet-serving/"
    assert env["MODEL_REPOSITORY"] == env_of(container(gw, "gateway"))["RESNET_SERVE_REPOSITORY"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    volumes = {v["name"]: v for v in pod_spec(gw)["volumes"]}
    assert volumes["models"]["emptyDir"]["sizeLimit"]
    assert not by_kind(objs, "PersistentVolumeClaim")
    assert container(gw, "gateway")["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_an_empty_claim_is_created_and_kept(chart) -> None:
    (pvc,) = by_kind(render(chart), "PersistentVolumeClaim").values()
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not by_kind(render(chart, scenario("default-values.yaml")), "PersistentVolumeClaim")


# --- Triton ---------------------------------------------------------------------------------------


def triton_args(objs: list[dict[str, Any]]) -> list[str]:
    return container(component(objs, "Deployment", "triton"), "triton")["args"]


def test_no_triton_by_default(chart) -> None:
    objs = render(chart)
    assert not [
        o for o in objs if o["metadata"]["labels"].get("app.kubernetes.io/component") == "triton"
    ]
    env = env_of(container(component(objs, "Deployment", "gateway"), "gateway"))
    assert env["RESNET_SERVE_BACKEND"] == "onnxruntime"
    assert "RESNET_SERVE_TRITON_URL" not in env and "RESNET_SERVE_TRITON_ADMIN_KEY" not in env
    assert not by_kind(objs, "Secret")  # no Triton: no Triton admin key either


def test_triton_is_hardened_and_reached_through_a_headless_service(chart) -> None:
    objs = render(chart, {"triton": {"enabled": True}})
    args = triton_args(objs)
    # Every model at start, then what the gateway loads and unloads (service.runtime.lifecycle).
    assert "--model-control-mode=explicit" in args and "--load-model=*" in args
    assert not [a for a in args if a.startswith("--model-control-mode=") and "explicit" not in a]
    # A failed load request must not take the pod out of the Service while the versions
    # already loaded serve on (strict readiness would, measured with Triton 2.51).
    assert "--strict-readiness=false" in args and "--exit-on-error=true" in args
    assert "--disable-auto-complete-config" in args
    for flag in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        (arg,) = [a for a in args if a.startswith(flag)]
        apis, _, key = arg.removeprefix(flag).partition(":")
        assert {"shared-memory", "model-repository"} <= set(apis.split(","))
        assert key == "triton-admin-key=$(TRITON_ADMIN_KEY)"
    assert not any(a.startswith("--model-config-name") for a in args)
    triton = component(objs, "Deployment", "triton")
    c = container(triton, "triton")
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"] for p in c["ports"]}
    assert ports == {"http", "grpc", "metrics"}
    svc = component(objs, "Service", "triton")
    assert svc["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in svc["spec"]["ports"]} == ports
    env = env_of(container(component(objs, "Deployment", "gateway"), "gateway"))
    assert env["RESNET_SERVE_BACKEND"] == "triton"
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert env["RESNET_SERVE_TRITON_URL"] == f"dns:///{svc['metadata']['name']}.ml.svc:{grpc_port}"
    # Triton's grace period covers its own exit timeout.
    timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert pod_spec(triton)["terminationGracePeriodSeconds"] > timeout


def test_the_gateway_holds_tritons_admin_key(chart) -> None:
    """Triton takes load and unload requests only with its admin key: the gateway, which
    loads and unloads versions, reads it from Triton's own Secret (never a plain value);
    nothing else gets it."""
    objs = render(chart, {"triton": {"enabled": True}, "gateway": {"apiKeys": {"keys": ["k"]}}})
    secrets = by_kind(objs, "Secret")
    triton_env = env_of(container(component(objs, "Deployment", "triton"), "triton"))
    ref = triton_env["TRITON_ADMIN_KEY"]["secretKeyRef"]
    assert ref == {
        "name": component(objs, "Secret", "triton")["metadata"]["name"],
        "key": "admin-key",
    }
    key = base64.b64decode(secrets[ref["name"]]["data"]["admin-key"]).decode()
    assert len(key) == 32 and key.isalnum()
    gateway = container(component(objs, "Deployment", "gateway"), "gateway")
    (var,) = [e for e in gateway["env"] if e["name"] == "RESNET_SERVE_TRITON_ADMIN_KEY"]
    assert var == {"name": var["name"], "valueFrom": {"secretKeyRef": ref}}
    # Nothing else refers to it: not the helm test pod, not another Secret.
    (pod,) = by_kind(objs, "Pod").values()
    assert ref["name"] not in json.dumps(pod)
    assert key not in json.dumps([o for o in objs if o is not secrets[ref["name"]]])


def test_only_the_gateway_reaches_triton(chart) -> None:
    objs = render(chart, scenario("gpu-triton-values.yaml"))
    policy = component(objs, "NetworkPolicy", "triton")
    gw_labels = component(objs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    rules = policy["spec"]["ingress"]
    inference = [r for r in rules if {p["port"] for p in r["ports"]} & {"grpc", "http"}]
    assert len(inference) == 1
    (peer,) = inference[0]["from"]
    assert set(peer) == {"podSelector"} and matches(peer["podSelector"]["matchLabels"], gw_labels)
    (metrics,) = [r for r in rules if r not in inference]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"][0]["namespaceSelector"]
    # The gateway: its API from the ingress controller, `helm test` from the chart's test
    # pod, /metrics (HTTP port) from Prometheus.
    api, tester, scrape = component(objs, "NetworkPolicy", "gateway")["spec"]["ingress"]
    assert api["from"] == scenario("gpu-triton-values.yaml")["networkPolicy"]["ingressFrom"]
    assert tester["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert tester["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
    assert scrape["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert scrape["from"] == metrics["from"]


def candidate_peers(objs: list[dict[str, Any]], values: dict[str, Any]) -> dict[str, dict]:
    """Who might knock on Triton's ports: the gateway's pods, the chart's `helm test` pod,
    any other pod of the namespace, pods of another namespace (one carrying the gateway's
    labels), the ingress controller and the metrics scraper as the values configure them."""
    gateway = component(objs, "Deployment", "gateway")["spec"]["template"]["metadata"]
    (test_pod,) = by_kind(objs, "Pod").values()
    peers = {
        "gateway pod": {"namespace": RELEASE_NS, "labels": gateway["labels"]},
        "helm test pod": {"namespace": RELEASE_NS, "labels": test_pod["metadata"]["labels"]},
        "a pod of the namespace": {"namespace": RELEASE_NS, "labels": {"app": "debug"}},
        "a pod of another namespace": {"namespace": "other", "labels": {"app": "debug"}},
        "gateway-labelled pod of another namespace": {
            "namespace": "other",
            "labels": gateway["labels"],
        },
    }
    for d in by_kind(objs, "Deployment").values():  # Triton in pods of its own: another one
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "triton":
            labels = d["spec"]["template"]["metadata"]["labels"]
            peers["triton pod"] = {"namespace": RELEASE_NS, "labels": labels}

    def from_peer(peer: dict[str, Any], default_labels: dict[str, str]) -> dict[str, Any]:
        ns = (
            (peer.get("namespaceSelector") or {})
            .get("matchLabels", {})
            .get("kubernetes.io/metadata.name", RELEASE_NS)
        )
        labels = (peer.get("podSelector") or {}).get("matchLabels") or default_labels
        return {"namespace": ns, "labels": labels}

    net = values["networkPolicy"]
    for peer in net.get("ingressFrom") or []:
        peers["ingress controller"] = from_peer(peer, {"app.kubernetes.io/name": "ingress-nginx"})
    (scraper,) = net["metricsFrom"]  # the scenarios name one
    peers["metrics scraper"] = from_peer(scraper, {"app.kubernetes.io/name": "prometheus"})
    for p in peers.values():
        p["ip"] = "10.0.0.1"
    return peers


@pytest.mark.parametrize("layout", ["gpu-triton-values.yaml", "gpu-sidecar-values.yaml"])
def test_tritons_ports_admit_only_the_gateway_and_the_scraper(chart, layout: str) -> None:
    """Every rendered NetworkPolicy, evaluated as Kubernetes would for each candidate peer
    and each of Triton's ports (HTTP, gRPC, metrics, by number): Triton in pods of its own
    takes HTTP and gRPC from the gateway's pods only and metrics from the scraper only. In
    sidecar mode the gateway calls its Triton on loopback (127.0.0.1, which no
    NetworkPolicy governs and where Triton's gRPC alone listens): no other pod reaches
    Triton's HTTP or gRPC there, and metrics only the scraper."""
    values = scenario(layout)
    objs = render(chart, values)
    policies = list(by_kind(objs, "NetworkPolicy").values())
    sidecar = values["triton"].get("sidecar", {}).get("enabled", False)
    host = component(objs, "Deployment", "gateway" if sidecar else "triton")
    spec = pod_spec(host)
    dst = {
        "namespace": RELEASE_NS,
        "labels": host["spec"]["template"]["metadata"]["labels"],
        "containers": spec["containers"],
    }
    triton = container(host, "triton")
    flag = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in triton["args"] if "=" in a}
    ports = {kind: int(flag[f"--{kind}-port"]) for kind in ("http", "grpc", "metrics")}
    # The ports Triton declares are these (gRPC in sidecar mode is loopback-only, undeclared).
    declared = {p["containerPort"] for p in triton["ports"]}
    assert declared == set(ports.values()) - ({ports["grpc"]} if sidecar else set())
    if sidecar:
        assert flag["--grpc-address"] == "127.0.0.1"
        assert env_of(container(host, "gateway"))["RESNET_SERVE_TRITON_URL"] == (
            f"127.0.0.1:{ports['grpc']}"
        )
    peers = candidate_peers(objs, values)
    expected = {name: set() for name in peers}
    expected["metrics scraper"] = {"metrics"}
    if not sidecar:
        expected["gateway pod"] = {"http", "grpc"}
    got = {
        name: {kind for kind, port in ports.items() if admitted(policies, dst, src, port)}
        for name, src in peers.items()
    }
    assert got == expected
    # The evaluator itself: without the policies every peer reaches every port.
    assert all(admitted([], dst, src, port) for src in peers.values() for port in ports.values())
    # ... and the gateway pod's own API stays as ingressFrom says (not Triton's business).
    if sidecar:
        gw_http = int(env_of(container(host, "gateway"))["RESNET_SERVE_PORT"])
        assert admitted(policies, dst, peers["a pod of another namespace"], gw_http)


@pytest.mark.parametrize("layout", sorted(p.name for p in (CHART / "ci").glob("*-values.yaml")))
def test_helm_test_reaches_the_gateway_in_every_scenario(chart, layout: str) -> None:
    """`helm test`'s pod classifies through the gateway's HTTP port, which every scenario's
    policies admit it to (ingressFrom narrows the port to the ingress, the scrapers and
    that pod), and no further: not gRPC, not Triton's ports."""
    values = scenario(layout)
    objs = render(chart, values)
    policies = list(by_kind(objs, "NetworkPolicy").values())
    gateway = component(objs, "Deployment", "gateway")
    dst = {
        "namespace": RELEASE_NS,
        "labels": gateway["spec"]["template"]["metadata"]["labels"],
        "containers": pod_spec(gateway)["containers"],
    }
    (test_pod,) = by_kind(objs, "Pod").values()
    tester = {"namespace": RELEASE_NS, "labels": test_pod["metadata"]["labels"], "ip": "10.0.0.1"}
    stranger = {"namespace": "other", "labels": {"app": "debug"}, "ip": "10.0.0.1"}
    env = env_of(container(gateway, "gateway"))
    http, grpc = int(env["RESNET_SERVE_PORT"]), int(env["RESNET_SERVE_GRPC_PORT"])
    assert admitted(policies, dst, tester, http)
    narrowed = bool((values.get("networkPolicy") or {}).get("ingressFrom")) and policies
    assert admitted(policies, dst, stranger, http) is not narrowed
    assert admitted(policies, dst, tester, grpc) is not narrowed


def test_tensorrt_engines_are_built_on_the_serving_node(chart) -> None:
    objs = render(chart, scenario("gpu-triton-values.yaml"))
    triton = component(objs, "Deployment", "triton")
    args = triton_args(objs)
    assert "--model-config-name=tensorrt" in args
    (init,) = pod_spec(triton)["initContainers"]
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1  # the GPU that will serve
    # Engines are built by the TensorRT release Triton runs.
    tag = container(triton, "triton")["image"].rsplit(":", 1)[1]
    assert init["image"] == f"nvcr.io/nvidia/tensorrt:{tag}"
    repo = next(a for a in args if a.startswith("--model-repository=")).split("=", 1)[1]
    script = " ".join(init["command"])
    assert f"python3 /scripts/trt_node.py --repository {repo}" in script
    assert "--require" not in script  # an engine that fails to build falls back to ONNX
    (cm,) = by_kind(objs, "ConfigMap").values()
    assert cm["data"]["trt_node.py"] == (ROOT / "export" / "trt_node.py").read_text()
    # Triton's copy is pod-local and writable by the init container only.
    mounts = {m["name"]: m for m in container(triton, "triton")["volumeMounts"]}
    assert mounts["triton-models"]["readOnly"] is True


def test_sidecar_mode_runs_triton_beside_each_gateway_through_shared_memory(chart) -> None:
    """One pod per GPU: the gateway and Triton side by side, Triton's gRPC on loopback only,
    batches through a memory-backed /dev/shm that both mount, sized for the gateway's
    regions (one per batch in flight) on top of Triton's own share."""
    from service.backends.triton.backend import TritonBackend

    values = scenario("gpu-sidecar-values.yaml")
    objs = render(chart, values)
    assert not [
        o["kind"]
        for o in objs
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == "triton"
        and o["kind"] != "Secret"  # the admin key stays: shared memory is restricted to it
    ]
    gw = component(objs, "Deployment", "gateway")
    spec = pod_spec(gw)
    assert [c["name"] for c in spec["containers"]] == ["gateway", "triton"]
    names = [p["name"] for c in spec["containers"] for p in c["ports"]]
    assert len(names) == len(set(names))  # a pod's port names are unique
    gateway, triton = container(gw, "gateway"), container(gw, "triton")
    args = triton["args"]
    flag = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    assert flag["--grpc-address"] == "127.0.0.1"
    assert "shared-memory" in flag["--grpc-restricted-protocol"].split(":")[0].split(",")
    env = env_of(gateway)
    assert env["RESNET_SERVE_TRITON_URL"] == f"127.0.0.1:{flag['--grpc-port']}"
    assert env["RESNET_SERVE_TRITON_SHARED_MEMORY"] == "true"
    assert env["RESNET_SERVE_TRITON_ADMIN_KEY"] == env_of(triton)["TRITON_ADMIN_KEY"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == values["triton"]["nodeSelector"]  # a GPU node
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    # /dev/shm: one memory-backed volume that both containers mount there.
    for c in (gateway, triton):
        assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"], c["name"]
    (shm,) = [v for v in spec["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    sc = values["triton"]["sidecar"]
    regions = TritonBackend.max_inflight_batches * sc["maxBatchSize"] * sc["bytesPerImage"]
    mib = -(-(regions + 2**30) // 2**20)  # triton.shmSizeLimit's default 1Gi, then the regions
    assert shm["emptyDir"]["sizeLimit"] == f"{mib}Mi"
    # Triton outlives the gateway's drain and its last accepted request, then its own exit.
    grace = spec["terminationGracePeriodSeconds"]
    sleep = int(triton["lifecycle"]["preStop"]["exec"]["command"][1])
    gateway_needs = float(env["RESNET_SERVE_DRAIN_SECONDS"]) + float(
        env["RESNET_SERVE_REQUEST_TIMEOUT_S"]
    )
    assert sleep >= gateway_needs
    assert grace >= sleep + int(flag["--exit-timeout-secs"])
    # Scraped: the gateway's metrics and Triton's, both through the gateway Service.
    (sm,) = by_kind(objs, "ServiceMonitor").values()
    svc = component(objs, "Service", "gateway")
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["http", "triton-metrics"]
    (metrics_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "triton-metrics"]
    assert metrics_port["port"] == int(flag["--metrics-port"])
    policy = component(objs, "NetworkPolicy", "gateway")["spec"]["ingress"]
    (scrape,) = [r for r in policy if r["ports"] == [{"port": "triton-metrics", "protocol": "TCP"}]]
    assert scrape["from"] == values["networkPolicy"]["metricsFrom"]
    # Without sidecar mode the chart says gRPC: Triton is in pods of its own.
    apart = env_of(
        container(
            component(render(chart, {"triton": {"enabled": True}}), "Deployment", "gateway"),
            "gateway",
        )
    )
    assert apart["RESNET_SERVE_TRITON_SHARED_MEMORY"] == "false"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"triton": {"sidecar": {"enabled": True}}},
            "triton.sidecar.enabled: needs triton.enabled",
        ),
        (
            {
                "triton": {
                    "enabled": True,
                    "sidecar": {"enabled": True},
                    "autoscaling": {"enabled": True},
                }
            },
            "in sidecar mode each pod is a gateway and a Triton; scale them with gateway.autoscaling",
        ),
        (
            {
                "triton": {
                    "enabled": True,
                    "sidecar": {
                        "enabled": True,
                        "ports": {"http": 8000, "grpc": 8101, "metrics": 8102},
                    },
                }
            },
            "triton.sidecar.ports.http 8000 is a gateway port",
        ),
    ],
)
def test_sidecar_values_that_cannot_work_fail_the_render(chart, values, message) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


# --- monitoring -----------------------------------------------------------------------------------


def test_service_monitors_find_services_and_ports(chart) -> None:
    objs = render(chart, scenario("gpu-triton-values.yaml"))
    services = list(by_kind(objs, "Service").values())
    monitors = by_kind(objs, "ServiceMonitor")
    assert len(monitors) == 2
    for sm in monitors.values():
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        (svc,) = [
            s
            for s in services
            if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        (endpoint,) = sm["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_prometheus_rule_is_the_checked_rules_file(chart, tmp_path) -> None:
    objs = render(chart, scenario("gpu-triton-values.yaml"))
    (rule,) = by_kind(objs, "PrometheusRule").values()
    source = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == source
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules_file)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_notes_are_true(chart) -> None:
    notes = chart.render(values=scenario("gpu-triton-values.yaml"), name="rel", namespace="ml")[
        "resnet-serving/templates/NOTES.txt"
    ]
    assert (
        f"NVIDIA Triton (nvcr.io/nvidia/tritonserver:{default_triton_tag()}, 2-8 replicas scaled on "
        "its queue, TensorRT" in notes
    )
    assert "kubectl -n ml rollout status deployment/rel-resnet-serving-gateway" in notes
    assert "grace period 25 s" in notes  # drainSeconds 15 + requestTimeoutS 5 + 5
    assert "X-API-Key" in notes and "https://resnet.example.com" in notes
    assert "The admin API is on (keys in Secret resnet-admin-keys)" in notes
    assert "/v1/models/MODEL/reload" in notes and "looks at the repository" not in notes
    default = chart.render(name="rel", namespace="ml")["resnet-serving/templates/NOTES.txt"]
    assert "embedded ONNX Runtime" in default and "The claim starts empty" in default
    assert "http://localhost:8000/ to try a model" in default
    no_page = chart.render(values={"gateway": {"config": {"tryPage": False}}})
    assert "to try a model" not in no_page["resnet-serving/templates/NOTES.txt"]
    assert "admin API" not in default and "looks at the repository" not in default
    polling = chart.render(values=scenario("default-values.yaml"), name="rel", namespace="ml")[
        "resnet-serving/templates/NOTES.txt"
    ]
    assert "Every gateway looks at the repository every 30 s" in polling


def test_helm_test_pod_classifies_through_the_service(chart) -> None:
    objs = render(chart, {"gateway": {"apiKeys": {"keys": ["k1"]}}})
    (pod,) = by_kind(objs, "Pod").values()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["args"] == [(CHART / "files" / "classify_test.py").read_text()]
    env = env_of(c)
    svc = component(objs, "Service", "gateway")
    assert env["URL"] == f"http://{svc['metadata']['name']}:8000"
    assert env["API_KEY"]["secretKeyRef"]["name"] == by_kind(objs, "Secret").popitem()[0]


def test_chart_files_are_the_project_files() -> None:
    """The chart embeds the rules and the engine script through symlinks, so there is one
    copy of each (Helm packages the target's content)."""
    for name, target in (
        ("alerts.yml", "deploy/prometheus/alerts.yml"),
        ("trt_node.py", "export/trt_node.py"),
    ):
        link = CHART / "files" / name
        assert link.is_symlink() and link.resolve() == (ROOT / target).resolve()
