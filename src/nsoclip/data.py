"""Training and validation data: the synthetic and csv sources, and the dispatch to webdataset.

Every source returns a `DataInfo`. The training loop relies on two promises from it: every rank
gets exactly `num_batches` batches per epoch (DDP needs equal counts), and
`set_position(epoch, start_batch)` makes the next iteration resume an epoch mid-way exactly where
an uninterrupted run would be.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional


@dataclass
class DataInfo:
    dataloader: Iterable
    num_batches: int
    num_samples: int
    set_position: Callable[[int, int], None] = field(default=lambda epoch, start_batch: None)
    bad_sample_counts: Optional[Callable[[], Dict[str, int]]] = None
