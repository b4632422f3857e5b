"""API keys (service.runtime.auth): how a caller's key is read from its headers, kept as
digests, and compared without an early exit; and the runtime keeping the admin keys apart
from the API keys."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from service.errors import Forbidden, Unauthorized
from service.observability.metrics import Metrics
from service.runtime.auth import check_key, hash_keys, key_from_headers
from service.runtime.core import Runtime
from service.settings import Settings


def test_keys_are_kept_as_their_sha256_digests_in_order():
    digests = hash_keys(["s3cret", "ünïcödé", "s3cret "])
    assert digests == [
        hashlib.sha256(k.encode()).digest() for k in ("s3cret", "ünïcödé", "s3cret ")
    ]
    assert all(len(d) == 32 for d in digests)  # one length: compare_digest leaks no length
    assert hash_keys([]) == []


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "key"),
    [
        (None, "k1", "k1"),
        ("Bearer k2", None, "k2"),
        ("bearer k2", None, "k2"),  # the scheme is case-insensitive
        ("BEARER k2", None, "k2"),
        ("Bearer   k2  ", None, "k2"),  # spaces around the token are not part of it
        ("Bearer k2", "k1", "k1"),  # both: X-API-Key wins
        ("Bearer k2", "", "k2"),  # an empty X-API-Key is no key
        ("Bearer ", None, None),  # a blank token is no key (then "required", not "invalid")
        ("Bearer      ", None, None),
        ("Bearer", None, None),
        ("Bearerk2", None, None),
        ("Basic azI6", None, None),  # another scheme is not a key
        ("k2", None, None),
        (None, None, None),
        ("", "", None),
    ],
)
def test_the_key_is_read_from_x_api_key_or_a_bearer_token(authorization, x_api_key, key):
    assert key_from_headers(authorization, x_api_key) == key


@pytest.mark.parametrize("key", [None, "", "anything"])
def test_no_configured_key_leaves_the_api_open(key):
    check_key(key, [], "X-API-Key")


@pytest.mark.parametrize("key", [None, ""])
def test_a_missing_key_is_required_naming_how_to_send_it(key):
    with pytest.raises(Unauthorized) as info:
        check_key(key, hash_keys(["s3cret"]), "X-API-Key or Authorization: Bearer")
    assert info.value.message == "an API key is required (X-API-Key or Authorization: Bearer)"
    assert (info.value.http_status, info.value.code) == (401, "unauthorized")


@pytest.mark.parametrize("key", ["s3cre", "s3cret!", "S3CRET", " s3cret", "other", "s3cretother"])
def test_only_a_configured_key_exactly_is_accepted(key):
    hashes = hash_keys(["s3cret", "other2"])
    with pytest.raises(Unauthorized) as info:
        check_key(key, hashes, "X-API-Key")
    assert info.value.message == "invalid API key"  # which key was close is not said
    check_key("s3cret", hashes, "X-API-Key")
    check_key("other2", hashes, "X-API-Key")


@pytest.mark.parametrize("matching", [0, 2, None])
def test_every_configured_digest_is_compared_whichever_matches(monkeypatch, matching):
    """No early exit: the time taken does not say which key (if any) matched, and only
    equal-length digests are compared, never the keys themselves."""
    keys = ["alpha", "beta", "gamma"]
    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(hmac, "compare_digest", spy)
    key = "nope" if matching is None else keys[matching]
    if matching is None:
        with pytest.raises(Unauthorized):
            check_key(key, hash_keys(keys), "X-API-Key")
    else:
        check_key(key, hash_keys(keys), "X-API-Key")
    assert [a for a, _ in compared] == hash_keys(keys)
    assert {b for _, b in compared} == {hashlib.sha256(key.encode()).digest()}


def test_the_admin_api_is_off_without_admin_keys_whatever_the_key(tmp_path):
    runtime = Runtime(Settings(repository=tmp_path, api_keys=["user"]), Metrics())
    for key in (None, "user", "anything"):
        with pytest.raises(Forbidden, match="set RESNET_SERVE_ADMIN_KEYS to turn it on"):
            runtime.authorize_admin(key, "X-API-Key")


def test_api_keys_and_admin_keys_are_separate_sets(tmp_path):
    settings = Settings(repository=tmp_path, api_keys=["user"], admin_keys=["admin"])
    runtime = Runtime(settings, Metrics())
    runtime.authorize("user", "X-API-Key")
    runtime.authorize_admin("admin", "X-API-Key")
    with pytest.raises(Unauthorized, match="invalid API key"):
        runtime.authorize("admin", "X-API-Key")  # an admin key is not an API key
    with pytest.raises(Unauthorized, match="invalid API key"):
        runtime.authorize_admin("user", "X-API-Key")
    with pytest.raises(Unauthorized, match=r"required \(metadata x-api-key\)"):
        runtime.authorize_admin(None, "metadata x-api-key")
