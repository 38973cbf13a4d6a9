"""Data-parallel training under torchrun: gloo on CPU, NCCL on CUDA.

`torchrun --nproc-per-node N -m pipeline.cli train SPEC` (or its shorthand `archlab train SPEC --nproc N`)
starts N ranks. Every rank draws the same permutation and so the same global batch; each takes its own shard
of it. Its loss is scaled by its share of the batch (n_rank × N / n_batch), so that averaging the ranks'
gradients gives exactly the gradient of the global batch's mean loss: the batch size, the learning rate and its
schedule mean what they mean on one process. Gradients are averaged with one all-reduce per phase after
backward: what DistributedDataParallel does, without its bucketed overlap, because a task's phases (a GAN's
discriminator and generator, a VAE's encoder) call submodules that DDP's forward hook would not see. Summed
statistics are all-reduced once per epoch; the epoch's row is rank 0's, sent to every rank, so all ranks take
the same decisions (early stopping, divergence). Only rank 0 writes files and talks to MLflow; a resume loads
rank 0's checkpoint on every rank.

Losses that average over tokens rather than samples (seq2seq, language models) are weighted by samples here,
so on several ranks they are close to, not exactly, the one-process gradient. Augmentation is drawn on the
global batch before it is sharded; dropout masks are drawn per rank, so they differ from one process's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from models.contract import Stats


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own: the one that writes and reports."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks; one process alone is rank 0 of 1 and every method is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's contiguous part of a global batch, and the weight that makes its loss a share of the
        global mean. A rank left without samples (a last batch smaller than the world) trains on one sample with
        weight 0: it must still join the all-reduce."""
        if not self.active:
            return x, y, 1.0
        lo, hi = self._bounds(len(x))
        if hi == lo:
            return x[:1], y[:1], 0.0
        return x[lo:hi], y[lo:hi], (hi - lo) * self.world / len(x)

    def part(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's contiguous part of a whole split; None alone or when some rank would get nothing."""
        if not self.active or len(x) < self.world:
            return None
        lo, hi = self._bounds(len(x))
        return x[lo:hi], y[lo:hi]

    def _bounds(self, n: int) -> tuple[int, int]:
        """Rows [lo, hi) of n for this rank: near-equal contiguous parts in rank order."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Every rank ends with the mean of the ranks' gradients (one flat all-reduce)."""
        if not self.active:
            return
        import torch.distributed as dist
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum_stats(self, stats: Stats) -> Stats:
        """Each statistic summed over the ranks (they are sums over samples, so the total is the whole split's)."""
        if not self.active or not stats:
            return stats
        import torch.distributed as dist
        keys = sorted(stats)
        flat = torch.cat([stats[k].reshape(-1).to(torch.float64) for k in keys])
        dist.all_reduce(flat)
        out, offset = {}, 0
        for k in keys:
            n = stats[k].numel()
            out[k] = flat[offset:offset + n].view_as(stats[k]).to(stats[k].dtype)
            offset += n
        return out

    @staticmethod
    def weigh(loss: torch.Tensor, stats: Stats, weight: float) -> tuple[torch.Tensor, Stats]:
        """A shard's loss scaled to its share of the global batch; a placeholder shard (weight 0) counts nothing."""
        if weight == 1.0:
            return loss, stats
        return loss * weight, stats if weight else {k: v * 0 for k, v in stats.items()}

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank, as DDP's broadcast_buffers does."""
        if not self.active:
            return
        import torch.distributed as dist
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def gather(self, obj) -> list:
        """Every rank's object, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj):
        """Rank 0's object on every rank (a checkpoint, an epoch's row)."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start(device: str) -> tuple[Ranks, torch.device | None]:
    """Join the process group torchrun set up (once per process) → this rank, and its CUDA device when it
    trains on one (None: the spec's own device choice)."""
    if not launched_by_torchrun():
        return Ranks(), None
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))  # ranks share the cores (torchrun: 1)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Ranks(rank, world, local), torch.device("cuda", local) if cuda else None


def stop() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def add_rank_figures(cost: dict, ranks: Ranks, train_times: list[float], peak_memory_mb: list[float]) -> dict:
    """Cost of a data-parallel run: throughput in total and per rank, each rank's training time (a straggler
    shows) and peak memory (peak_memory_mb stays rank 0's; the total is their sum), MFU against the peak of all
    ranks."""
    total = cost.get("train_samples_per_s")
    out = {**cost, "world_size": ranks.world,
           "train_samples_per_s_per_rank": total / ranks.world if total else None,
           "train_time_s_per_rank": [round(t, 3) for t in train_times],
           "peak_memory_mb_per_rank": [round(m, 1) for m in peak_memory_mb],
           "peak_memory_mb_total": round(sum(peak_memory_mb), 1)}
    if cost.get("mfu") is not None:
        out["mfu"] = cost["mfu"] / ranks.world
    return out
