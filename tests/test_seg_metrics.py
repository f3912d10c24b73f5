"""SegmentationMetric: MMSegmentation semantics, numpy reference, DDP equivalence, class table."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loca_lightning.segmentation.metrics import SegmentationMetric, format_class_table

IGNORE = 255


def _numpy_reference(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int) -> dict:
    """Confusion matrix over all batches -> IoU/Acc/aAcc the textbook way."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)  # [label, pred]
    for p, t in zip(preds, targets):
        keep = t != IGNORE
        np.add.at(conf, (t[keep], p[keep]), 1)
    tp = np.diag(conf).astype(np.float64)
    label = conf.sum(1).astype(np.float64)
    pred = conf.sum(0).astype(np.float64)
    union = label + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(label > 0, tp / label, np.nan)
    return {"IoU": iou, "Acc": acc, "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc), "aAcc": tp.sum() / label.sum()}


def test_hand_computed_with_absent_and_ignored():
    # 4 classes. Class 3 never labelled nor predicted -> NaN IoU, excluded from means.
    # Class 2 predicted once but never labelled -> IoU 0 (counts), Acc NaN (excluded).
    target = torch.tensor([[[0, 0, 1, 1], [1, IGNORE, IGNORE, 0]]])
    preds = torch.tensor([[[0, 1, 1, 2], [1, 3, 0, 0]]])  # pixels under 255 predict 3 and 0: must not count
    metric = SegmentationMetric(num_classes=4)
    metric.update(preds, target)
    out = metric.compute()
    # class 0: labels at 3 pixels, preds (valid) at 2 -> TP 2, union 3
    # class 1: labels at 3, preds at 3 -> TP 2, union 4
    # class 2: labels 0, preds 1 -> TP 0, union 1
    expected_iou = [2 / 3, 2 / 4, 0.0, math.nan]
    expected_acc = [2 / 3, 2 / 3, math.nan, math.nan]
    np.testing.assert_allclose(out["IoU"].numpy(), expected_iou, equal_nan=True)
    np.testing.assert_allclose(out["Acc"].numpy(), expected_acc, equal_nan=True)
    assert out["mIoU"].item() == pytest.approx((2 / 3 + 2 / 4 + 0.0) / 3)
    assert out["mAcc"].item() == pytest.approx(2 / 3)
    assert out["aAcc"].item() == pytest.approx(4 / 6)


def test_ignored_pixels_change_nothing_and_logits_equal_indices():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 5, 6))
    target[:, 0] = IGNORE
    logits = torch.randn(2, 3, 5, 6)
    a = SegmentationMetric(3)
    a.update(logits, target)
    b = SegmentationMetric(3)
    changed = logits.argmax(1)
    changed[:, 0] = (changed[:, 0] + 1) % 3  # alter predictions only on ignored pixels
    b.update(changed, target)
    ra, rb = a.compute(), b.compute()
    for key in ("area_intersect", "area_union", "area_pred", "area_label"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert a.area_label.sum().item() == 2 * 4 * 6
    assert ra["mIoU"].item() == rb["mIoU"].item()


def test_equals_numpy_confusion_matrix_on_random_batches():
    rng = np.random.default_rng(1)
    num_classes = 7
    metric = SegmentationMetric(num_classes)
    preds, targets = [], []
    for _ in range(4):
        t = rng.integers(0, num_classes - 1, size=(3, 9, 11))  # class 6 never labelled
        t[rng.random(t.shape) < 0.2] = IGNORE
        p = rng.integers(0, num_classes, size=t.shape)
        p[t == 2] = 2  # some true positives
        preds.append(p)
        targets.append(t)
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    out = metric.compute()
    ref = _numpy_reference(preds, targets, num_classes)
    for key in ("IoU", "Acc"):
        np.testing.assert_allclose(out[key].numpy(), ref[key], equal_nan=True, rtol=1e-12)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-12)
    assert math.isnan(out["Acc"][6].item()) and not math.isnan(out["IoU"][6].item())


def test_bad_inputs_raise():
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 3], [7, IGNORE]]]))
    with pytest.raises(ValueError, match="preds holds class indices"):
        metric.update(torch.full((1, 2, 2), 5), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        metric.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMetric(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetric(3, ignore_index=1)


def test_class_table_prints_names_and_numbers():
    metric = SegmentationMetric(3, class_names=["sky", "road", "tree"])
    metric.update(torch.tensor([[[0, 1, 1, 0]]]), torch.tensor([[[0, 1, 0, 0]]]))
    text = format_class_table(metric.compute(), metric.class_names)
    lines = text.splitlines()
    sky = next(line for line in lines if "sky" in line)
    road = next(line for line in lines if "road" in line)
    tree = next(line for line in lines if "tree" in line)
    assert "66.67" in sky and "66.67" in sky.split("|")[3]  # IoU 2/3, Acc 2/3
    assert "50.00" in road and "100.00" in road  # IoU 1/2, Acc 1/1
    assert tree.count("nan") == 2
    assert lines[-1] == "aAcc: 75.00  mIoU: 58.33  mAcc: 83.33"
    assert "| 0 " in format_class_table(metric.compute(), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, preds: torch.Tensor, target: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metric = SegmentationMetric(5)
        half = preds.shape[0] // world
        for i in range(rank * half, (rank + 1) * half):  # several updates per process
            metric.update(preds[i : i + 1], target[i : i + 1])
        result = metric.compute()
        if rank == 0:
            torch.save({k: v.clone() for k, v in result.items()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (6, 8, 8), generator=gen)  # class 4 never labelled
    target[torch.rand(target.shape, generator=gen) < 0.25] = IGNORE
    logits = torch.randn(6, 5, 8, 8, generator=gen)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), logits, target, out), nprocs=2, join=True)
    ddp = torch.load(out)
    single = SegmentationMetric(5)
    single.update(logits, target)
    ref = single.compute()
    for key in ("mIoU", "mAcc", "aAcc", "IoU", "Acc"):
        torch.testing.assert_close(ddp[key], ref[key], equal_nan=True)
