"""`resnet-serve tune` on a backend of known cost: it must find the setting that is known to
be best, and write it where an operator takes it from (an env file, Helm values the chart
accepts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager

import helm_python as helm
import numpy as np
import yaml

from service.backends.onnxruntime import OnnxRuntimeBackend
from service.model.repository import ModelSpec
from service.settings import Settings
from service.tools.tune import tune
from service.transports.serving import ThreadedGateway
from tests.helpers.cli import run_cli
from tests.helpers.doubles import SlowBackend
from tests.helpers.images import image_bytes
from tests.helpers.paths import CHART

PER_IMAGE_S = 0.03


class PerImage(SlowBackend):
    """30 ms per image, whatever the batch: batching buys nothing, and only running
    batches side by side (ORT_PARALLEL_BATCHES) adds capacity."""

    def warm_costs(self, spec: ModelSpec) -> dict[int, float]:
        return {n: PER_IMAGE_S * n for n in self.inner.warm_costs(spec)}

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        await asyncio.sleep(PER_IMAGE_S * len(batch))
        return await self.inner.infer(spec, batch, timeout_s)


def test_tune_finds_the_known_best_setting(tiny, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(image_bytes(seed=i))

    @contextmanager
    def launch(overrides: dict) -> Iterator[str]:
        settings = Settings(repository=tiny.repository, **overrides)
        backend = OnnxRuntimeBackend(parallel_batches=settings.ort_parallel_batches)
        with ThreadedGateway(settings, PerImage(backend, 0.0)) as gw:
            yield gw.url

    out = tmp_path / "tune"
    summary = tune(
        launch,
        tiny.name,
        images,
        slo_p99_ms=150,
        output=out,
        duration_s=1.5,
        warmup_s=0.3,
        tried=[{}, {"ort_parallel_batches": 2}, {"max_batch_size": 2}],
        log=lambda _: None,
    )
    rates = {json.dumps(t["settings"]): t["slo"]["max_rate_per_s"] for t in summary["trials"]}
    assert summary["best"]["settings"] == {"ort_parallel_batches": 2}, rates
    assert rates['{"ort_parallel_batches": 2}'] > 1.4 * rates["{}"], rates
    assert (out / "tune.env").read_text().splitlines()[1:] == [
        "RESNET_SERVE_ORT_PARALLEL_BATCHES=2"
    ]
    values = yaml.safe_load((out / "values.yaml").read_text())
    assert values == {"gateway": {"config": {"ortParallelBatches": 2}}}
    # The snippet is values the chart takes: the setting reaches the gateway's environment.
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="t")
    assert (
        'name: RESNET_SERVE_ORT_PARALLEL_BATCHES\n              value: "2"'
        in rendered["resnet-serving/templates/gateway-deployment.yaml"]
    )
    assert json.loads((out / "tune.json").read_text())["best"] == summary["best"]


def test_tune_refuses_bad_arguments_in_one_line(tiny, tmp_path):
    proc = run_cli(
        "resnet-serve", "tune", "-r", str(tiny.repository), "--model", "nope",
        "--images", str(tmp_path), "--slo-p99-ms", "100", "--output", str(tmp_path / "o"),
    )  # fmt: skip
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"resnet-serve: error: --repository {tiny.repository}: no model 'nope' there"
    )
    proc = run_cli(
        "resnet-serve", "tune", "-r", str(tiny.repository), "--model", tiny.name,
        "--images", str(tmp_path / "none"), "--slo-p99-ms", "100", "--output", str(tmp_path / "o"),
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().endswith("none: no such directory")
    assert not (tmp_path / "o").exists()  # nothing made for a run that never started
