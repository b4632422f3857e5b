"""Reading and checking a model repository (service.model.repository) on its own: models
written by hand (config.pbtxt text, labels.txt, preprocess.json, probe.npz), what the
gateway decides from them (which versions it serves, the newest, each version's spec, the
rollout) and what a user can get wrong there, each reported naming the model and version.

model.onnx is placeholder bytes: nothing on the reading side opens the graph (export and
the backends do, with :func:`tensor_problems`, tested here on the signatures they read)."""

from __future__ import annotations

import gc
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from service.model.contract import input_fields
from service.model.repository import (
    PROBE_TOLERANCE,
    RepositoryError,
    Rollout,
    TensorSig,
    config_tensors,
    latest_version,
    layout_problems,
    load_probe,
    load_repository,
    load_spec,
    numbered_versions,
    parity_problem,
    parse_config,
    read_rollout,
    served_versions,
    tensor_problems,
    version_key,
    write_rollout,
)
from tests.helpers.models import TINY_CONTRACT, TINY_LABELS, contract

TENSORS = """
max_batch_size: 8
input [{ name: "input", data_type: TYPE_FP32, dims: [3, 32, 32] }]
output [{ name: "logits", data_type: TYPE_FP32, dims: [10], label_filename: "labels.txt" }]
"""
CONFIG = 'name: "tiny"\nplatform: "onnxruntime_onnx"' + TENSORS


def write_model(
    repo: Path,
    versions: tuple[int, ...] = (1,),
    *,
    name: str = "tiny",
    config: str = CONFIG,
    policy: str = "",
    rollout: str | None = None,
) -> Path:
    """A model directory as export leaves it, each version with TINY_CONTRACT."""
    model_dir = repo / name
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config + policy)
    (model_dir / "labels.txt").write_text("\n".join(TINY_LABELS) + "\n")
    for version in versions:
        vdir = model_dir / str(version)
        vdir.mkdir()
        (vdir / "preprocess.json").write_text(TINY_CONTRACT.model_dump_json())
        (vdir / "model.onnx").write_bytes(b"not opened here")
    if rollout is not None:
        (model_dir / "rollout.json").write_text(rollout)
    return model_dir


def write_contract(model_dir: Path, version: int, **changes: object) -> None:
    """A preprocess.json with ``changes``, written as is (unvalidated, as a user may)."""
    data = {**json.loads(TINY_CONTRACT.model_dump_json()), **changes}
    (model_dir / str(version) / "preprocess.json").write_text(json.dumps(data))


X = np.zeros((2, 3, 32, 32), np.float32)
Y = np.zeros((2, 10), np.float32)


def write_probe(vdir: Path, **arrays: np.ndarray) -> None:
    with (vdir / "probe.npz").open("wb") as fh:
        np.savez(fh, **arrays)


# --- one version's spec -----------------------------------------------------------------------


def test_a_hand_written_model_reads_as_its_spec(tmp_path):
    model_dir = write_model(tmp_path)
    spec = load_spec(model_dir)
    assert (spec.name, spec.version, spec.platform) == ("tiny", "1", "onnxruntime_onnx")
    assert spec.contract == TINY_CONTRACT and spec.precision == "fp32"
    assert spec.labels == tuple(TINY_LABELS)
    assert spec.labels_json[0] == '"airplane"'
    assert spec.max_batch_size == 8
    assert spec.model_path == model_dir / "1" / "model.onnx"
    assert spec.config == parse_config(CONFIG)
    assert layout_problems(model_dir) == []


def test_a_python_backend_model_reads_its_backend_as_platform(tmp_path):
    model_dir = write_model(tmp_path, config='name: "tiny"\nbackend: "python"' + TENSORS)
    (model_dir / "1" / "model.py").write_text("")
    assert load_spec(model_dir).platform == "python"
    assert layout_problems(model_dir) == []
    (model_dir / "1" / "model.py").unlink()
    assert layout_problems(model_dir) == ["tiny: version 1: model.py missing (python backend)"]


