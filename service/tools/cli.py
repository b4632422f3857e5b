"""``resnet-serve``: run the gateway (and, for tests and local work, a real Triton)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.tools.cli_common import fail, make_app

if TYPE_CHECKING:
    from service.tools.bench.run import BenchConfig

app = make_app(
    "resnet-serve",
    "Serve ResNet classifiers from a model repository (REST, gRPC, Prometheus).",
)


def _fail(message: str) -> typer.Exit:
    return fail("resnet-serve", message)


@app.command()
def serve(
    ctx: typer.Context,
    repository: Annotated[
        Path | None,
        typer.Option(
            "--repository",
            "-r",
            help="Model repository (resnet-export output; default model_repository).",
        ),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="onnxruntime (embedded, the default) or triton.")
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="The embedded backend's engine: onnxruntime (the default), openvino, or "
            "auto (the faster, timed at start)."
        ),
    ] = None,
    triton_url: Annotated[
        str | None, typer.Option(help="Triton gRPC endpoint HOST:PORT (with --backend triton).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="REST bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="REST port (default 8000).")] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="Also serve the gRPC API on this port.")
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated models to serve (default: all).")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Serve every model of the repository. All other settings: RESNET_SERVE_* (docs)."""
    from pydantic import ValidationError

    from service.model.repository import RepositoryError, load_repository
    from service.settings import Settings, describe_settings_error

    # Only the options given override the environment (RESNET_SERVE_REPOSITORY, ..., as
    # the image and the Helm chart set them); the defaults are the Settings' own. Each
    # option is named as its setting.
    overrides = {key: value for key, value in ctx.params.items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise _fail(f"invalid setting {describe_settings_error(exc)}") from None
    try:
        specs = load_repository(settings.repository, settings.models or None)
    except RepositoryError as exc:
        raise _fail(str(exc)) from None
    if settings.default_model and settings.default_model not in {s.name for s in specs}:
        raise _fail(f"default model {settings.default_model!r} is not among the served models")

    from service.host import memory
    from service.observability import observe
    from service.observability.tracing import TracingError
    from service.transports.http.app import create_app
    from service.transports.serving import DrainingServer, OneLineStartupErrors, uvicorn_config

    observe.configure_logging(settings.log_level, settings.log_format)
    memory.limit_arenas()  # before any thread starts
    try:
        fastapi_app = create_app(settings)
    except TracingError as exc:
        raise _fail(str(exc)) from None
    config = uvicorn_config(OneLineStartupErrors(fastapi_app), fastapi_app, settings)
    # A log record, not a print: with LOG_FORMAT=json every line the process writes is JSON.
    logging.getLogger("service.tools.cli").info(
        "resnet-serve: %s on http://%s:%s (backend %s; docs at /docs%s)",
        ", ".join(s.name for s in specs),
        settings.host,
        settings.port,
        f"onnxruntime, engine {settings.engine}"
        if settings.backend == "onnxruntime"
        else settings.backend,
        f"; gRPC on port {settings.grpc_port}" if settings.grpc_port is not None else "",
    )
    if not DrainingServer(config, fastapi_app.state.runtime, settings.drain_seconds).run():
        raise typer.Exit(1)


@app.command()
def triton(
    repository: Annotated[
        Path,
        typer.Option(
            "--repository", "-r", help="Model repository exported with --flavor python-ort."
        ),
    ] = Path("model_repository"),
    host: Annotated[
        str, typer.Option(help="Address Triton's HTTP, gRPC and metrics ports bind to.")
    ] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(min=1, max=65535, help="Triton HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535, help="Triton gRPC port.")] = 8001,
    metrics_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Triton metrics port.")
    ] = 8002,
    ready_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for readiness.")
    ] = 180.0,
) -> None:
    """Start a real tritonserver (CPU build from nvidia-pytriton, python backend) on the
    repository, wait until it is ready, and run it until Ctrl-C or SIGTERM.

    Model control mode none and strict readiness: every model in the repository loads at
    start, and Triton is ready only when all of them are.
    """
    from service.model.repository import RepositoryError, load_repository
    from service.tools.triton_launcher import TritonError, start_triton

    try:
        specs = load_repository(repository)
    except RepositoryError as exc:
        raise _fail(str(exc)) from None
    for spec in specs:
        if spec.config.backend != "python":
            raise _fail(
                f"model {spec.name!r} uses {spec.platform or 'no backend'}, which "
                "this CPU tritonserver lacks; re-export it with --flavor python-ort"
            )
    try:
        server = start_triton(repository, http_port, grpc_port, metrics_port, host=host)
        server.wait_ready(ready_timeout)
    except TritonError as exc:
        raise _fail(str(exc).splitlines()[0]) from None
    typer.echo(
        f"resnet-serve: triton ready: gRPC {server.grpc_url}, HTTP {server.http_url}, "
        f"metrics {host}:{metrics_port} ({', '.join(s.name for s in specs)})"
    )

    def forward(sig: int, frame: FrameType | None) -> None:
        server.proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = server.proc.wait()
    server.stop()
    raise typer.Exit(0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code)


def _numbers(text: str | None, kind: type, option: str) -> list[Any]:
    if not text:
        return []
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _fail(f"{option} {text}: expected comma-separated numbers, e.g. 1,4,16") from None


