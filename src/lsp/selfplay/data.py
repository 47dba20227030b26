"""The data-free DataModule: self-play needs no dataset, only a step clock."""

from __future__ import annotations

import itertools

import lightning as L
from torch.utils.data import DataLoader, IterableDataset


class StepClock(IterableDataset):
    def __iter__(self):
        return itertools.count()


class SelfPlayData(L.LightningDataModule):
    def train_dataloader(self):
        # batch_size=None: each item (a step index) is one batch; the module samples its own data.
        return DataLoader(StepClock(), batch_size=None, num_workers=0)