def test_labels_with_non_ascii_names_read_and_encode_as_json(tmp_path):
    model_dir = write_model(tmp_path)
    names = ["Äpfel", 'say "hi"', *TINY_LABELS[2:]]
    (model_dir / "labels.txt").write_text("\n".join(names) + "\n\n", encoding="utf-8")
    spec = load_spec(model_dir)
    assert spec.labels == tuple(names)  # trailing blank lines are not names
    assert spec.labels_json[:2] == ('"Äpfel"', '"say \\"hi\\""')


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / "config.pbtxt").unlink(), "model 'tiny': config.pbtxt missing"),
        (
            lambda d: (d / "labels.txt").write_text("a\nb\n"),
            "model 'tiny': labels.txt has 2 names for 10 classes",
        ),
        (lambda d: (d / "labels.txt").unlink(), "model 'tiny': labels.txt: missing"),
        (
            lambda d: (d / "1" / "preprocess.json").unlink(),
            "model 'tiny': 1/preprocess.json: missing",
        ),
        (
            lambda d: write_contract(d, 1, crop=40),
            "model 'tiny': 1/preprocess.json: not a valid preprocessing contract "
            "(crop (40) cannot exceed resize (36))",
        ),
    ],
)
def test_load_spec_names_the_model_and_the_file_at_fault(tmp_path, break_it, message):
    model_dir = write_model(tmp_path)
    break_it(model_dir)
    with pytest.raises(RepositoryError) as exc:
        load_spec(model_dir)
    assert str(exc.value) == message


def test_load_spec_of_a_version_not_on_disk(tmp_path):
    model_dir = write_model(tmp_path, (1, 2))
    assert load_spec(model_dir, 1).version == "1"
    with pytest.raises(RepositoryError, match=r"^model 'tiny': no version 3 \(versions: 1, 2\)$"):
        load_spec(model_dir, 3)


def test_a_model_without_versions(tmp_path):
    model_dir = write_model(tmp_path, ())
    (model_dir / "latest").mkdir()  # not a number: not a version
    for read in (load_spec, served_versions):
        with pytest.raises(RepositoryError, match=r"^model 'tiny': no numbered version directory$"):
            read(model_dir)
    assert layout_problems(model_dir) == ["tiny: no numbered version directory"]


# --- version numbers --------------------------------------------------------------------------


def test_versions_sort_as_numbers_and_non_numeric_entries_are_not_versions(tmp_path):
    model_dir = write_model(tmp_path, (1, 2, 9, 10))
    for entry in ("latest", "v3", ".11", "1.5", "-4"):
        (model_dir / entry).mkdir()
    (model_dir / "12").write_text("a file, not a version directory")
    assert numbered_versions(model_dir) == [1, 2, 9, 10]
    assert latest_version(model_dir) == 10
    assert load_spec(model_dir).version == "10"  # 10 after 9, not after 1
    assert served_versions(model_dir) == ([10], Rollout())
    assert layout_problems(model_dir) == []


def test_a_missing_model_directory_has_no_versions(tmp_path):
    assert numbered_versions(tmp_path / "absent") == []
    assert latest_version(tmp_path / "absent") is None


@pytest.mark.parametrize("folder", ["²", "١"])
def test_a_folder_of_non_ascii_digits_is_not_a_version(tmp_path, folder):
    model_dir = write_model(tmp_path, (2,))
    (model_dir / folder).mkdir()
    assert numbered_versions(model_dir) == [2]
    assert layout_problems(model_dir) == []


@pytest.mark.parametrize(("text", "key"), [("1", "1"), ("01", "1"), ("10", "10"), ("0", "0")])
def test_version_key(text, key):
    assert version_key(text) == key


@pytest.mark.parametrize("text", ["", "v1", "1.0", "-1", "+1", " 1", "1 ", "²", "١"])
def test_version_key_refuses_what_is_not_a_version_number(text):
    with pytest.raises(ValueError, match="is not a version number"):
        version_key(text)


