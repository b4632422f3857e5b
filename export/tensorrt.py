"""TensorRT engines beside the verified ONNX: build one, record what it is tied to, run it.

A TensorRT engine (``model.plan``) is not a portable file like ``model.onnx``: it holds
kernels chosen and compiled for one GPU architecture (its compute capability) by one exact
TensorRT version, and the runtime refuses or misbehaves on anything else. So every plan
gets an ``engine.json`` (:class:`EngineManifest`) saying what it was built with and from
which ONNX, and :meth:`EngineManifest.mismatch` says, in one line, why a plan cannot be
served where it is about to be.

Engines must be built on the GPU they will run on, and the export side has no GPU. Three
ways to build, one set of settings (:func:`trtexec_command` is the reference; the Python
build mirrors it flag for flag):

* :func:`build_engine` with the ``tensorrt`` Python package, on a machine with the GPU;
* :func:`trtexec_command`: the same build as a ``trtexec`` command line;
* ``export/trt_node.py``, the stdlib-only script that runs that command on the GPU node
  (the Helm chart's init container, keeping or building each model's engine before Triton
  starts), and :func:`export.build_job.render_build_job`, a Kubernetes Job that runs the
  same script for one model version, writing into the model repository's
  PersistentVolumeClaim.

Triton serves the plan through a custom model configuration, ``configs/tensorrt.pbtxt``
in the model directory, selected with ``tritonserver --model-config-name=tensorrt``; a
server started without that option keeps serving ``config.pbtxt`` (the ONNX), so one
repository serves both CPU and GPU deployments.

``tensorrt`` and ``cuda-python`` are imported only inside the functions that need them:
neither is a dependency of this project, and neither installs without NVIDIA's stack.
API names follow TensorRT 10's Python API (name-based tensors, ``execute_async_v3``,
``build_serialized_network``; see NVIDIA's "Migrating Python Code from TensorRT 8.x to
10.x", https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/api/tensorrt-8x-to-10x-python-api.html).
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np

from export import trt_node
from export.errors import ExportError
from export.trt_node import NodeError

if TYPE_CHECKING:
    from service.model.contract import PreprocessContract

# The names and settings the GPU node's script (export/trt_node.py) uses, defined there.
PLAN_FILENAME = trt_node.PLAN_FILENAME
MANIFEST_FILENAME = trt_node.MANIFEST_FILENAME
#: Triton's custom model configuration: ``<model>/configs/tensorrt.pbtxt``, used instead of
#: ``config.pbtxt`` when tritonserver runs with ``--model-config-name=tensorrt`` (and
#: ``config.pbtxt`` still, for a model without that file). See "Custom Model Configuration"
#: in https://github.com/triton-inference-server/server/blob/main/docs/user_guide/model_configuration.md
TRT_CONFIG_NAME = trt_node.TRT_CONFIG_NAME
#: The batch size TensorRT tunes its kernels for (the profile's "opt"), at most the maximum:
#: the dynamic batcher's preferred sizes cluster here for a single GPU.
OPT_BATCH_SIZE = trt_node.OPT_BATCH_SIZE
opt_batch_size = trt_node.opt_batch_size

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

_NOT_INSTALLED = "TensorRT is not installed (pip install tensorrt; it needs an NVIDIA GPU)"
_NO_GPU = "no NVIDIA GPU is visible (TensorRT builds engines on the GPU they will run on)"
_NO_CUDA_PYTHON = (
    "running a TensorRT engine here needs cuda-python for device memory (pip install cuda-python)"
)


# --- availability ------------------------------------------------------------------------------


def _import_cudart() -> Any:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (12.6 and later), else the
    older ``cuda.cudart``. ImportError when neither is there."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def _cuda_device_count() -> int | None:
    """CUDA devices the runtime sees (0 when it sees none or there is no driver);
    None when cuda-python is not installed, so the caller must find out another way."""
    try:
        cudart = _import_cudart()
    except ImportError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


def unavailable_reason() -> str | None:
    """Why TensorRT cannot build or run engines here, in one line; None when it can.

    Never raises: it decides whether a command is offered, and whether a test is skipped.
    """
    try:
        try:
            import tensorrt as trt
        except ImportError:
            return _NOT_INSTALLED
        except OSError as exc:  # the wheel is there, its libnvinfer is not loadable
            return f"TensorRT's libraries do not load ({_first_line(exc)})"
        count = _cuda_device_count()
        if count == 0:
            return _NO_GPU
        if count is None:
            # Without cuda-python, ask TensorRT itself: creating a Builder initialises CUDA
            # and fails (pybind raises on the null builder) when there is no usable GPU.
            try:
                builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
            except Exception:
                return _NO_GPU
            if builder is None:
                return _NO_GPU
        return None
    except Exception as exc:  # a broken install must read as "unavailable", not crash
        return f"TensorRT is unusable here ({_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


# --- what an engine is tied to -------------------------------------------------------------------

_CC_RE = re.compile(r"^\d+\.\d+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class EngineManifest:
    """``engine.json``: what a ``model.plan`` was built with, on, and from.

    A plan runs only on GPUs of the compute capability it was built for and only under the
    exact TensorRT version that built it (neither hardware- nor version-compatible engines
    are built here: both cost speed). ``onnx_sha256`` ties the plan to the ``model.onnx``
    of its version, so a re-exported graph shows up as a stale plan.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    cuda_version: str | None
    precision: Precision
    max_batch_size: int
    opt_batch_size: int
    onnx_sha256: str

    def __post_init__(self) -> None:
        problems = _manifest_problems(self)
        if problems:
            raise ExportError("not a valid engine manifest (" + "; ".join(problems) + ")")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> EngineManifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ExportError(f"{path}: missing") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{path}: not a readable JSON file ({_first_line(exc)})") from exc
        if not isinstance(data, dict):
            raise ExportError(f"{path}: not an engine manifest (a JSON object is expected)")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            parts = [f"missing {', '.join(missing)}"] if missing else []
            parts += [f"unknown {', '.join(unknown)}"] if unknown else []
            raise ExportError(f"{path}: not an engine manifest ({'; '.join(parts)})")
        try:
            return cls(**data)
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}") from exc

    def mismatch(self, other_gpu_name: str, other_cc: str, other_trt_version: str) -> str | None:
        """Why this engine cannot be served on that GPU under that TensorRT (None: it can).

        A GPU of another model but the same compute capability is not a mismatch: TensorRT
        loads the plan (it warns that the kernels were timed on another model, and they may
        not be the fastest there).
        """
        problems = []
        if _norm_cc(other_cc) != _norm_cc(self.compute_capability):
            problems.append(
                f"was built for compute capability {self.compute_capability} "
                f"({self.gpu_name}), not {other_cc.strip()} ({other_gpu_name.strip()})"
            )
        if other_trt_version.strip() != self.tensorrt_version:
            problems.append(
                f"was built by TensorRT {self.tensorrt_version}, not {other_trt_version.strip()}"
            )
        if not problems:
            return None
        return (
            f"the engine {' and '.join(problems)}: TensorRT runs an engine only on the compute "
            "capability and under the exact TensorRT version that built it; rebuild it there"
        )


