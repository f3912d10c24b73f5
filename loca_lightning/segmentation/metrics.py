"""Dataset-level segmentation metrics with MMSegmentation's semantics (mIoU, mAcc, aAcc).

Intersection, union, prediction and label areas are summed per class over the whole dataset
(and across processes), and only then turned into ratios. A class whose union is zero (never
labelled and never predicted) has IoU NaN and is left out of mIoU; a class never labelled has
Acc NaN and is left out of mAcc. Pixels labelled ``ignore_index`` never reach the counts.
All ratios are fractions in [0, 1]; ``format_class_table`` prints them as percentages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class SegmentationMetric(Metric):
    """Per-class intersection/union accumulated over a dataset; computes mIoU, mAcc, aAcc."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class index for num_classes={num_classes}; "
                "pick a value outside [0, num_classes)"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names, expected num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        # int64 sums are exact at any dataset size and reduce on every backend.
        for name in ("area_intersect", "area_union", "area_pred", "area_label"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: preds [B, H, W] class indices or [B, C, H, W] logits; target [B, H, W]."""
        pred_labels = self._to_labels(preds, target)
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bad.any():
            values = torch.unique(target[bad]).tolist()
            raise ValueError(
                f"target holds values {values[:20]} outside [0, {self.num_classes}) that are not "
                f"ignore_index={self.ignore_index}"
            )
        label = target[valid].long()  # [P] labelled pixels only
        pred = pred_labels[valid].long()  # [P]
        c = self.num_classes
        intersect = torch.bincount(label[pred == label], minlength=c)
        area_pred = torch.bincount(pred, minlength=c)
        area_label = torch.bincount(label, minlength=c)
        self.area_intersect += intersect
        self.area_pred += area_pred
        self.area_label += area_label
        self.area_union += area_pred + area_label - intersect

    def _to_labels(self, preds: Tensor, target: Tensor) -> Tensor:
        """Class indices [B, H, W] from indices or logits, with shapes and ranges checked."""
        if target.ndim != 3:
            raise ValueError(f"target must be [B, H, W], got shape {tuple(target.shape)}")
        if preds.ndim == 4:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"preds logits have {preds.shape[1]} channels, expected num_classes={self.num_classes}"
                )
            preds = preds.argmax(dim=1)
        elif preds.ndim == 3:
            if preds.dtype.is_floating_point:
                raise ValueError(f"preds [B, H, W] must hold integer class indices, got dtype {preds.dtype}")
            out_of_range = (preds < 0) | (preds >= self.num_classes)
            if out_of_range.any():
                values = torch.unique(preds[out_of_range]).tolist()
                raise ValueError(f"preds holds class indices {values[:20]} outside [0, {self.num_classes})")
        else:
            raise ValueError(f"preds must be [B, H, W] indices or [B, C, H, W] logits, got shape {tuple(preds.shape)}")
        if preds.shape != target.shape:
            raise ValueError(f"preds (as labels) has shape {tuple(preds.shape)} but target has {tuple(target.shape)}")
        return preds

    def compute(self) -> dict[str, Tensor]:
        """Return mIoU, mAcc, aAcc (scalars) and per-class IoU, Acc ([C], NaN where undefined)."""
        intersect = self.area_intersect.double()
        union = self.area_union.double()
        label = self.area_label.double()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=intersect.device)
        iou = torch.where(union > 0, intersect / union.clamp_min(1), nan)
        acc = torch.where(label > 0, intersect / label.clamp_min(1), nan)
        total_label = label.sum()
        aacc = torch.where(total_label > 0, intersect.sum() / total_label.clamp_min(1), nan)
        return {
            "aAcc": aacc,
            "mIoU": torch.nanmean(iou),
            "mAcc": torch.nanmean(acc),
            "IoU": iou,
            "Acc": acc,
        }


def _percent(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100.0 * value:.2f}"


def format_class_table(result: dict, class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU/Acc table in percent (2 decimals, "nan" where undefined) plus a summary line."""
    iou = [float(v) for v in result["IoU"]]
    acc = [float(v) for v in result["Acc"]]
    if class_names is None:
        class_names = [str(i) for i in range(len(iou))]
    if len(class_names) != len(iou):
        raise ValueError(f"class_names has {len(class_names)} names but result has {len(iou)} classes")
    width = max([len("Class")] + [len(str(n)) for n in class_names])
    header = f"| {'Class':<{width}} | {'IoU':>6} | {'Acc':>6} |"
    rule = f"+{'-' * (width + 2)}+{'-' * 8}+{'-' * 8}+"
    rows = [f"| {str(n):<{width}} | {_percent(i):>6} | {_percent(a):>6} |" for n, i, a in zip(class_names, iou, acc)]
    summary = (
        f"aAcc: {_percent(float(result['aAcc']))}  "
        f"mIoU: {_percent(float(result['mIoU']))}  "
        f"mAcc: {_percent(float(result['mAcc']))}"
    )
    return "\n".join([rule, header, rule, *rows, rule, summary])