# --- which versions are served ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", [10]),  # no policy: Triton's default, the latest one
        ("version_policy { latest { num_versions: 1 } }", [10]),
        ("version_policy { latest { num_versions: 2 } }", [9, 10]),
        ("version_policy { latest { num_versions: 9 } }", [1, 2, 9, 10]),  # more than there are
        ("version_policy { all { } }", [1, 2, 9, 10]),
        ("version_policy { specific { versions: [9, 1] } }", [1, 9]),
        ("version_policy { specific { versions: [2, 2] } }", [2]),
    ],
)
def test_the_version_policy_decides_what_is_served(tmp_path, policy, served):
    model_dir = write_model(tmp_path, (1, 2, 9, 10), policy=policy)
    assert served_versions(model_dir) == (served, Rollout())
    specs = load_repository(tmp_path)
    assert [(s.name, s.version) for s in specs] == [("tiny", str(v)) for v in served]


def test_a_specific_policy_naming_a_missing_version_is_refused(tmp_path):
    policy = "version_policy { specific { versions: [1, 7, 5] } }"
    model_dir = write_model(tmp_path, (1, 2), policy=policy)
    with pytest.raises(RepositoryError) as exc:
        served_versions(model_dir)
    assert str(exc.value) == (
        "model 'tiny': version_policy names version 5, 7, not in the repository (versions: 1, 2)"
    )


def test_a_policy_that_selects_no_version_is_refused(tmp_path):
    model_dir = write_model(tmp_path, (1, 2), policy="version_policy { specific { } }")
    with pytest.raises(RepositoryError, match=r"^model 'tiny': "):
        served_versions(model_dir)


def test_the_rollout_adds_the_versions_it_names(tmp_path):
    rollout = '{"weights": {"1": 90, "3": 10}, "shadow": "2"}'
    model_dir = write_model(tmp_path, (1, 2, 3, 4), rollout=rollout)
    expected = Rollout(weights={"1": 90, "3": 10}, shadow="2")
    # The policy's (latest: 4), plus each version with traffic and the shadow.
    assert served_versions(model_dir) == ([1, 2, 3, 4], expected)
    assert layout_problems(model_dir) == []


def test_a_version_at_weight_0_is_not_served_for_the_rollout(tmp_path):
    model_dir = write_model(tmp_path, (1, 2, 3), rollout='{"weights": {"3": 1, "1": 0}}')
    assert served_versions(model_dir) == ([3], Rollout(weights={"3": 1, "1": 0}))


def test_a_rollout_naming_a_version_not_on_disk(tmp_path):
    model_dir = write_model(tmp_path, (1, 2), rollout='{"weights": {"2": 1}, "shadow": "5"}')
    with pytest.raises(RepositoryError) as exc:
        served_versions(model_dir)
    assert str(exc.value) == (
        "model 'tiny': rollout.json names version 5, not in the repository (versions: 1, 2)"
    )
    assert layout_problems(model_dir) == ["tiny: rollout.json names version 5, not on disk"]


def test_a_rollout_naming_a_missing_version_at_weight_0_is_reported(tmp_path):
    model_dir = write_model(tmp_path, (1, 2), rollout='{"weights": {"2": 1, "7": 0}}')
    assert layout_problems(model_dir) == ["tiny: rollout.json names version 7, not on disk"]


# --- rollout.json -----------------------------------------------------------------------------


def test_no_rollout_file_is_the_empty_rollout(tmp_path):
    assert read_rollout(write_model(tmp_path)) == Rollout()


