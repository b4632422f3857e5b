"""The OpenVINO engine against ONNX Runtime on the same model.onnx: the same FP32 answers,
BF16 only for a bf16 version and only where the CPU has BF16, the same refusals in one
line. (The gateway with each engine: the tests parametrized over tests.helpers.engines.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from service.backends.embedded import EmbeddedBackend
from service.host.cpus import cpu_flags, cpu_isa, has_bf16, usable_cpus
from service.model.repository import (
    MODEL_FILENAME,
    RepositoryError,
    load_probe,
    load_repository,
    parity_problem,
)
from tests.helpers.engines import ENGINES, NEEDS_OPENVINO, embedded
from tests.helpers.models import as_bf16, unconvertible_graph


@pytest.fixture
def repo(tiny, tmp_path) -> Path:
    """A copy of the tiny model's repository, for a test to change."""
    shutil.copytree(tiny.repository, tmp_path / "repo")
    return tmp_path / "repo"


async def logits(backend: EmbeddedBackend, repo: Path, x: np.ndarray) -> np.ndarray:
    specs = load_repository(repo)
    await backend.start(specs)
    try:
        return await backend.infer(specs[0], x, 10.0)
    finally:
        await backend.close()


def inputs(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, 3, 32, 32)).astype(np.float32)


@NEEDS_OPENVINO
@pytest.mark.parametrize("n", [1, 3, 8])
async def test_fp32_through_openvino_is_onnx_runtimes_answer(repo, n):
    """f32 set explicitly: on this CPU (BF16 or not) OpenVINO computes in FP32."""
    x = inputs(n)
    ours = await logits(embedded("openvino", intra_op_threads=1), repo, x)
    exact = await logits(embedded("onnxruntime", intra_op_threads=1), repo, x)
    np.testing.assert_allclose(ours, exact, rtol=1e-4, atol=1e-5)


@NEEDS_OPENVINO
@pytest.mark.parametrize("parallel", [1, 2])
async def test_parallel_batches_are_streams_each_with_its_request(repo, parallel):
    """Batches run at once on the version's streams answer as one batch at a time does."""
    import asyncio

    backend = embedded("openvino", intra_op_threads=1, parallel_batches=parallel)
    specs = load_repository(repo)
    await backend.start(specs)
    try:
        xs = [inputs(n) for n in (1, 2, 3, 4)]
        together = await asyncio.gather(*(backend.infer(specs[0], x, 10.0) for x in xs))
        for x, got in zip(xs, together, strict=True):
            np.testing.assert_array_equal(got, await backend.infer(specs[0], x, 10.0))
    finally:
        await backend.close()


