"""The portable gradient graph on every engine (issue 19): onnxruntime CPU, onnxruntime-web WebAssembly
under Node.js and in headless Chromium, onnxruntime-web WebGPU in headless Chromium, OpenVINO CPU.

Each model of the CI subset is exported once (64x64, torchvision's random initialization) and run on
every engine; the engine's logits and target_index must match float64 torch autograd, and its gradient
must match torch replaying that engine's own max-pool and ReLU decisions (tests/engines/parity.py)
within the export's tolerance policy (gradmap.graph.parity.Tolerance: ten times torch's own float32
error replaying the same decisions, at least 1e-4 of max|torch|). The error against onnxruntime CPU's gradient is
recorded beside it (`record_property`). An engine missing here is skipped with the reason; in CI
(CI=true) it fails instead. tools/engine_matrix.py runs all 21 families at full size.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.engines, also under plain `pytest`

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("onnx")

from gradmap.export._torchvision import _fill_zero_weights  # noqa: E402
from tests.engines import ENGINES, available, versions  # noqa: E402
from tests.engines.parity import batch_for, check_engine, export_for_engines  # noqa: E402

SIZE = 64
# the smallest member of the families the issue names; the ViT is built for 64x64 (16 patches)
MODELS = {
    "resnet18": {}, "mobilenet_v3_small": {}, "efficientnet_b0": {}, "densenet121": {},
    "vit_b_16": {"image_size": SIZE}, "convnext_tiny": {},
}
IN_CI = os.environ.get("CI") == "true"

# Known engine bugs: (engine, model) -> the engine, version, op and pattern, as found by exposing
# intermediate outputs (python -m tests.engines.diverge ENGINE MODEL). Strict xfail: a fix shows.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _require(engine: str) -> None:
    ok, why = available(engine)
    if not ok:
        if IN_CI:
            pytest.fail(f"{engine} must run in CI: {why}")
        pytest.skip(f"{engine} not available: {why}")


@pytest.fixture(scope="module", autouse=True)
def _stop_browser():
    """The Chromium engines run under Playwright's sync API, whose event loop stays on this thread
    until it is stopped; Playwright then refuses to start another (tests/test_web.py's browser) in the
    same worker process. Stop it once this file's tests are done."""
    yield
    from tests.engines import _browser

    _browser._reset()


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def exported(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None, **MODELS[name])
    _fill_zero_weights(module)  # the ViT's zero-initialized head, as `gradmap export --weights none` does
    module.eval()
    return export_for_engines(module, name, tmp_path_factory.mktemp("engines"), (SIZE, SIZE), resize=73)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_gradient_matches_torch(exported, engine, record_property, request):
    _require(engine)
    bug = KNOWN_BUGS.get((engine, exported.name))
    if bug:
        request.applymarker(pytest.mark.xfail(reason=bug, strict=True))
    image, target = batch_for(exported, seed=1)
    check = check_engine(engine, exported, image, target)
    record_property("engine_versions", versions())
    record_property("check", {k: v for k, v in vars(check).items() if k != "notes"})
    assert check.error is None, f"{engine} fails on {exported.name} ({exported.export_note}): {check.error}"
    assert check.ok, (f"{engine} on {exported.name} ({exported.export_note}): " + "; ".join(check.problems)
                      + f"; gradient vs onnxruntime CPU {check.vs_ort_cpu:.3g}; replayed {check.replayed}")
    if exported.name in ("resnet18", "densenet121", "mobilenet_v3_small"):
        assert check.replayed == "pools+relus" or (check.replayed == "relus" and exported.name == "mobilenet_v3_small"), \
            f"{exported.name}: only {check.replayed} decisions replayed"


def test_engine_check_takes_the_tolerance_policy_and_refuses_a_planted_error(tmp_path):
    """check_engine's limits are the export's policy (ten times torch's own float32 error on the batch,
    at least the floor), and a gradient 0.3 % off (far beyond float32 rounding and the floor) is refused."""
    import onnx
    from onnx import helper, numpy_helper

    from gradmap import contract
    from gradmap.graph.parity import TOLERANCE

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                 torch.nn.Linear(6 * 7 * 7, 4)).eval()
    exported = export_for_engines(module, "tiny", tmp_path, (16, 16))
    image, target = batch_for(exported, seed=2)
    check = check_engine("ort_cpu", exported, image, target)
    assert check.ok, check.problems
    assert check.gradient_limit == max(TOLERANCE.floor, TOLERANCE.factor * check.own_gradient)
    assert 0 < check.own_gradient < 1e-5 and check.gradient_error <= check.gradient_limit

    proto = onnx.load(str(exported.exposed_path))  # the gradient output, 0.3 % too large
    producer = next(n for n in proto.graph.node if contract.OUTPUT_GRADIENT in n.output)
    producer.output[list(producer.output).index(contract.OUTPUT_GRADIENT)] = "gradient_unscaled"
    proto.graph.initializer.append(numpy_helper.from_array(np.array(1.003, np.float32), "planted_scale"))
    proto.graph.node.append(helper.make_node("Mul", ["gradient_unscaled", "planted_scale"], [contract.OUTPUT_GRADIENT]))
    onnx.save(proto, str(exported.exposed_path))
    wrong = check_engine("ort_cpu", exported, image, target)
    assert not wrong.ok and any("gradient differs" in p for p in wrong.problems), wrong.problems