def test_rollout_versions_are_keyed_as_numbers(tmp_path):
    model_dir = write_model(tmp_path, (1, 2), rollout='{"weights": {"01": 3}, "shadow": "02"}')
    rollout = read_rollout(model_dir)
    assert rollout == Rollout(weights={"1": 3.0}, shadow="2")
    assert rollout.named() == {1, 2}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("weights: {1: 1}", "Invalid JSON: expected value at line 1 column 1"),
        ('{"weights": {"1": 1}', "Invalid JSON: EOF while parsing an object at line 1 column 20"),
        ("[]", "Input should be an object"),
        ('{"weight": {"1": 1}}', "weight: Extra inputs are not permitted"),
        ('{"weights": [1, 2]}', "weights: Input should be an object"),
        (
            '{"weights": {"1": "lots"}}',
            "weights.1: Input should be a valid number",
        ),
        ('{"weights": {"1": null}}', "weights.1: Input should be a valid number"),
        ('{"weights": {"1": -1}}', "weights: weight of version 1 must be 0 or more, got -1.0"),
        ('{"weights": {"1": 1e999}}', "weights: weight of version 1 must be 0 or more, got inf"),
        ('{"weights": {"1": NaN}}', "weights: weight of version 1 must be 0 or more, got nan"),
        ('{"weights": {"v2": 1}}', "weights: 'v2' is not a version number"),
        ('{"weights": {"1": 1, "01": 2}}', "weights: version 1 is given twice"),
        ('{"weights": {"1": 0, "2": 0}}', "weights: at least one weight must be above 0"),
        ('{"shadow": "two"}', "shadow: 'two' is not a version number"),
        ('{"shadow": 2}', "shadow: Input should be a valid string"),
    ],
)
def test_read_rollout_says_what_is_wrong(tmp_path, text, message):
    model_dir = write_model(tmp_path, rollout=text)
    with pytest.raises(RepositoryError) as exc:
        read_rollout(model_dir)
    assert str(exc.value) == f"rollout.json: {message}"
    # Serving and checking report it under the model's name.
    with pytest.raises(RepositoryError) as exc:
        served_versions(model_dir)
    assert str(exc.value) == f"model 'tiny': rollout.json: {message}"
    assert layout_problems(model_dir) == [f"tiny: rollout.json: {message}"]


@pytest.mark.parametrize("weight", ["true", '"50"'])
def test_a_weight_that_is_not_a_json_number_is_refused(tmp_path, weight):
    model_dir = write_model(tmp_path, rollout=f'{{"weights": {{"1": {weight}}}}}')
    with pytest.raises(RepositoryError, match=r"weights\.1: "):
        read_rollout(model_dir)


def test_write_rollout_writes_what_read_rollout_reads(tmp_path):
    model_dir = write_model(tmp_path, (1, 2))
    rollout = Rollout(weights={"1": 3, "2": 1}, shadow="2")
    write_rollout(model_dir, rollout)
    assert read_rollout(model_dir) == rollout
    path = model_dir / "rollout.json"
    assert path.stat().st_mode & 0o777 == 0o644  # the gateway may run as another user
    assert json.loads(path.read_text()) == {"weights": {"1": 3.0, "2": 1.0}, "shadow": "2"}
    write_rollout(model_dir, Rollout())  # the default: no file
    assert not path.exists()
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]


# --- the repository ---------------------------------------------------------------------------


def test_load_repository_serves_every_model_or_those_named(tmp_path):
    write_model(tmp_path, (1, 2), policy="version_policy { all { } }")
    write_model(tmp_path, (3,), name="other", config=CONFIG.replace('"tiny"', '"other"'))
    (tmp_path / ".staging").mkdir()  # export's hidden staging: not a model
    (tmp_path / "README").write_text("a plain file: not a model")
    specs = load_repository(tmp_path)
    assert [(s.name, s.version) for s in specs] == [("other", "3"), ("tiny", "1"), ("tiny", "2")]
    only = load_repository(tmp_path, ["tiny"])
    assert [(s.name, s.version) for s in only] == [("tiny", "1"), ("tiny", "2")]
    with pytest.raises(RepositoryError) as exc:
        load_repository(tmp_path, ["tiny", "resnet50"])
    assert str(exc.value) == f"models not in {tmp_path}: resnet50; available: other, tiny"


def test_load_repository_refuses_an_empty_or_absent_repository(tmp_path):
    with pytest.raises(RepositoryError, match=r"holds no model \(try `resnet-export demo -r "):
        load_repository(tmp_path)
    with pytest.raises(RepositoryError, match=r"is not a directory$"):
        load_repository(tmp_path / "absent")


def test_load_repository_refuses_a_repository_with_one_broken_model(tmp_path):
    write_model(tmp_path)
    broken = write_model(tmp_path, name="other", config=CONFIG.replace('"tiny"', '"other"'))
    (broken / "labels.txt").write_text("one\n")
    with pytest.raises(
        RepositoryError, match=r"^model 'other': labels\.txt has 1 names for 10 classes$"
    ):
        load_repository(tmp_path)


# --- checking the layout ----------------------------------------------------------------------


def _config(d: Path, text: str) -> None:
    (d / "config.pbtxt").write_text(text)