def _norm_cc(cc: str) -> str:
    """'9.0', ' 9.0 ', '9' -> '9.0' (compute capabilities compare as major.minor)."""
    major, _, minor = cc.strip().partition(".")
    return f"{major}.{minor or '0'}"


def _manifest_problems(m: EngineManifest) -> list[str]:
    problems = []

    def text(name: str, value: object) -> None:
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{name}: a non-empty string is expected")

    text("tensorrt_version", m.tensorrt_version)
    text("gpu_name", m.gpu_name)
    if not isinstance(m.compute_capability, str) or not _CC_RE.match(m.compute_capability):
        problems.append(f"compute_capability: {m.compute_capability!r} is not like '9.0'")
    if m.cuda_version is not None:
        text("cuda_version", m.cuda_version)
    if m.precision not in PRECISIONS:
        problems.append(f"precision: {m.precision!r} is not one of {', '.join(PRECISIONS)}")
    for name in ("max_batch_size", "opt_batch_size"):
        value = getattr(m, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name}: a positive integer is expected, got {value!r}")
    if not problems and m.opt_batch_size > m.max_batch_size:
        problems.append(
            f"opt_batch_size {m.opt_batch_size} exceeds max_batch_size {m.max_batch_size}"
        )
    if not isinstance(m.onnx_sha256, str) or not _SHA256_RE.match(m.onnx_sha256):
        problems.append("onnx_sha256: 64 lowercase hex digits are expected")
    return problems


