"""A NetworkPolicy evaluator: which peer may open a connection to which port of a pod, as
Kubernetes decides it (networking.k8s.io/v1 semantics), over a chart's rendered policies.
The chart's tests and the docs checker (whether `helm test`'s pod reaches the gateway) use it."""

from __future__ import annotations

import ipaddress
from typing import Any

RELEASE_NS = "ml"  # where the tests render the chart: its policies' and pods' namespace


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions, all of them; {} selects all."""
    if not all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}  # set on every namespace by Kubernetes


def peer_admits(peer: dict[str, Any], src: dict[str, Any], policy_ns: str) -> bool:
    """One `from` entry: podSelector alone means pods of the policy's namespace;
    namespaceSelector alone all pods of the namespaces it selects; both, those pods there."""
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(src["ip"])
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or []
        )
    assert "podSelector" in peer or "namespaceSelector" in peer, peer
    if "namespaceSelector" in peer:
        ns_ok = selector_matches(peer["namespaceSelector"], namespace_labels(src["namespace"]))
    else:
        ns_ok = src["namespace"] == policy_ns
    pod_ok = "podSelector" not in peer or selector_matches(peer["podSelector"], src["labels"])
    return ns_ok and pod_ok


def port_admits(entries: list[dict[str, Any]] | None, port: int, named: dict[str, int]) -> bool:
    """A rule's `ports` (TCP): none admits every port; a named port is the destination
    pod's container port of that name; endPort makes a range."""
    if not entries:
        return True
    for e in entries:
        if e.get("protocol", "TCP") != "TCP":
            continue
        p = e.get("port")
        if p is None:
            return True
        if isinstance(p, str):
            if named.get(p) == port:
                return True
        elif p <= port <= e.get("endPort", p):
            return True
    return False


def admitted(
    policies: list[dict[str, Any]], dst: dict[str, Any], src: dict[str, Any], port: int
) -> bool:
    """Whether `src` may connect to `dst`'s `port`: a pod no Ingress policy selects takes
    everything; a selected one takes what some rule of some selecting policy admits."""
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace", RELEASE_NS) == dst["namespace"]
        and selector_matches(p["spec"]["podSelector"], dst["labels"])
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    named = {
        p["name"]: p["containerPort"]
        for c in dst["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }
    for policy in selecting:
        ns = policy["metadata"].get("namespace", RELEASE_NS)
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            if peers and not any(peer_admits(peer, src, ns) for peer in peers):
                continue
            if port_admits(rule.get("ports"), port, named):
                return True
    return False