@pytest.mark.parametrize(
    ("break_it", "problems"),
    [
        (lambda d: (d / "config.pbtxt").unlink(), ["tiny: config.pbtxt missing"]),
        (
            lambda d: _config(d, CONFIG.replace("max_batch_size: 8", "max_batch_size: lots")),
            [
                "tiny: config.pbtxt does not parse as a Triton ModelConfig (3:17 : "
                "'max_batch_size: lots': Couldn't parse integer: lots)"
            ],
        ),
        (
            lambda d: _config(d, CONFIG + "dynamic_batching { max_delay: 5 }"),
            [
                "tiny: config.pbtxt does not parse as a Triton ModelConfig (6:20 : Message "
                'type "inference.ModelDynamicBatching" has no field named "max_delay".)'
            ],
        ),
        (
            lambda d: (d / "config.pbtxt").write_bytes(b"name: '\xff'"),
            ["tiny: config.pbtxt does not parse as a Triton ModelConfig ("],
        ),
        (
            lambda d: _config(d, CONFIG.replace('"tiny"', '"resnet"')),
            ["tiny: config name 'resnet' differs from the directory name"],
        ),
        (
            lambda d: _config(d, CONFIG.replace("max_batch_size: 8", "max_batch_size: 0")),
            [
                "tiny: config max_batch_size must be at least 1",
                # Without batching, config.pbtxt's tensors have no batch axis.
                "tiny: version 1: config.pbtxt inputs ['input' FP32 [3, 32, 32]] != "
                "preprocess.json ['input' FP32 [-1, 3, 32, 32]]",
                "tiny: version 1: config.pbtxt outputs ['logits' FP32 [10]] != "
                "preprocess.json ['logits' FP32 [-1, 10]]",
            ],
        ),
        (
            lambda d: _config(
                d, CONFIG.replace('label_filename: "labels.txt"', 'label_filename: "names.txt"')
            ),
            ["tiny: config label_filename 'names.txt' is not the contract's"],
        ),
        (
            lambda d: _config(d, CONFIG.replace("TYPE_FP32, dims: [3,", "TYPE_FP16, dims: [3,")),
            [
                "tiny: version 1: config.pbtxt inputs ['input' FP16 [-1, 3, 32, 32]] != "
                "preprocess.json ['input' FP32 [-1, 3, 32, 32]]"
            ],
        ),
        (lambda d: (d / "labels.txt").unlink(), ["tiny: labels.txt: missing"]),
        (
            lambda d: (d / "labels.txt").write_text("a\nb\n"),
            ["tiny: labels.txt has 2 names for 10 classes"],
        ),
        (
            lambda d: (d / "labels.txt").write_text("a\n\nb\n"),
            ["tiny: labels.txt: blank line (every class needs a name)"],
        ),
        (
            lambda d: (d / "labels.txt").write_bytes(b"caf\xe9\n"),
            ["tiny: labels.txt: not UTF-8 text"],
        ),
    ],
)
def test_layout_problems_of_the_model(tmp_path, break_it, problems):
    model_dir = write_model(tmp_path)
    break_it(model_dir)
    for got, want in zip(layout_problems(model_dir), problems, strict=True):
        assert got.startswith(want)


