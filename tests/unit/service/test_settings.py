"""The gateway's settings (service.settings): read from RESNET_SERVE_<FIELD>, comma lists,
the defaults, and bad values refused in one line that names the variable to fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import ENV_PREFIX, Settings, describe_settings_error, helm_key


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No RESNET_SERVE_* of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def refusal(**env: str) -> str:
    """What a user is told for these environment variables (the CLI's one line)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(ENV_PREFIX + name, value)
        with pytest.raises(ValidationError) as info:
            Settings()
    return describe_settings_error(info.value)


def test_the_defaults():
    s = Settings()
    assert s.repository == Path("model_repository")
    assert (s.host, s.port, s.grpc_port) == ("127.0.0.1", 8000, None)
    assert (s.backend, s.triton_url, s.ort_providers) == (
        "onnxruntime",
        "127.0.0.1:8001",
        ["CPUExecutionProvider"],
    )
    assert (s.models, s.default_model, s.api_keys, s.admin_keys) == ([], None, [], [])
    assert (s.max_batch_size, s.max_batch_delay_ms, s.max_queue_images) == (None, 2.0, 256)
    assert (s.request_timeout_s, s.target_p99_ms, s.default_top_k) == (10.0, None, 5)
    assert (s.poll_interval_s, s.drain_seconds) == (0.0, 0.0)  # no polling, no drain
    assert (s.max_body_bytes, s.max_images_per_request) == (20 * 1024 * 1024, 64)
    assert (s.log_level, s.log_format, s.jpeg_draft) == ("info", "text", True)
    # The engine's choice of how batches and decoding share the cores (service.backends).
    assert (s.ort_parallel_batches, s.exclusive_cpus) == (0, None)


def test_every_field_is_read_from_its_prefixed_upper_case_variable(monkeypatch):
    monkeypatch.setenv("RESNET_SERVE_REPOSITORY", "/srv/models")
    monkeypatch.setenv("RESNET_SERVE_PORT", "9000")
    monkeypatch.setenv("RESNET_SERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("RESNET_SERVE_BACKEND", "triton")
    monkeypatch.setenv("RESNET_SERVE_TRITON_SHARED_MEMORY", "true")
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_DELAY_MS", "0.5")
    monkeypatch.setenv("RESNET_SERVE_TARGET_P99_MS", "150")
    monkeypatch.setenv("RESNET_SERVE_JPEG_DRAFT", "0")
    monkeypatch.setenv("RESNET_SERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("PORT", "1")  # unprefixed: not ours
    s = Settings()
    assert s.repository == Path("/srv/models") and isinstance(s.repository, Path)
    assert (s.port, s.grpc_port, s.backend) == (9000, 9001, "triton")
    assert s.triton_shared_memory is True and s.jpeg_draft is False
    assert (s.max_batch_delay_ms, s.target_p99_ms, s.log_format) == (0.5, 150.0, "json")


def test_the_constructor_overrides_the_environment(monkeypatch):
    """The CLI's options are passed as arguments: they win over the variables."""
    monkeypatch.setenv("RESNET_SERVE_PORT", "9000")
    monkeypatch.setenv("RESNET_SERVE_API_KEYS", "from-env")
    s = Settings(port=7000, api_keys=["from-cli"])
    assert (s.port, s.api_keys) == (7000, ["from-cli"])


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        (" a , b ", ["a", "b"]),  # spaces around an entry are not part of it
        ("a,,b,", ["a", "b"]),  # empty entries are dropped
        (" , ", []),
        ("", []),
    ],
)
@pytest.mark.parametrize("field", ["models", "api_keys", "admin_keys"])
def test_list_fields_take_comma_separated_values(monkeypatch, field, value, parsed):
    monkeypatch.setenv(ENV_PREFIX + field.upper(), value)
    assert getattr(Settings(), field) == parsed
    assert getattr(Settings(**{field: value}), field) == parsed  # a string argument alike


def test_a_blank_entry_never_becomes_an_empty_api_key(monkeypatch):
    """An empty key would be one anybody could send: the list holds real keys only."""
    monkeypatch.setenv("RESNET_SERVE_API_KEYS", "k1, ,k2,")
    monkeypatch.setenv("RESNET_SERVE_ADMIN_KEYS", ",")
    s = Settings()
    assert s.api_keys == ["k1", "k2"] and s.admin_keys == []


@pytest.mark.parametrize(
    ("env", "told"),
    [
        ({"PORT": "99999"}, "RESNET_SERVE_PORT=99999: Input should be less than or equal to 65535"),
        ({"PORT": "http"}, "RESNET_SERVE_PORT=http: Input should be a valid integer"),
        ({"GRPC_PORT": "-1"}, "RESNET_SERVE_GRPC_PORT=-1: Input should be greater than or equal to 0"),
        ({"BACKEND": "tensorrt"}, "RESNET_SERVE_BACKEND=tensorrt: Input should be 'onnxruntime' or 'triton'"),
        ({"JPEG_DRAFT": "maybe"}, "RESNET_SERVE_JPEG_DRAFT=maybe: Input should be a valid boolean"),
        ({"REQUEST_TIMEOUT_S": "0"}, "RESNET_SERVE_REQUEST_TIMEOUT_S=0: Input should be greater than 0"),
        ({"REQUEST_TIMEOUT_S": "601"}, "RESNET_SERVE_REQUEST_TIMEOUT_S=601: Input should be less than or equal to 600"),
        ({"MAX_BATCH_DELAY_MS": "1001"}, "RESNET_SERVE_MAX_BATCH_DELAY_MS=1001: Input should be less than or equal to 1000"),
        ({"MAX_BATCH_SIZE": "0"}, "RESNET_SERVE_MAX_BATCH_SIZE=0: Input should be greater than or equal to 1"),
        ({"POLL_INTERVAL_S": "-1"}, "RESNET_SERVE_POLL_INTERVAL_S=-1: Input should be greater than or equal to 0"),
        ({"TRITON_MAX_RETRIES": "11"}, "RESNET_SERVE_TRITON_MAX_RETRIES=11: Input should be less than or equal to 10"),
        ({"MAX_BODY_BYTES": "1023"}, "RESNET_SERVE_MAX_BODY_BYTES=1023: Input should be greater than or equal to 1024"),
        ({"LOG_LEVEL": "trace"}, "RESNET_SERVE_LOG_LEVEL=trace: Input should be 'debug', 'info', 'warning' or 'error'"),
        ({"ORT_PARALLEL_BATCHES": "65"}, "RESNET_SERVE_ORT_PARALLEL_BATCHES=65: Input should be less than or equal to 64"),
        ({"ORT_PARALLEL_BATCHES": "-1"}, "RESNET_SERVE_ORT_PARALLEL_BATCHES=-1: Input should be greater than or equal to 0"),
        ({"EXCLUSIVE_CPUS": "maybe"}, "RESNET_SERVE_EXCLUSIVE_CPUS=maybe: Input should be a valid boolean"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_its_variable(env, told):
    got = refusal(**env)
    assert got.startswith(told) and "; " not in got, got  # one problem, one line


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ({"PORT": "65535"}, 65535),
        ({"PORT": "0"}, 0),  # any free port
        ({"MAX_BATCH_DELAY_MS": "1000"}, 1000.0),
        ({"MAX_BATCH_DELAY_MS": "0"}, 0.0),
        ({"POLL_INTERVAL_S": "3600"}, 3600.0),
        ({"REQUEST_TIMEOUT_S": "600"}, 600.0),
        ({"ORT_PARALLEL_BATCHES": "0"}, 0),  # the engine's choice
        ({"EXCLUSIVE_CPUS": "false"}, False),  # set either way, it overrides the rule
        ({"EXCLUSIVE_CPUS": "true"}, True),
    ],
)
def test_the_bounds_themselves_are_accepted(monkeypatch, env, value):
    ((name, text),) = env.items()
    monkeypatch.setenv(ENV_PREFIX + name, text)
    assert getattr(Settings(), name.lower()) == value


def test_every_bad_value_is_named_in_one_line_in_field_order():
    told = refusal(PORT="99999", BACKEND="nope", MAX_QUEUE_IMAGES="0")
    assert "\n" not in told
    assert told.split("; ") == [
        "RESNET_SERVE_BACKEND=nope: Input should be 'onnxruntime' or 'triton'",
        "RESNET_SERVE_PORT=99999: Input should be less than or equal to 65535",
        "RESNET_SERVE_MAX_QUEUE_IMAGES=0: Input should be greater than or equal to 1",
    ]


def test_a_long_value_is_cut_in_the_message():
    told = refusal(PORT="9" * 500)
    assert told.startswith("RESNET_SERVE_PORT=" + "9" * 80 + ": ")
    assert "9" * 81 not in told


def test_an_unknown_setting_passed_by_name_is_refused():
    with pytest.raises(ValidationError) as info:
        Settings(max_queue=5)  # type: ignore[call-arg]
    assert describe_settings_error(info.value) == (
        "RESNET_SERVE_MAX_QUEUE=5: Extra inputs are not permitted"
    )


def test_providers_must_exist_in_this_onnxruntime(monkeypatch):
    import onnxruntime

    monkeypatch.setenv(
        "RESNET_SERVE_ORT_PROVIDERS", "NoSuchExecutionProvider, CPUExecutionProvider"
    )
    told = refusal()
    assert told.startswith(
        "RESNET_SERVE_ORT_PROVIDERS=['NoSuchExecutionProvider', 'CPUExecutionProvider']: "
        f"NoSuchExecutionProvider not available in this onnxruntime {onnxruntime.__version__} "
        "(available: "
    )  # the "Value error, " of pydantic is not shown
    assert "needs the onnxruntime-gpu package" in told
    monkeypatch.setenv("RESNET_SERVE_ORT_PROVIDERS", " , ")
    assert refusal() == (
        "RESNET_SERVE_ORT_PROVIDERS=[]: name at least one provider, e.g. CPUExecutionProvider"
    )
    # Triton runs the model: this process opens no session, so nothing is checked.
    assert Settings(backend="triton").ort_providers == []


@pytest.mark.parametrize(
    ("field", "key"),
    [
        ("port", "port"),
        ("grpc_port", "grpcPort"),
        ("max_batch_delay_ms", "maxBatchDelayMs"),
        ("target_p99_ms", "targetP99Ms"),
        ("ort_intra_op_threads", "ortIntraOpThreads"),
    ],
)
def test_a_settings_helm_value_is_its_camel_case_name(field, key):
    assert field in Settings.model_fields
    assert helm_key(field) == key
