"""The rehearsal buffer of DER++: reservoir sampling over every example seen, storing the input,
its label, the logits the model gave it when it was seen, and its task."""
from __future__ import annotations

import torch


class ReservoirBuffer:
    def __init__(self, capacity: int, example_shape: tuple[int, ...], num_classes: int, seed: int = 0):
        self.capacity = int(capacity)
        self.seen = 0
        self.x = torch.zeros((self.capacity, *example_shape))
        self.y = torch.zeros(self.capacity, dtype=torch.long)
        self.logits = torch.zeros(self.capacity, num_classes)
        self.task = torch.zeros(self.capacity, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, task: int) -> None:
        """Reservoir sampling: after n examples every one of them is stored with probability capacity/n."""
        if self.capacity == 0:
            self.seen += len(x)
            return
        x, y, logits = x.detach(), y.detach(), logits.detach()
        draws = torch.randint(0, 1 << 62, (len(x),), generator=self.generator)
        for i in range(len(x)):
            if self.seen < self.capacity:
                slot = self.seen
            else:
                slot = int(draws[i] % (self.seen + 1))
            if slot < self.capacity:
                self.x[slot], self.y[slot], self.logits[slot], self.task[slot] = x[i], y[i], logits[i], task
            self.seen += 1

    def sample(self, n: int):
        """n stored examples drawn without replacement (fewer when the buffer holds fewer)."""
        idx = torch.randperm(len(self), generator=self.generator)[:n]
        return self.x[idx], self.y[idx], self.logits[idx]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "x": self.x, "y": self.y, "logits": self.logits,
                "task": self.task, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.seen = state["capacity"], state["seen"]
        self.x, self.y, self.logits, self.task = state["x"], state["y"], state["logits"], state["task"]
        self.generator.set_state(state["generator"])