@NEEDS_OPENVINO
async def test_by_default_openvino_runs_the_streams_its_throughput_hint_picks(repo):
    """ORT_PARALLEL_BATCHES=0: as many streams as OpenVINO's THROUGHPUT hint picks for the
    model over the usable CPUs, the CPUs shared among them, every later version the same;
    ORT_INTRA_OP_THREADS, where set, is still each stream's threads."""
    import openvino as ov

    hint = ov.Core().compile_model(
        str(repo / "tiny" / "1" / MODEL_FILENAME),
        "CPU",
        {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": usable_cpus()},
    )
    streams = int(hint.get_property("NUM_STREAMS"))
    shutil.copytree(repo / "tiny" / "1", repo / "tiny" / "2")
    for threads in (0, 1):
        backend = embedded("openvino", intra_op_threads=threads)
        await backend.start(load_repository(repo))
        try:
            assert backend.max_inflight_batches == streams
            assert backend.cpus_per_batch == (threads or max(1, usable_cpus() // streams))
        finally:
            await backend.close()
    # ONNX Runtime's choice: one batch on all the cores.
    ort_default = embedded("onnxruntime")
    assert (ort_default.max_inflight_batches, ort_default.cpus_per_batch) == (1, usable_cpus())


@NEEDS_OPENVINO
async def test_a_batch_split_over_threads_as_they_come_free_answers_as_on_one_thread(repo):
    """The work of a batch on two threads is handed out as they come free (so that a thread
    a decoding process holds up does not stall the batch): which thread computes which part
    may change from run to run, the answers may not. Against one thread, FP32's tolerance:
    oneDNN may pick another kernel for another thread count on some CPUs."""
    x = inputs(8)
    one = await logits(embedded("openvino", intra_op_threads=1), repo, x)
    two = await logits(embedded("openvino", intra_op_threads=2), repo, x)
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    for _ in range(3):
        np.testing.assert_array_equal(
            await logits(embedded("openvino", intra_op_threads=2), repo, x), two
        )


@NEEDS_OPENVINO
@pytest.mark.skipif(not has_bf16(), reason="this CPU has no BF16 instructions")
async def test_a_bf16_version_is_computed_in_bf16_where_the_cpu_has_it(repo):
    as_bf16(repo)
    backend = embedded("openvino", intra_op_threads=1)
    (spec,) = load_repository(repo)
    assert backend.served_precision(spec) == "bf16"
    probe, expected = load_probe(spec)  # export's FP32 answers
    got = await logits(backend, repo, probe)
    # BF16 rounds every product (8 significant bits): far from FP32's last bits, inside
    # the parity probe's tolerance.
    assert np.abs(got - expected).max() > 1e-4
    assert parity_problem(expected, got) is None


@NEEDS_OPENVINO
async def test_a_bf16_version_is_computed_exactly_in_fp32_where_the_cpu_has_no_bf16(repo, tmp_path):
    """A CPU without BF16 (AVX2-only, or AVX-512 before Zen 4 / Cooper Lake), simulated:
    this CPU's flags less the BF16 ones, in a cpuinfo file the backend reads. Only the flag
    is simulated; the kernels that run are this CPU's real ones."""
    without = " ".join(sorted(cpu_flags() - {"avx512_bf16", "amx_bf16"}))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {without}\n")
    as_bf16(repo)
    backend = embedded("openvino", intra_op_threads=1, cpuinfo=cpuinfo)
    (spec,) = load_repository(repo)
    assert backend.served_precision(spec) == "fp32" and backend.kernels == cpu_isa()
    x = inputs(4)
    got = await logits(backend, repo, x)
    exact = await logits(embedded("onnxruntime", intra_op_threads=1), repo, x)
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
async def test_each_engine_says_what_it_computes_a_version_in(repo, engine):
    """FP32 for an FP32 version; for a bf16 version, BF16 only with OpenVINO on a CPU with
    BF16 (ONNX Runtime's CPU kernels have no BF16 convolution)."""
    backend = embedded(engine, intra_op_threads=1)
    (spec,) = load_repository(repo)
    assert backend.served_precision(spec) == "fp32"
    as_bf16(repo)
    (spec,) = load_repository(repo)
    bf16 = engine == "openvino" and has_bf16()
    assert backend.served_precision(spec) == ("bf16" if bf16 else "fp32")


@NEEDS_OPENVINO
async def test_a_graph_openvino_cannot_convert_is_refused_in_one_line(repo):
    unconvertible_graph(repo / "tiny" / "1" / MODEL_FILENAME)
    backend = embedded("openvino", intra_op_threads=1)
    with pytest.raises(RepositoryError) as info:
        await backend.start(load_repository(repo))
    assert str(info.value) == (
        "model 'tiny' version 1: OpenVINO cannot load it (FrontEnd API failed with "
        "OpConversionFailure: Model wasn't fully converted. Summary: -- No conversion rule "
        "found for operations: StringNormalizer-17)"
    )
    assert not backend.is_ready() and backend.warm_costs(load_repository(repo)[0]) == {}


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_fixed_batch_axis_is_refused_alike_by_each_engine(repo, engine):
    """The graph's tensors as the engine reads them, checked against the contract: one
    message, whichever engine reads them."""
    import onnx

    path = repo / "tiny" / "1" / MODEL_FILENAME
    model = onnx.load(path)
    for tensor in (*model.graph.input, *model.graph.output):
        tensor.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, path)
    with pytest.raises(RepositoryError) as info:
        await embedded(engine, intra_op_threads=1).start(load_repository(repo))
    assert str(info.value) == (
        "model 'tiny' version 1: graph inputs ['input' FP32 [1, 3, 32, 32]] != preprocess.json "
        "['input' FP32 [-1, 3, 32, 32]]; graph outputs ['logits' FP32 [1, 10]] != "
        "preprocess.json ['logits' FP32 [-1, 10]]"
    )


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_truncated_graph_is_refused_in_one_line_naming_the_engine(repo, engine):
    path = repo / "tiny" / "1" / MODEL_FILENAME
    path.write_bytes(path.read_bytes()[:200])
    backend = embedded(engine, intra_op_threads=1)
    with pytest.raises(RepositoryError) as info:
        await backend.start(load_repository(repo))
    message = str(info.value)
    assert message.startswith(f"model 'tiny' version 1: {backend.engine} cannot load it (")
    assert "\n" not in message and "Exception from" not in message


@NEEDS_OPENVINO
async def test_the_compiled_model_cache_is_used_only_where_it_is_asked_for(repo, tmp_path):
    """CACHE_DIR: the image's root is read-only, so only a directory the settings name."""
    cache = tmp_path / "cache"
    cache.mkdir()
    await logits(embedded("openvino", intra_op_threads=1), repo, inputs(1))
    assert not list(cache.iterdir())
    await logits(embedded("openvino", intra_op_threads=1, cache_dir=cache), repo, inputs(1))
    assert list(cache.iterdir())
