"""TorchServe 0.12's test_metrics.py and test_metrics_kf.py against Osprey, as
test_torchserve_pytest.py runs the other modules (a file of their own so that pytest-xdist runs
them beside the others)."""

from __future__ import annotations

import pytest

from tests.e2e.test_torchserve_pytest import METRICS_MODULES, check_module, netns, wheels  # noqa: F401 (fixtures)


@pytest.mark.parametrize("module", METRICS_MODULES)
def test_module_passes_what_torchserve_passes(module, netns, wheels, tmp_path):  # noqa: F811
    check_module(module, netns, wheels, tmp_path)