@pytest.mark.parametrize(
    ("break_it", "problems"),
    [
        (lambda v: (v / "model.onnx").unlink(), ["tiny: version 2: model.onnx missing"]),
        (lambda v: (v / "preprocess.json").unlink(), ["tiny: version 2: preprocess.json: missing"]),
        (
            lambda v: (v / "preprocess.json").write_text("{"),
            [
                "tiny: version 2: preprocess.json: not a valid preprocessing contract (Invalid "
                "JSON: EOF while parsing an object at line 1 column 1)"
            ],
        ),
        (
            lambda v: write_contract(v.parent, 2, crop=40),
            [
                "tiny: version 2: preprocess.json: not a valid preprocessing contract (crop (40) "
                "cannot exceed resize (36))"
            ],
        ),
        (
            lambda v: write_contract(v.parent, 2, colour="RGB"),  # a misspelt field
            [
                "tiny: version 2: preprocess.json: not a valid preprocessing contract (colour: "
                "Extra inputs are not permitted)"
            ],
        ),
        (
            lambda v: write_contract(v.parent, 2, labels_file="classes.txt"),
            [
                "tiny: version 2: contract labels_file 'classes.txt' is not labels.txt",
                "tiny: config label_filename 'labels.txt' is not the contract's",
            ],
        ),
        (
            # A contract the labels and config.pbtxt of the model do not fit.
            lambda v: write_contract(v.parent, 2, num_classes=9, crop=28),
            [
                "tiny: labels.txt has 10 names for 9 classes",
                "tiny: version 2: config.pbtxt inputs ['input' FP32 [-1, 3, 32, 32]] != "
                "preprocess.json ['input' FP32 [-1, 3, 28, 28]]",
                "tiny: version 2: config.pbtxt outputs ['logits' FP32 [-1, 10]] != "
                "preprocess.json ['logits' FP32 [-1, 9]]",
            ],
        ),
        (
            lambda v: write_contract(v.parent, 2, input_name="pixels", **input_fields("uint8")),
            [
                "tiny: version 2: config.pbtxt inputs ['input' FP32 [-1, 3, 32, 32]] != "
                "preprocess.json ['pixels' UINT8 [-1, 32, 32, 3]]"
            ],
        ),
    ],
)
def test_layout_problems_of_one_version_name_it(tmp_path, break_it, problems):
    model_dir = write_model(tmp_path, (1, 2))
    break_it(model_dir / "2")
    assert layout_problems(model_dir) == problems


def test_a_model_level_problem_is_reported_once_for_all_versions(tmp_path):
    model_dir = write_model(tmp_path, (1, 2, 3))
    (model_dir / "labels.txt").write_text("a\n")
    assert layout_problems(model_dir) == ["tiny: labels.txt has 1 names for 10 classes"]


def test_layout_problems_under_the_name_it_is_served_as(tmp_path):
    model_dir = write_model(tmp_path, name="copy")  # config.pbtxt still says "tiny"
    assert layout_problems(model_dir, "tiny") == []
    assert layout_problems(model_dir) == [
        "copy: config name 'tiny' differs from the directory name"
    ]


@pytest.mark.parametrize("path", ["config.pbtxt", "1/preprocess.json", "rollout.json"])
def test_an_unreadable_file_is_a_problem_not_a_crash(tmp_path, path):
    model_dir = write_model(tmp_path)
    (model_dir / path).unlink(missing_ok=True)
    (model_dir / path).mkdir()
    assert any(path.removeprefix("1/") in p for p in layout_problems(model_dir))


def test_an_unreadable_labels_file_is_a_problem(tmp_path):
    model_dir = write_model(tmp_path)
    (model_dir / "labels.txt").unlink()
    (model_dir / "labels.txt").mkdir()
    assert layout_problems(model_dir) == ["tiny: labels.txt: Is a directory"]


# --- the parity probe -------------------------------------------------------------------------


def test_a_valid_probe_passes_and_loads(tmp_path):
    model_dir = write_model(tmp_path, (1, 2))
    inputs = np.arange(X.size, dtype=np.float32).reshape(X.shape)
    write_probe(model_dir / "2", inputs=inputs, outputs=Y)
    assert layout_problems(model_dir) == []
    probe = load_probe(load_spec(model_dir))
    assert probe is not None
    np.testing.assert_array_equal(probe[0], inputs)
    np.testing.assert_array_equal(probe[1], Y)
    assert load_probe(load_spec(model_dir, 1)) is None  # published without one: fine


