"""Sequence parallelism for LatteT2V: the N ranks of a group split one sample's tokens.

Scheme (Dynamic Sequence Parallel, arXiv 2403.10266): LatteT2V alternates spatial blocks (attention
within each frame) and temporal blocks (attention across frames at one patch position). Spatial blocks
therefore run on a shard of the *frames* and temporal blocks on a shard of the *patch positions*; each
switch is one ``all_to_all_single`` of the activations, and no attention ever needs another rank's
tokens. Per layer that is two all-to-alls of ``B*F*N*D/N_sp`` elements per rank, against four per
block pair for Ulysses head splitting (before and after every attention), and it needs no head count
divisible by the group size. Frame and position counts that do not divide by the group size are split
unevenly (17 frames on 2 ranks: 9 + 8): ``all_to_all_single`` takes per-rank split sizes, so there is no
padding to mask.

Gradient convention: every rank of a group receives the same inputs (latents, timesteps, noise, captions);
the patch embedding and the conditioning run replicated, then each rank keeps its frames. The model output
is gathered (:class:`_GatherFrames`, backward = this rank's slice of the incoming gradient), so every rank
returns the full output and computes the same loss. Each rank's backward then covers exactly its share of
the tokens: the parameter gradients are *partial*, and their sum over the group is the single-process
gradient. :func:`reduce_sequence_parallel_grads` does that sum; under DDP over all ``dp x sp`` ranks
(which averages), multiplying the loss by the group size gives the same result (what the trainer does).

Public API: :class:`SequenceParallel` (attach with :func:`enable_sequence_parallel`),
:func:`init_sequence_parallel` (groups of ``sp_size`` consecutive ranks), :func:`reduce_sequence_parallel_grads`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor


def split_sizes(total: int, parts: int) -> list[int]:
    """Near-even split of ``total`` items over ``parts`` ranks, larger shares first (17, 2 -> [9, 8])."""
    base, extra = divmod(total, parts)
    return [base + (r < extra) for r in range(parts)]


class _GatherFrames(torch.autograd.Function):
    """All-gather of per-rank frame shards along dim 1 (uneven sizes); backward keeps this rank's slice.

    The slice backward is right because the gathered tensor feeds computations replicated on every rank
    of the group (same loss everywhere), so each rank's incoming gradient is the same full gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        pad = longest - x.shape[1]
        padded = torch.nn.functional.pad(x, (0, 0) * (x.ndim - 2) + (0, pad)) if pad else x.contiguous()
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded, group=group)
        return torch.cat([c[:, :n] for c, n in zip(chunks, sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = sum(ctx.sizes[: ctx.rank])
        return grad[:, start : start + ctx.sizes[ctx.rank]].contiguous(), None, None, None


class SequenceParallel:
    """Token layout switches for one sequence-parallel process group (all of it collective).

    ``group``: a ``torch.distributed`` process group whose ranks split every sample (None = the default
    group). Methods take and return LatteT2V's layouts (B = batch, F = frames, N = patches per frame,
    D = width; F_r, N_r = this rank's share from :func:`split_sizes`).
    """

    def __init__(self, group=None):
        if not dist.is_initialized():
            raise RuntimeError("Sequence parallelism needs torch.distributed initialised (launch with torchrun).")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.frames = self.positions = 0  # F and N of the current forward (set by shard_frames)

    def check_sizes(self, frames: int, positions: int) -> None:
        """Every rank needs at least one frame and one patch position (ValueError otherwise)."""
        if frames < self.size or positions < self.size:
            raise ValueError(f"Sequence parallel size {self.size} needs at least {self.size} frames and patch "
                             f"positions per sample; got {frames} frames x {positions} positions. Use a smaller "
                             "--sp_size.")

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous share of ``x`` along ``dim`` (a view; its gradient stays local)."""
        sizes = split_sizes(x.shape[dim], self.size)
        return x.narrow(dim, sum(sizes[: self.rank]), sizes[self.rank])

    def shard_frames(self, x: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor | None):
        """(B, F, N, D) -> (B, F_r, N, D); per-frame captions (G = B*F rows) are sharded alike.

        Records F and N for the layout switches and the gather of this forward (ValueError when the
        group is larger than F or N).
        """
        batch, frames, positions = x.shape[:3]
        self.check_sizes(frames, positions)
        self.frames, self.positions = frames, positions
        if context.shape[0] == batch * frames and frames > 1:
            context = self.shard(context.unflatten(0, (batch, frames)), 1).flatten(0, 1)
            if context_bias is not None:
                context_bias = self.shard(context_bias.unflatten(0, (batch, frames)), 1).flatten(0, 1)
        return self.shard(x, 1), context, context_bias

    def frames_to_positions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F_r, N, D) frame shard -> (B, N_r, F, D) position shard (one all-to-all)."""
        batch, local_frames, positions, dim = x.shape
        frames = self.frames
        frame_sizes, pos_sizes = split_sizes(frames, self.size), split_sizes(positions, self.size)
        send = x.permute(2, 1, 0, 3).reshape(positions * local_frames, batch, dim)  # rows (n, f): rank j gets its n
        recv = self._all_to_all(send, [n * local_frames for n in pos_sizes],
                                [pos_sizes[self.rank] * f for f in frame_sizes])
        n_local = pos_sizes[self.rank]
        parts = [p.view(n_local, f, batch, dim) for p, f in zip(recv.split([n_local * f for f in frame_sizes]),
                                                                frame_sizes)]
        return torch.cat(parts, dim=1).permute(2, 0, 1, 3).contiguous()  # (B, N_r, F, D)

    def positions_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N_r, F, D) position shard -> (B, F_r, N, D) frame shard (one all-to-all)."""
        batch, local_pos, frames, dim = x.shape
        positions = self.positions
        frame_sizes, pos_sizes = split_sizes(frames, self.size), split_sizes(positions, self.size)
        send = x.permute(2, 1, 0, 3).reshape(frames * local_pos, batch, dim)  # rows (f, n): rank j gets its f
        recv = self._all_to_all(send, [f * local_pos for f in frame_sizes],
                                [frame_sizes[self.rank] * n for n in pos_sizes])
        f_local = frame_sizes[self.rank]
        parts = [p.view(f_local, n, batch, dim) for p, n in zip(recv.split([f_local * n for n in pos_sizes]),
                                                                pos_sizes)]
        return torch.cat(parts, dim=1).permute(2, 0, 1, 3).contiguous()  # (B, F_r, N, D)

    def gather_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F_r, ...) -> (B, F, ...) on every rank (backward: this rank's slice, see the module doc)."""
        return _GatherFrames.apply(x, split_sizes(self.frames, self.size), self.rank, self.group)

    def _all_to_all(self, send: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
        # The differentiable functional collective (what torch.distributed.nn.functional now points to):
        # its backward is the reverse all-to-all.
        group = self.group if self.group is not None else dist.group.WORLD
        return wait_tensor(all_to_all_single_autograd(send.contiguous(), recv_rows, send_rows, group))


def enable_sequence_parallel(model: torch.nn.Module, group=None) -> SequenceParallel | None:
    """Make ``model`` (a LatteT2V) split its tokens over ``group``; a group of one rank turns it off.

    Every rank of the group must then call the model with the same inputs; see the module docstring for
    the gradient convention. Returns the attached :class:`SequenceParallel` (or None).
    """
    sp = SequenceParallel(group)
    model.sequence_parallel = sp if sp.size > 1 else None
    return model.sequence_parallel


def init_sequence_parallel(sp_size: int) -> tuple[object | None, int, int]:
    """Split the default group into groups of ``sp_size`` consecutive ranks (a node's GPUs stay together).

    Returns ``(this rank's sp group or None when sp_size is 1, dp_rank, dp_size)``. Collective: every rank
    must call it with the same ``sp_size``. Raises ValueError when the world size is not a multiple.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"--sp_size {sp_size} must be at least 1 and divide the number of processes ({world}); "
                         "launch dp x sp processes.")
    if sp_size == 1:
        return None, rank, world
    mine = None
    for start in range(0, world, sp_size):
        group = dist.new_group(list(range(start, start + sp_size)))  # every rank creates every group
        if start <= rank < start + sp_size:
            mine = group
    return mine, rank // sp_size, world // sp_size


def init_parallel_groups(sp_size: int, cfg_size: int = 1) -> dict:
    """Process groups for sampling with ``world = dp x cfg x sp`` (collective: every rank, same arguments).

    Rank ``r = (d * cfg_size + c) * sp_size + s``: the ``sp_size`` consecutive ranks with the same (d, c)
    split each video's tokens; the ``cfg_size`` ranks with the same (d, s) split the batch (with
    classifier-free guidance: the unconditional half and the conditional half); d indexes the prompt
    shards. Returns ``{"sp": group | None, "cfg": group | None, "dp_rank", "dp_size", "writer"}`` where
    ``writer`` is True on the rank (c = 0, s = 0) that writes a video. ValueError when the world size is
    not a multiple of ``sp_size * cfg_size``.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    block = sp_size * cfg_size
    if sp_size < 1 or cfg_size < 1 or world % block:
        raise ValueError(f"--sp_size {sp_size} x cfg {cfg_size} = {block} must divide the number of processes "
                         f"({world}); launch a multiple of {block} processes.")
    sp_group, _, _ = init_sequence_parallel(sp_size)
    cfg_group = None
    if cfg_size > 1:
        for d in range(world // block):
            for s in range(sp_size):
                members = [(d * cfg_size + c) * sp_size + s for c in range(cfg_size)]
                group = dist.new_group(members)  # every rank creates every group, in the same order
                if rank in members:
                    cfg_group = group
    c = rank // sp_size % cfg_size
    return {"sp": sp_group, "cfg": cfg_group, "dp_rank": rank // block, "dp_size": world // block,
            "writer": rank % block == 0 and c == 0}


def enable_batch_parallel(model: torch.nn.Module, group) -> None:
    """Split every forward's batch over ``group`` (inference only): rank c runs rows [c*B/G, (c+1)*B/G) and
    the outputs are all-gathered, so each rank returns the full (B, ...) result.

    For classifier-free guidance the sampling batch is [unconditional; conditional], so 2 ranks each run one
    half (``sample --cfg_parallel``). Batches that do not divide by the group size run whole on every rank.
    Works with the model's ``return_dict`` outputs (``.sample``) and tuples.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    inner = model.forward

    def forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None, **kwargs):
        batch = hidden_states.shape[0]
        if batch % size or torch.is_grad_enabled():
            return inner(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, **kwargs)
        part = batch // size
        rows = slice(rank * part, (rank + 1) * part)
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(batch)[rows]
        mask = None if encoder_attention_mask is None else encoder_attention_mask[rows]
        out = inner(hidden_states[rows], timestep, encoder_hidden_states[rows], mask, **kwargs)
        sample = out.sample if hasattr(out, "sample") else out[0]
        chunks = [torch.empty_like(sample) for _ in range(size)]
        dist.all_gather(chunks, sample.contiguous(), group=group)
        full = torch.cat(chunks)
        if hasattr(out, "sample"):
            out.sample = full
            return out
        return (full,)

    model.forward = forward


def reduce_sequence_parallel_grads(model: torch.nn.Module, group=None) -> None:
    """Sum every parameter gradient over the sequence-parallel group (without DDP; see the module doc)."""
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