def check_build_args(max_batch_size: int, precision: str) -> None:
    try:
        trt_node.check_build_args(max_batch_size, precision)
    except NodeError as exc:
        raise ExportError(str(exc)) from exc


# --- building with the Python API ----------------------------------------------------------------


def _gpu_identity() -> tuple[str, str, str | None]:
    """(name, compute capability, CUDA runtime version) of the device TensorRT builds on:
    CUDA's current device, 0, i.e. the first of CUDA_VISIBLE_DEVICES."""
    try:
        cudart = _import_cudart()
    except ImportError:
        return _gpu_identity_from_nvidia_smi()
    err, prop = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise ExportError(f"cannot read the GPU's properties (CUDA error {_cuda_error(err)})")
    name = prop.name
    if isinstance(name, bytes | bytearray):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    err, version = cudart.cudaRuntimeGetVersion()  # 12080 for CUDA 12.8
    ok = err == cudart.cudaError_t.cudaSuccess
    cuda = f"{version // 1000}.{version % 1000 // 10}" if ok else None
    return str(name).strip(), f"{prop.major}.{prop.minor}", cuda


def _gpu_identity_from_nvidia_smi() -> tuple[str, str, str | None]:
    try:
        name, cc = trt_node.gpu_identity()
    except NodeError as exc:
        raise ExportError(
            "cannot tell which GPU the engine is built for: install cuda-python, or put "
            f"nvidia-smi on PATH ({_first_line(exc)})"
        ) from exc
    return name, cc, None


def _cuda_error(err: Any) -> str:
    return str(getattr(err, "name", err))


def _make_logger(trt: Any, log: Callable[[str], None], errors: list[str]) -> Any:
    """A TensorRT logger that passes warnings and errors to ``log`` and keeps the errors,
    so a failed build can say why in its one-line ExportError."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                errors.append(" ".join(msg.split()))
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                log(f"tensorrt: {msg}")

    return _Logger()


def _input_problem(network: Any, contract: PreprocessContract) -> str | None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    tensor = inputs.get(contract.input_name)
    if tensor is None:
        return f"the graph has no input {contract.input_name!r} (it has {', '.join(inputs)})"
    shape = tuple(tensor.shape)
    if shape[1:] != contract.input_shape:
        return (
            f"input {contract.input_name!r} is {list(shape)}, the contract says "
            f"[-1, {', '.join(map(str, contract.input_shape))}]"
        )
    return None


def _has_quantize_layers(trt: Any, network: Any) -> bool:
    return any(
        network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers)
    )


def _has_float16_weights(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    contract: PreprocessContract,
    max_batch_size: int,
    precision: str,
    timing_cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> EngineManifest:
    """Build ``plan_path`` from ``onnx_path`` on this machine's GPU; return its manifest.

    The settings are :func:`trtexec_command`'s: one optimization profile on the contract's
    input, batch 1 .. ``max_batch_size`` tuned for ``min(8, max)``. With TensorRT 10, fp16
    enables FP16 kernels, int8 INT8 and FP16 kernels for a QDQ graph (explicit quantization:
    the scales are in the graph, so there is no calibrator); TensorRT 11 builds what the
    graph's types say (an fp16 export's float16 graph, an int8 export's Q/DQ nodes), and an
    fp16 build of a graph without float16 weights is refused. The timing cache, when given, is read if
    present and written back, so rebuilds on the same GPU skip most kernel timing. The plan
    appears whole or not at all (written beside itself, then renamed); the caller writes
    the manifest to ``engine.json``.
    """

    check_build_args(max_batch_size, precision)
    reason = unavailable_reason()
    if reason is not None:
        raise ExportError(reason)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    import tensorrt as trt

    gpu_name, cc, cuda_version = _gpu_identity()
    errors: list[str] = []
    logger = _make_logger(trt, log, errors)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; the old EXPLICIT_BATCH flag is gone.
    # TensorRT 11 networks are always strongly typed (trt_node.strongly_typed).
    network = builder.create_network(0)
    strong = trt_node.strongly_typed(str(trt.__version__))
    # Held until the build: the parser owns the weights the network refers to.
    parser = trt.OnnxParser(network, logger)
    _parse(trt, parser, network, onnx_path, contract, precision, strong)
    config, opt = _builder_config(trt, builder, contract, max_batch_size, precision, strong)
    _use_timing_cache(config, timing_cache, log)

    log(f"building the {precision} TensorRT engine for {gpu_name} (batch 1..{max_batch_size})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = f" ({errors[-1]})" if errors else ""
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}{detail}")
    _write_atomic(plan_path, memoryview(serialized))
    if timing_cache is not None:
        _write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return EngineManifest(
        tensorrt_version=str(trt.__version__),
        gpu_name=gpu_name,
        compute_capability=cc,
        cuda_version=cuda_version,
        precision=cast(Precision, precision),
        max_batch_size=max_batch_size,
        opt_batch_size=opt,
        onnx_sha256=trt_node.sha256_file(onnx_path),
    )


def _parse(
    trt: Any,
    parser: Any,
    network: Any,
    onnx_path: Path,
    contract: PreprocessContract,
    precision: str,
    strong: bool,
) -> None:
    """Parse ``onnx_path`` into ``network``; refuse a graph TensorRT rejects, one whose
    input is not the contract's, or one that cannot give ``precision``."""
    if not parser.parse_from_file(str(onnx_path)):
        found = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            found.append(f"node {err.node()}: {' '.join(str(err.desc()).split())}")
        raise ExportError(
            f"{onnx_path}: TensorRT's ONNX parser rejected the graph ({'; '.join(found)})"
        )
    problem = _input_problem(network, contract)
    if problem is not None:
        raise ExportError(f"{onnx_path}: {problem}")
    if strong and precision == "fp16" and not _has_float16_weights(onnx_path):
        raise ExportError(
            f"{onnx_path}: TensorRT {trt.__version__} takes the precision from the graph "
            "(strongly typed networks), and this graph has no float16 weights: export it "
            "with --precision fp16"
        )
    if precision == "int8" and not _has_quantize_layers(trt, network):
        raise ExportError(
            f"{onnx_path}: int8 needs a QDQ graph (QuantizeLinear/DequantizeLinear nodes "
            "carrying the scales); this one has none"
        )