def test_a_uint8_probe_follows_its_contract(tmp_path):
    config = CONFIG.replace("TYPE_FP32, dims: [3, 32, 32]", "TYPE_UINT8, dims: [32, 32, 3]")
    model_dir = write_model(tmp_path, config=config)
    write_contract(model_dir, 1, **input_fields("uint8"))
    write_probe(model_dir / "1", inputs=np.zeros((1, 32, 32, 3), np.uint8), outputs=Y[:1])
    assert layout_problems(model_dir) == []
    write_probe(model_dir / "1", inputs=X, outputs=Y)  # planes where pixels are expected
    assert layout_problems(model_dir) == [
        "tiny: version 1: probe.npz inputs are float32 [2, 3, 32, 32], the contract says "
        "uint8 [n, 32, 32, 3] with n >= 1"
    ]


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        (b"", "probe.npz is not an .npz archive"),
        (b"PK\x03\x04 cut short", "probe.npz is not an .npz archive"),
        ({"inputs": X}, "probe.npz has no outputs array"),
        ({"x": X, "y": Y}, "probe.npz has no inputs or outputs array"),
        (
            {"inputs": X[:, :, :28, :28], "outputs": Y},
            "probe.npz inputs are float32 [2, 3, 28, 28], the contract says float32 "
            "[n, 3, 32, 32] with n >= 1",
        ),
        (
            {"inputs": X.astype(np.float64), "outputs": Y},
            "probe.npz inputs are float64 [2, 3, 32, 32], the contract says float32 "
            "[n, 3, 32, 32] with n >= 1",
        ),
        (
            {"inputs": X[:0], "outputs": Y[:0]},
            "probe.npz inputs are float32 [0, 3, 32, 32], the contract says float32 "
            "[n, 3, 32, 32] with n >= 1",
        ),
        (
            {"inputs": X, "outputs": np.zeros((2, 3), np.float32)},
            "probe.npz outputs are float32 [2, 3], the contract says float32 [2, 10] "
            "(logits per input)",
        ),
        (
            {"inputs": X, "outputs": Y[:1]},
            "probe.npz outputs are float32 [1, 10], the contract says float32 [2, 10] "
            "(logits per input)",
        ),
        (
            {"inputs": X, "outputs": Y.astype(np.float16)},
            "probe.npz outputs are float16 [2, 10], the contract says float32 [2, 10] "
            "(logits per input)",
        ),
        ({"inputs": np.array([1, "a"], dtype=object), "outputs": Y}, "probe.npz unreadable"),
    ],
)
def test_layout_problems_find_a_malformed_probe(tmp_path, arrays, problem):
    model_dir = write_model(tmp_path)
    if isinstance(arrays, bytes):
        (model_dir / "1" / "probe.npz").write_bytes(arrays)
    else:
        write_probe(model_dir / "1", **arrays)
    problems = layout_problems(model_dir)
    assert len(problems) == 1 and problems[0].startswith(f"tiny: version 1: {problem}")


def test_load_probe_of_a_damaged_probe_names_model_and_version(tmp_path):
    model_dir = write_model(tmp_path, (1, 2))
    write_probe(model_dir / "2", inputs=X)  # no outputs
    with pytest.raises(RepositoryError, match=r"^model 'tiny' version 2: probe\.npz unreadable \("):
        load_probe(load_spec(model_dir))


def test_a_probe_whose_members_are_not_arrays_is_reported(tmp_path):
    model_dir = write_model(tmp_path)
    with zipfile.ZipFile(model_dir / "1" / "probe.npz", "w") as archive:
        archive.writestr("inputs.npy", b"not an array")
        archive.writestr("outputs.npy", b"not an array")
    problems = layout_problems(model_dir)
    assert len(problems) == 1 and problems[0].startswith("tiny: version 1: probe.npz ")
    with pytest.raises(RepositoryError, match=r"^model 'tiny' version 1: probe\.npz unreadable"):
        load_probe(load_spec(model_dir))


