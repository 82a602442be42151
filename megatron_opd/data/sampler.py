"""`PromptSampler`: batches of dataset indices in an order fixed by (seed, epoch), with a state small enough
to live in a checkpoint, so a resumed run draws exactly the batches the uninterrupted run would have."""
import numpy as np


class PromptSampler:
    """Each epoch is a permutation drawn from (seed, epoch) alone, so it can be rebuilt on resume without
    replaying earlier epochs. Batches never straddle an epoch: the `num_items % batch_size` prompts left at
    the end of an epoch are skipped (they differ from epoch to epoch when shuffling)."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"data.train_batch_size={batch_size}: must be >= 1")
        if num_items < batch_size:
            raise ValueError(f"the dataset has {num_items} prompts, fewer than data.train_batch_size={batch_size}; "
                             f"lower the batch size or add data")
        self.num_items, self.batch_size, self.seed, self.shuffle = num_items, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_items) if self.shuffle
                           else np.arange(self.num_items))
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> list:
        if self.position + self.batch_size > self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch.tolist()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the order itself must be the checkpoint's, so the keys that define it must
        match (the batch size may change: the position counts prompts, not batches)."""
        for key, current in (("num_items", self.num_items), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state[key] != current:
                raise ValueError(
                    f"sampler state: {key}={state[key]!r} in the checkpoint but {current!r} now, so the resumed run "
                    f"would see different prompts; restore the data files and data.seed/data.shuffle of the run "
                    f"that wrote the checkpoint")
        if not 0 <= state["position"] <= self.num_items or state["epoch"] < 0:
            raise ValueError(f"sampler state: epoch={state['epoch']}, position={state['position']} is out of range "
                             f"for {self.num_items} prompts")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
