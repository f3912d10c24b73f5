"""benchmarks/accumulation.py at tiny sizes: one micro-batch (k = 1) is the big batch exactly, k = 2 is not, and the
exact mode's two chunks are."""

from __future__ import annotations

import accumulation  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import lightning as L
import pytest

from loca_lightning.pretrain.module import LOCAPretrainModule

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_k_of_one_is_the_big_batch_and_two_micro_batches_are_not() -> None:
    L.seed_everything(0, verbose=False)
    one, two = accumulation.measure(LOCAPretrainModule(**accumulation.DEMO_MODEL), micro=2, ks=[1, 2])
    assert one["targets_tv"] == 0.0 and one["targets_argmax_differs"] == 0.0
    for part in ("all", "location", "cluster"):
        assert one[f"grad_{part}_rel"] == 0.0 and one[f"grad_{part}_rel_other_batch"] > 0.0
    assert two["targets_tv"] > 0.0 and two["grad_cluster_rel"] > 0.0 and two["batch"] == 4
    assert one["grad_exact_rel"] == 0.0 and two["grad_exact_rel"] < 1e-5 < two["grad_all_rel"]
