"""Random LOCA batches of the documented layout, for module tests that do not exercise the view sampler."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class FakeLOCADataset(Dataset):
    """Deterministic random views and targets: reference/query ``size`` px, ``num_focal`` focal crops of ``focal`` px."""

    def __init__(self, length: int = 16, size: int = 64, focal: int = 32, num_focal: int = 2, patch: int = 16) -> None:
        self.length, self.size, self.focal, self.num_focal, self.patch = length, size, focal, num_focal, patch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        cells = (self.size // self.patch) ** 2
        focal_tokens = (self.focal // self.patch) ** 2
        return {
            "reference": torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=g),
            "query_large": torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=g),
            "query_focal": torch.randint(
                0, 256, (self.num_focal, 3, self.focal, self.focal), dtype=torch.uint8, generator=g
            ),
            "target_large": torch.randint(-1, cells, (cells,), generator=g),
            "target_focal": torch.randint(-1, cells, (self.num_focal, focal_tokens), generator=g),
        }


class FakeLOCADataModule(L.LightningDataModule):
    """A user's own DataModule: no loca-lightning data code involved."""

    def __init__(self, batch_size: int = 4, length: int = 16, **kwargs) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.dataset = FakeLOCADataset(length=length, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)


class StopAt(L.Callback):
    """Ask the trainer to stop after optimizer step ``step`` (a pre-emption the run survives)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True