def _bench_config(options: dict[str, Any]) -> BenchConfig:
    """The run's request from ``bench``'s options (by parameter name): the steps parsed from
    their comma-separated lists, the times named in seconds."""
    from service.tools.bench.run import BenchConfig

    fields = dict(options)
    concurrency, rate = fields.pop("concurrency"), fields.pop("rate")
    for name in ("duration", "warmup", "timeout"):
        fields[f"{name}_s"] = fields.pop(name)
    return BenchConfig(
        **fields,
        concurrency=_numbers(concurrency, int, "--concurrency"),
        rates=_numbers(rate, float, "--rate"),
    )


@app.command()
def bench(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(help="The gateway: http(s)://HOST:PORT, or HOST:PORT for gRPC.")
    ],
    model: Annotated[str, typer.Option(help="The model to classify with.")],
    images: Annotated[
        Path, typer.Option(help="A folder of image files, sent in turn (at most 1000 read).")
    ],
    output: Annotated[
        Path, typer.Option(help="Folder for report.json, steps.csv and latency.png.")
    ],
    protocol: Annotated[
        str, typer.Option(help="rest, grpc (Classifier), kserve-http or kserve-grpc.")
    ] = "rest",
    concurrency: Annotated[
        str | None, typer.Option(help="Closed loop: clients per step, e.g. 1,4,16 (default).")
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(help="Open loop: Poisson arrivals per second per step, e.g. 5,10,20."),
    ] = None,
    slo_p99_ms: Annotated[
        float | None,
        typer.Option(
            help="Search for the highest rate whose p99 stays within this, with no errors."
        ),
    ] = None,
    duration: Annotated[float, typer.Option(help="Seconds measured per step.")] = 10.0,
    warmup: Annotated[
        float, typer.Option(help="Seconds of unrecorded load before each step.")
    ] = 2.0,
    max_requests: Annotated[
        int, typer.Option(help="At most this many requests per step.")
    ] = 1_000_000,
    images_per_request: Annotated[int, typer.Option(help="Images in each request.")] = 1,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="RESNET_BENCH_API_KEY", help="API key (or RESNET_BENCH_API_KEY)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Client timeout per request, seconds.")] = 30.0,
    metrics_url: Annotated[
        str | None,
        typer.Option(
            help="The gateway's /metrics (default: URL/metrics over HTTP; none for gRPC)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson schedule.")] = 0,
    honor_retry_after: Annotated[
        bool,
        typer.Option(
            help="Closed loop: after a refusal, wait the server's Retry-After (jittered ±50%)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress line and no table.")] = False,
) -> None:
    """Load-test a gateway: throughput and latency percentiles per step, the gateway's own
    breakdown, and with --slo-p99-ms the highest rate within a p99 budget."""
    import sys

    from service.tools.bench import BenchError
    from service.tools.bench.run import run

    cfg = _bench_config(ctx.params)  # every option above, by name
    try:
        result = run(cfg, ["resnet-serve", *sys.argv[1:]])
    except BenchError as exc:
        raise _fail(str(exc)) from None
    except ModuleNotFoundError as exc:
        raise _fail(
            f"{exc.name} is missing: pip install 'resnet-serving[bench]' for the load tool"
        ) from None
    except KeyboardInterrupt:
        typer.echo("resnet-serve: interrupted; no report written", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"report: {', '.join(result['files'])}")


@app.command()
def tune(
    repository: Annotated[Path, typer.Option("--repository", "-r", help="Model repository.")],
    model: Annotated[str, typer.Option(help="The model to tune for.")],
    images: Annotated[Path, typer.Option(help="A folder of your own image files.")],
    slo_p99_ms: Annotated[float, typer.Option(help="The p99 budget, milliseconds.")],
    output: Annotated[
        Path,
        typer.Option(help="Folder for tune.json, tune.md, tune.env, values.yaml, each trial."),
    ],
    duration: Annotated[float, typer.Option(help="Seconds per load step.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Seconds of warm-up per step.")] = 2.0,
    max_minutes: Annotated[float, typer.Option(help="Stop trying candidates after this.")] = 30.0,
) -> None:
    """Try gateway settings on this machine with your images (a real gateway per candidate,
    the SLO search on each) and write the best as an env file and a Helm values snippet."""
    import itertools

    from service.tools.bench import BenchError
    from service.tools.tune import gateway_process, table
    from service.tools.tune import tune as run_tune

    if not (repository / model).is_dir():
        raise _fail(f"--repository {repository}: no model {model!r} there")
    count = itertools.count(1)
    try:
        summary = run_tune(
            lambda settings: gateway_process(
                repository, settings, output / f"gateway-{next(count)}.log"
            ),
            model,
            images,
            slo_p99_ms,
            output,
            duration_s=duration,
            warmup_s=warmup,
            max_minutes=max_minutes,
        )
    except BenchError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        typer.echo("resnet-serve: interrupted; nothing written", err=True)
        raise typer.Exit(130) from None
    best = summary["best"]
    typer.echo(table(summary), nl=False)
    typer.echo(
        f"best: {summary['recommended']}: {best['slo']['max_rate_per_s']:g} requests/s with "
        f"{best.get('engine')} computing in {best.get('served_precision')}"
    )
    typer.echo(
        f"wrote: {output / 'tune.env'}, {output / 'values.yaml'}, {output / 'tune.json'}, "
        f"{output / 'tune.md'}"
    )


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app(prog_name="resnet-serve")


if __name__ == "__main__":  # pragma: no cover
    main()
