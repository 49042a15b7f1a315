"""Training on several processes (torchrun): the process group, which rows of a batch this
rank computes, and the few collectives the loop and the methods need.

One process (no WORLD_SIZE, or WORLD_SIZE=1) runs the same code: `context()` is then rank 0 of
1, every shard is the whole batch and every collective returns its input, so a single-process
run does exactly what it did before.

Why the loop all-reduces gradients itself instead of wrapping the model in
`DistributedDataParallel`: DDP synchronises through the wrapped module's `forward()`, and the
methods never call one: SFT calls `item_embeddings`/`user_embeddings`/`users_from_memory`, RoDPO
runs the policy and then the reference (adapters off) in one step, and parameters go unused
from one step to the next (the decoder without summaries, frozen parts). One flattened
all-reduce of the loop's parameters after the backward pass does what DDP's buckets do, without
those constraints.

Batch semantics: `--batch-size` stays the GLOBAL micro-batch. Every rank draws the same
micro-batch (methods make batches a pure function of the step) and computes its contiguous
share of the rows; the loop weights each rank's mean loss by its share of the rows, so the
averaged gradient is the gradient of the whole batch's mean loss, as in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# A rank waits in the next collective while rank 0 evaluates or saves: allow long dev evaluations
# (NCCL's own default is 10 minutes).
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("EMBSUM_DIST_TIMEOUT_MIN", "60")))
BUCKET_ELEMENTS = 1 << 24  # gradients flattened per all-reduce (64 MiB in fp32)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(setting: str) -> str:
    """The device setting this rank trains with: under torchrun with CUDA, 'auto'/'cuda' become
    cuda:LOCAL_RANK (one GPU per process); anything else is kept."""
    if env_world_size() > 1 and setting in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return setting


def init(device_setting: str = "auto") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl for CUDA, gloo on CPU.
    Returns whether this call created it (whoever did destroys it)."""
    import torch.distributed as dist

    if env_world_size() <= 1 or dist.is_initialized():
        return False
    device = torch.device(rank_device(device_setting))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return True


@contextlib.contextmanager
def session(device_setting: str = "auto") -> Iterator[Context]:
    """The process group for the length of a command (created and destroyed here when torchrun
    started this process; nothing to do in a single process)."""
    import torch.distributed as dist

    created = init(device_setting)
    try:
        yield context()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def context() -> Context:
    """This process's place in the process group (rank 0 of 1 without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    return Context()


class BatchShard(list):
    """This rank's rows of a micro-batch (a list, so a method may treat it as its batch), with
    the micro-batch every rank drew (`whole`) and where the rows start in it. Methods whose loss
    couples the rows (in-batch negatives, a shared sampler) read `whole`."""

    def __init__(self, whole: Sequence, start: int, stop: int):
        super().__init__(whole[start:stop])
        self.whole, self.start, self.stop = list(whole), start, stop


def as_shard(batch: Sequence) -> BatchShard:
    """`batch` as a BatchShard: itself when it is one, else the whole batch (a direct call)."""
    return batch if isinstance(batch, BatchShard) else BatchShard(batch, 0, len(batch))


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs, progress and the catalog."""
        return self.rank == 0

    # -- sharding -------------------------------------------------------------------------------
    def sizes(self, n: int) -> list[int]:
        """Rows of each rank when n rows are split in contiguous, near-equal parts."""
        return [(r + 1) * n // self.world - r * n // self.world for r in range(self.world)]

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's part of n rows."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def shard(self, batch: Sequence) -> BatchShard:
        return BatchShard(batch, *self.bounds(len(batch)))

    # -- collectives (identity in one process) --------------------------------------------------------
    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients of `params` over the ranks. A parameter without a gradient on
        every rank keeps none (the optimizer skips it, as in one process); one with a gradient
        on some rank gets zeros where it had none."""
        if self.world == 1:
            return
        import torch.distributed as dist

        device = params[0].device
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        grads = []
        for p, flag in zip(params, has_grad.tolist()):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
            if flag:
                grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(self.world)
            for grad, averaged in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                grad.copy_(averaged)

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average tensors (running statistics) over the ranks, in place."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)
            t.div_(self.world)

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's values everywhere, in place (every rank starts from the same weights)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def gather_rows(self, tensor: torch.Tensor, sizes: Sequence[int], autograd: bool = False) -> torch.Tensor:
        """Every rank's rows concatenated in rank order; `sizes[r]`: rank r's row count (every
        rank knows them). With `autograd`, gradients flow back to the rank that owns each row."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist
        import torch.distributed.nn.functional as dist_autograd

        longest = max(sizes)
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad]) if pad.shape[0] else tensor.contiguous()
        if autograd:
            with warnings.catch_warnings():  # deprecated for a private successor: keep the public one
                warnings.simplefilter("ignore", FutureWarning)
                parts = dist_autograd.all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _buckets(tensors: Sequence[torch.Tensor], limit: int = BUCKET_ELEMENTS) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-dtype tensors of up to `limit` elements (one all-reduce each)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() > limit or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def combine_stats(per_rank: Sequence[Sequence[tuple[float, dict]]]) -> list[dict]:
    """Per micro-batch, the whole batch's stats from every rank's (share of the rows, stats):
    the share-weighted sum of each stat over the ranks that report it (a rank's stat is the mean
    over its rows, so this is the mean over the whole micro-batch)."""
    combined = []
    for micro in zip(*per_rank):
        keys = list(dict.fromkeys(k for _, stats in micro for k in stats))
        combined.append({k: sum(share * stats[k] for share, stats in micro if k in stats) for k in keys})
    return combined