def _builder_config(
    trt: Any,
    builder: Any,
    contract: PreprocessContract,
    max_batch_size: int,
    precision: str,
    strong: bool,
) -> tuple[Any, int]:
    """The build's settings: one optimization profile (batch 1 .. ``max_batch_size``,
    tuned for the returned batch size) and, before TensorRT 11, the precision flags."""
    config = builder.create_builder_config()
    shape = contract.input_shape
    opt = opt_batch_size(max_batch_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(contract.input_name, (1, *shape), (opt, *shape), (max_batch_size, *shape))
    config.add_optimization_profile(profile)
    # TensorRT 11 takes the precision from the graph's types (an fp16 export is a float16
    # graph, an int8 one has Q/DQ nodes): it has no precision flags.
    if precision in ("fp16", "int8") and not strong:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and not strong:
        # With Q/DQ layers TensorRT quantizes exactly where the graph says (explicit
        # quantization); FP16 above lets the layers between them run in half precision.
        config.set_flag(trt.BuilderFlag.INT8)
    return config, opt


def _use_timing_cache(config: Any, timing_cache: Path | None, log: Callable[[str], None]) -> None:
    """Start the build from ``timing_cache`` where it was recorded on this GPU and TensorRT."""
    cache_bytes = b""
    if timing_cache is not None and timing_cache.is_file():
        cache_bytes = timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # Recorded on another GPU or TensorRT: its timings would mislead, start afresh.
        log(f"timing cache {timing_cache} is from another GPU or TensorRT; not using it")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``path`` whole or not at all (trt_node's write, which the GPU node's script
    uses too), a failure as an ExportError."""
    try:
        trt_node.write_atomic(path, data)
    except OSError as exc:
        raise ExportError(f"cannot write {path} ({exc.strerror or exc})") from exc


# --- running an engine -----------------------------------------------------------------------


def _cuda_check(cudart: Any, what: str, result: Any) -> Any:
    """cuda-python returns ``(error, *values)``: raise ExportError on an error, else the value."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise ExportError(f"{what} failed (CUDA error {_cuda_error(err)})")
    return values[0] if len(values) == 1 else (values or None)


@contextlib.contextmanager
def _device_memory(cudart: Any, nbytes: int) -> Iterator[int]:
    ptr = _cuda_check(cudart, "cudaMalloc", cudart.cudaMalloc(max(nbytes, 1)))
    try:
        yield int(ptr)
    finally:
        cudart.cudaFree(ptr)


def _to_device(cudart: Any, dst: int, src: np.ndarray) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    _cuda_check(cudart, "cudaMemcpy to the GPU", cudart.cudaMemcpy(dst, src, src.nbytes, kind))


def _from_device(cudart: Any, dst: np.ndarray, src: int) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    _cuda_check(cudart, "cudaMemcpy from the GPU", cudart.cudaMemcpy(dst, src, dst.nbytes, kind))


def run_engine(plan_path: Path, batch: np.ndarray, input_name: str, output_name: str) -> np.ndarray:
    """Run one batch through the engine in ``plan_path`` on this machine's GPU.

    For checking a freshly built engine against ONNX Runtime, not for serving (Triton
    serves): the engine is deserialized and its buffers allocated on every call.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise ExportError(reason)
    try:
        cudart = _import_cudart()
    except ImportError as exc:
        raise ExportError(_NO_CUDA_PYTHON) from exc
    import tensorrt as trt

    errors: list[str] = []
    logger = _make_logger(trt, lambda _: None, errors)
    try:
        plan = plan_path.read_bytes()
    except OSError as exc:
        raise ExportError(f"{plan_path}: cannot read the engine ({exc.strerror or exc})") from exc
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        detail = errors[-1] if errors else "built for another GPU or TensorRT version?"
        raise ExportError(f"{plan_path}: TensorRT cannot load this engine ({detail})")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if sorted(names) != sorted([input_name, output_name]):
        raise ExportError(
            f"{plan_path}: the engine's tensors are {', '.join(names)}, "
            f"not {input_name!r} in and {output_name!r} out"
        )
    context = engine.create_execution_context()
    x = np.ascontiguousarray(batch, dtype=trt.nptype(engine.get_tensor_dtype(input_name)))
    if not context.set_input_shape(input_name, x.shape):
        lo, _, hi = engine.get_tensor_profile_shape(input_name, 0)
        raise ExportError(
            f"batch shape {list(x.shape)} is outside the engine's profile {list(lo)} .. {list(hi)}"
        )
    out = np.empty(
        tuple(context.get_tensor_shape(output_name)),
        dtype=trt.nptype(engine.get_tensor_dtype(output_name)),
    )
    stream = _cuda_check(cudart, "cudaStreamCreate", cudart.cudaStreamCreate())
    try:
        with _device_memory(cudart, x.nbytes) as d_in, _device_memory(cudart, out.nbytes) as d_out:
            _to_device(cudart, d_in, x)
            context.set_tensor_address(input_name, d_in)
            context.set_tensor_address(output_name, d_out)
            if not context.execute_async_v3(int(stream)):
                detail = f" ({errors[-1]})" if errors else ""
                raise ExportError(f"{plan_path}: TensorRT could not run the engine{detail}")
            _cuda_check(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(stream))
            _from_device(cudart, out, d_out)
    finally:
        cudart.cudaStreamDestroy(stream)
    return out


# --- trtexec --------------------------------------------------------------


def trtexec_command(
    onnx_path: str,
    plan_path: str,
    contract: PreprocessContract,
    max_batch_size: int,
    precision: str,
    timing_cache: str | None = None,
    tensorrt_version: str = "10",
) -> list[str]:
    """The ``trtexec`` argv that builds the engine :func:`build_engine` builds: the
    contract's input, ``export/trt_node.py``'s command (the one the GPU node runs)."""
    try:
        return trt_node.trtexec_command(
            onnx_path,
            plan_path,
            contract.input_name,
            contract.input_shape,
            max_batch_size,
            precision,
            timing_cache,
            tensorrt_version,
        )
    except NodeError as exc:
        raise ExportError(str(exc)) from exc


def shell_command(argv: list[str]) -> str:
    return shlex.join(argv)
