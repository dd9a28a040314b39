"""Data parallelism for the hand-written loops (PPO, rejection sampling's best-of-N), on torch.distributed.

`torchrun` starts one process per GPU (gloo on CPU, NCCL on GPUs). Every process holds the whole batch's
small tensors (token ids, log-probabilities, values, advantages) and computes the expensive parts
(generation, forward and backward passes) for its share of the rows only; the shares are gathered back, so
that everything computed over a batch (whitening, metrics) is computed over the whole batch, identically in
every process. Gradients of the replicated models are summed: each process's loss is its rows' part of the
whole batch's loss, so that the sum is the one-process gradient.

The Trainer-based stages use the HF Trainer's own DDP (through accelerate); this is for the loops that do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place among the stage's processes."""

    rank: int
    count: int

    @property
    def main(self) -> bool:
        """The process that reports progress, saves checkpoints and publishes."""
        return self.rank == 0

    def share(self, total: int) -> range:
        """This process's contiguous share of `total` rows; the first `total % count` processes take one more."""
        size, extra = divmod(total, self.count)
        start = self.rank * size + min(self.rank, extra)
        return range(start, start + size + (self.rank < extra))

    def gather_objects(self, mine: list[Any]) -> list[Any]:
        """Every process's list, concatenated in rank order (the order of their shares)."""
        if self.count == 1:
            return list(mine)
        everyone: list[list[Any] | None] = [None] * self.count
        dist.all_gather_object(everyone, mine)
        return [item for part in everyone for item in part or []]

    def gather_rows(self, mine: torch.Tensor) -> torch.Tensor:
        """Every process's rows (equal shapes), concatenated in rank order."""
        if self.count == 1:
            return mine
        parts = [torch.empty_like(mine) for _ in range(self.count)]
        dist.all_gather(parts, mine.contiguous())
        return torch.cat(parts)

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the processes."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: dict[str, float]) -> dict[str, float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: dict[str, float], op: dist.ReduceOp) -> dict[str, float]:
        if self.count == 1:
            return dict(values)
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor, op=op)
        return dict(zip(values, tensor.tolist(), strict=True))

    def wait_for_main(self) -> None:
        """Until every process, the main one included (which may be saving to the store), is here."""
        if self.count > 1:
            dist.barrier()

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of the replicated models over the processes, in one flat buffer."""
        if self.count == 1:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _collective_device() -> torch.device:
    """Where collectives' tensors live: the process's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def stage_processes() -> Processes:
    """The stage's processes as `torchrun` started them (one, without it)."""
    return Processes(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def main_process_decides(topic: str, decision: bool, timeout: timedelta) -> bool:
    """The main process's `decision` in every process (each passes its own, only the main one's counts). A
    choice made from what the store holds, such as whether the stage's artifact is there already, must be one
    choice: another run may publish between two processes' reads, and then some would skip the stage while the
    others wait for them at their first collective. Passed through torchrun's key-value store, which exists
    before any process group does (`join_processes` makes it later); the others wait for it up to `timeout`."""
    processes = stage_processes()
    if processes.count == 1:
        return decision
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, is_master=False, timeout=timeout)
    key = f"rlhf/{topic}/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if processes.main:
        store.set(key, str(int(decision)))
        return decision
    return store.get(key) == b"1"


def join_processes(device: torch.device, timeout: timedelta) -> Processes:
    """The stage's processes, their process group joined (the Trainer stages' before accelerate would join it,
    in `trainer.model_shards`), with `timeout`: `deploy.stages.<stage>.collective_timeout_minutes`, how long a
    collective waits for the processes that have not reached it, the main one uploading a checkpoint among them."""
    processes = stage_processes()
    if processes.count > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return processes