def test_load_probe_closes_an_archive_it_cannot_read(tmp_path):
    model_dir = write_model(tmp_path)
    (model_dir / "1" / "probe.npz").write_bytes(b"PK\x03\x04 cut short")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RepositoryError, match=r"probe\.npz unreadable"):
            load_probe(load_spec(model_dir))
        gc.collect()  # the unclosed file is finalized (and warned about) here
    assert [w.message for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_parity_problem_within_and_beyond_the_tolerance():
    expected = np.array([[10.0, 1.0, 0.0], [0.0, 5.0, 4.0]], np.float32)
    assert parity_problem(expected, expected) is None
    slack = PROBE_TOLERANCE * 10 / 2  # within the tolerance: 2% of the largest logit
    assert parity_problem(expected, expected + slack) is None
    assert parity_problem(expected, expected + 1) == (
        "max abs logit difference 1 (tolerance 0.2), top-1 agrees on 2 of 2"
    )
    swapped = expected[:, [0, 2, 1]]  # second row's top-1 moves to class 2
    assert parity_problem(expected, swapped) == (
        "max abs logit difference 1 (tolerance 0.2), top-1 agrees on 1 of 2"
    )


def test_parity_problem_lets_a_near_tie_flip():
    expected = np.array([[3.0, 3.01, 0.0]], np.float32)
    assert parity_problem(expected, np.array([[3.01, 3.0, 0.0]], np.float32)) is None


# --- tensors ----------------------------------------------------------------------------------

GOOD_IN = [TensorSig("input", "FP32", (-1, 3, 32, 32))]
GOOD_OUT = [TensorSig("logits", "FP32", (-1, 10))]


def test_a_graph_that_matches_its_contract_has_no_tensor_problem():
    assert tensor_problems(TINY_CONTRACT, GOOD_IN, GOOD_OUT, "graph") == []
    pixels = contract(**input_fields("uint8"))
    got = [TensorSig("input", "UINT8", (-1, 32, 32, 3))]
    assert tensor_problems(pixels, got, GOOD_OUT, "graph") == []


WANT_IN = "preprocess.json ['input' FP32 [-1, 3, 32, 32]]"
WANT_OUT = "preprocess.json ['logits' FP32 [-1, 10]]"


@pytest.mark.parametrize(
    ("inputs", "outputs", "problems"),
    [
        (
            [TensorSig("x", "FP32", (-1, 3, 32, 32))],
            GOOD_OUT,
            [f"graph inputs ['x' FP32 [-1, 3, 32, 32]] != {WANT_IN}"],
        ),
        (
            [TensorSig("input", "FP16", (-1, 3, 32, 32))],
            GOOD_OUT,
            [f"graph inputs ['input' FP16 [-1, 3, 32, 32]] != {WANT_IN}"],
        ),
        (
            [TensorSig("input", "FP32", (1, 3, 32, 32))],  # a fixed batch of 1
            GOOD_OUT,
            [f"graph inputs ['input' FP32 [1, 3, 32, 32]] != {WANT_IN}"],
        ),
        (
            [TensorSig("input", "FP32", (-1, 32, 32, 3))],  # channels last
            GOOD_OUT,
            [f"graph inputs ['input' FP32 [-1, 32, 32, 3]] != {WANT_IN}"],
        ),
        (
            [*GOOD_IN, TensorSig("scale", "FP32", (1,))],  # a second input
            GOOD_OUT,
            [f"graph inputs ['input' FP32 [-1, 3, 32, 32], 'scale' FP32 [1]] != {WANT_IN}"],
        ),
        (
            GOOD_IN,
            [TensorSig("probs", "FP32", (-1, 1000))],
            [f"graph outputs ['probs' FP32 [-1, 1000]] != {WANT_OUT}"],
        ),
        ([], [], [f"graph inputs [] != {WANT_IN}", f"graph outputs [] != {WANT_OUT}"]),
    ],
)
def test_tensor_problems_say_where_a_graph_disagrees(inputs, outputs, problems):
    assert tensor_problems(TINY_CONTRACT, inputs, outputs, "graph") == problems


def test_config_tensors_make_the_batch_axis_explicit():
    inputs, outputs = config_tensors(parse_config(CONFIG))
    assert (inputs, outputs) == (GOOD_IN, GOOD_OUT)
    unbatched = config_tensors(parse_config(CONFIG.replace("max_batch_size: 8", "")))
    assert unbatched == (
        [TensorSig("input", "FP32", (3, 32, 32))],
        [TensorSig("logits", "FP32", (10,))],
    )


def test_parse_config_reads_tritons_text_format():
    cfg = parse_config(CONFIG + "version_policy { latest { num_versions: 2 } }")
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("tiny", "onnxruntime_onnx", 8)
    assert cfg.version_policy.latest.num_versions == 2
    assert [o.label_filename for o in cfg.output] == ["labels.txt"]
    with pytest.raises(text_format.ParseError, match="no field named"):
        parse_config("batch_size: 8")
