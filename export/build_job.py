"""The Kubernetes Job that builds one model version's TensorRT engine on a GPU node, in the
model repository's PersistentVolumeClaim: ``export/trt_node.py`` run with ``--require``
(``resnet-export tensorrt-job``). The builds themselves are :mod:`export.tensorrt`'s."""

from __future__ import annotations

import hashlib
import re
import shlex
from typing import Any

from export.errors import ExportError
from export.repository import check_name
from export.tensorrt import check_build_args

#: The image the build Job runs. Its YY.MM must be the Triton image's (nvcr.io/nvidia/
#: tritonserver:YY.MM-py3): both then ship the same TensorRT, the only one that loads the plan.
TRT_IMAGE = "nvcr.io/nvidia/tensorrt:26.07-py3"

_DNS_LABEL_MAX = 63


def job_name(model: str, version: int) -> str:
    """``trt-<model>-v<version>`` as a DNS-1123 label (what Kubernetes requires of a Job's
    name: at most 63 of [a-z0-9-], alphanumeric at both ends). A model name that had to be
    changed to fit gets a short hash of the original, so that ``ResNet_50`` and
    ``resnet-50`` never share a Job name."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    suffix = f"-v{version}"
    room = _DNS_LABEL_MAX - len("trt-") - len(suffix)
    if slug != model or len(slug) > room:
        digest = hashlib.sha256(model.encode()).hexdigest()[:6]
        slug = f"{slug[: room - len(digest) - 1].rstrip('-')}-{digest}".lstrip("-")
    return f"trt-{slug}{suffix}"


def trt_node_source() -> str:
    """The text of ``export/trt_node.py``, which the build Job runs with ``python3 -c``."""
    from importlib import resources

    return resources.files("export").joinpath("trt_node.py").read_text(encoding="utf-8")


def render_build_job(
    model: str,
    version: int,
    max_batch_size: int,
    precision: str,
    repository_claim: str = "model-repository",
    image: str = TRT_IMAGE,
    namespace: str | None = None,
) -> str:
    """A Kubernetes ``batch/v1`` Job (YAML) that builds ``<model>/<version>/model.plan``
    and its ``engine.json`` with trtexec on a GPU node, in the repository's PVC.

    The container runs ``export/trt_node.py`` (its source in the ``TRT_NODE`` variable, so
    the Job stays one self-contained document) with ``--require``: the Job fails when no
    engine is built, and it keeps an engine already built for the node's GPU and TensorRT.
    The repository's settings (input, precision, batch size) are read there, at run time.
    When the version is the newest, it also writes ``configs/tensorrt.pbtxt``."""
    import yaml

    check_name(model)  # also keeps the name from walking out of /models
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"model version must be a positive integer, got {version!r}")
    check_build_args(max_batch_size, precision)
    node_args = ["--repository", "/models", "--model", model, "--version", str(version)]
    script = f'exec python3 -c "$TRT_NODE" {shlex.join(node_args)} --require --verbose'
    name = job_name(model, version)
    labels = {
        "app.kubernetes.io/name": "resnet-serving",
        "app.kubernetes.io/component": "tensorrt-build",
    }
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = labels
    # Annotations, not labels: a model name may be longer than a label value may be.
    metadata["annotations"] = {
        "resnet-serving/model": model,
        "resnet-serving/version": str(version),
        "resnet-serving/precision": precision,
    }
    container = {
        "name": "build-engine",
        "image": image,
        "command": ["sh", "-c", script],
        "env": [{"name": "TRT_NODE", "value": trt_node_source()}],
        # The GPU the engine is built for: the node's, so schedule on nodes of the GPU
        # model that will serve it (add a nodeSelector on the GPU product label if the
        # cluster mixes models).
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "volumeMounts": [{"name": "models", "mountPath": "/models"}],
        # NVIDIA's NGC images run as root, and this one does too: it must write into the
        # repository, whose files the exporter may own. It gets no Linux capabilities and
        # cannot gain privileges, so root here cannot override file permissions: the model
        # directory (for configs/) and its version directory must be writable by uid 0
        # (or set runAsUser to their owner).
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 1,  # a build that fails twice will fail a third time
            "activeDeadlineSeconds": 3600,  # a hung build must not hold a GPU for ever
            "ttlSecondsAfterFinished": 86400,  # a day to read its logs, then it is removed
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "models",
                            "persistentVolumeClaim": {"claimName": repository_claim},
                        }
                    ],
                },
            },
        },
    }
    header = (
        f"# Generated by resnet-export: builds the TensorRT engine of {model} version "
        f"{version}\n# ({precision}, batch 1..{max_batch_size}) on a GPU node. The image's "
        "TensorRT must be Triton's: same YY.MM tag.\n"
    )
    return header + yaml.dump(job, Dumper=_block_dumper(yaml), sort_keys=False, width=100)


def _block_dumper(yaml: Any) -> Any:
    """yaml.safe_dump's SafeDumper, printing multi-line strings (the script) as ``|`` blocks
    so that the Job reads as the shell script it runs."""

    class BlockDumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True  # no &id001 anchors: the labels are repeated, as people write them

    def text(dumper: Any, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    BlockDumper.add_representer(str, text)
    return BlockDumper
