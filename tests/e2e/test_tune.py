"""`resnet-serve tune` on engines of known cost: it must find the engine and setting known to
be best, say what each candidate computed in, and write the best where an operator takes it
from (an env file, Helm values the chart accepts)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import helm_python as helm
import numpy as np
import yaml

from service.backends.base import Backend
from service.backends.engines import make_engine
from service.host.cpus import has_bf16
from service.model.repository import ModelSpec
from service.settings import Settings
from service.tools.tune import candidates, tune
from service.transports.serving import ThreadedGateway
from tests.helpers.cli import run_cli
from tests.helpers.doubles import SlowBackend
from tests.helpers.engines import NEEDS_OPENVINO
from tests.helpers.images import image_bytes
from tests.helpers.models import as_bf16
from tests.helpers.paths import CHART

#: Seconds per image, whatever the batch, by engine: OpenVINO twice as fast.
PER_IMAGE_S = {"onnxruntime": 0.06, "openvino": 0.03}


class PerImage(SlowBackend):
    """A fixed cost per image, whatever the batch: batching buys nothing, and only running
    batches side by side (ORT_PARALLEL_BATCHES) or the faster engine adds capacity."""

    def __init__(self, inner: Backend, per_image_s: float) -> None:
        super().__init__(inner, 0.0)
        self.per_image_s = per_image_s

    def warm_costs(self, spec: ModelSpec) -> dict[int, float]:
        return {n: self.per_image_s * n for n in self.inner.warm_costs(spec)}

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        await asyncio.sleep(self.per_image_s * len(batch))
        return await self.inner.infer(spec, batch, timeout_s)


@NEEDS_OPENVINO
def test_tune_finds_the_known_best_engine_and_setting(tiny, tmp_path):
    """Each engine with one batch and with two side by side (tune's first round), on a bf16
    version: the best is the faster engine's two batches, and the report says which engine
    computed each candidate in what."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny.repository, repo)
    as_bf16(repo)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(image_bytes(seed=i))

    @contextmanager
    def launch(overrides: dict) -> Iterator[str]:
        settings = Settings(repository=repo, **overrides)
        backend = make_engine(settings.engine, settings)
        with ThreadedGateway(settings, PerImage(backend, PER_IMAGE_S[settings.engine])) as gw:
            yield gw.url

    out = tmp_path / "tune"
    tried = candidates(2, ["onnxruntime", "openvino"])
    summary = tune(
        launch,
        tiny.name,
        images,
        slo_p99_ms=150,
        output=out,
        duration_s=1.5,
        warmup_s=0.3,
        tried=tried,
        log=lambda _: None,
    )
    rows = summary["trials"]
    assert [r["settings"] for r in rows] == tried
    assert [(r["engine"], r["precision"], r["served_precision"]) for r in rows] == [
        (e, "bf16", "bf16" if e == "openvino" and has_bf16() else "fp32")
        for e in ("onnxruntime", "onnxruntime", "openvino", "openvino")
    ]
    rates = {json.dumps(r["settings"]): r["slo"]["max_rate_per_s"] for r in rows}
    best = {"engine": "openvino", "ort_parallel_batches": 2}
    # Which candidate is best is the finding (the next best has half its capacity); by how
    # much depends on how busy the machine is: the sleeps are exact, the gateway's own work
    # around them is not.
    assert summary["best"]["settings"] == summary["recommended"] == best, rates
    assert (out / "tune.env").read_text().splitlines()[1:] == [
        "RESNET_SERVE_ENGINE=openvino",
        "RESNET_SERVE_ORT_PARALLEL_BATCHES=2",
    ]
    assert "| `ORT_PARALLEL_BATCHES=2` (chosen) | openvino |" in (out / "tune.md").read_text()
    values = yaml.safe_load((out / "values.yaml").read_text())
    assert values == {"gateway": {"config": {"engine": "openvino", "ortParallelBatches": 2}}}
    # The snippet is values the chart takes: the settings reach the gateway's environment.
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="t")
    deployment = rendered["resnet-serving/templates/gateway-deployment.yaml"]
    for name, value in (("ENGINE", "openvino"), ("ORT_PARALLEL_BATCHES", "2")):
        assert f'name: RESNET_SERVE_{name}\n              value: "{value}"' in deployment
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
