"""P²OT's training signal: swapped-prediction loss on OT pseudo-labels, and the FIFO memory bank they are solved on.

Zhang et al., ICLR 2024, official code rhfeiyang/PPOT@bd6721c4b5f6581ae5cd896eba9cc9250c769997 (PPOT below):
losses/losses.py:51-88 (loss and bank protocol), utils/memory.py:99-154 (`LogitsMemory`), train.py:176-178 and
188-257 (bank initialisation, label-free model selection). The SP²OT variant
(rhfeiyang/SPPOT@788a7a4670cc6c3205566cfda4d7fa502343daa8) also stores the dataset index of every bank row, to look
up the k-NN similarity of the bank.

Per head and step, with views z^(0), z^(1) of a batch (PPOT losses/losses.py:51-88, bank rows sliced at 68-69):

1. enqueue z^(0) (detached) and solve the OT on the whole bank; the batch's rows are the view-0 targets q^(0);
2. overwrite the same slots with z^(1), solve again; the batch's rows are the view-1 targets q^(1);
3. L = sum over ordered view pairs (a, b), a != b, of mean_i [ -sum_j q^(b)_ij log softmax(z^(a)_i)_j ].

Targets are N * Q rows: not renormalised, without gradient; a sample the OT leaves mostly in the virtual cluster
has a near-zero target and so almost no loss (soft selection, no threshold). Head losses are summed by the caller.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ot import P2OTSolver
from .sp2ot import KNNGraph, SP2OTSolver

__all__ = ['swapped_prediction_loss', 'SwappedPredictionLoss', 'MemoryBank', 'pseudo_labels', 'selection_score']


def swapped_prediction_loss(view_logits: Sequence[torch.Tensor], view_targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over ordered view pairs (a, b), a != b, of the soft cross-entropy of z^(a) against q^(b).

    The cross-entropy is the batch mean of -sum_j q_ij log softmax(z_i)_j (PyTorch's `cross_entropy` with
    probability targets, as PPOT's `CrossEntropyLoss`), computed in float32 whatever the logits' dtype.

    Args:
        view_logits: V >= 2 tensors (B, K) of one head's logits, one per view.
        view_targets: V tensors (B, K) of OT targets for the same views (detached here).

    Returns:
        Scalar loss.
    """
    if len(view_logits) != len(view_targets) or len(view_logits) < 2:
        raise ValueError(f'need the same number (>= 2) of logits and targets, got {len(view_logits)} and '
                         f'{len(view_targets)}')
    loss = view_logits[0].new_zeros((), dtype=torch.float32)
    for a, za in enumerate(view_logits):
        for b, qb in enumerate(view_targets):
            if a != b:
                loss = loss + F.cross_entropy(za.float(), qb.detach().float())
    return loss


class SwappedPredictionLoss(nn.Module):
    """Module form of `swapped_prediction_loss` (one head)."""

    def forward(self, view_logits: Sequence[torch.Tensor], view_targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return swapped_prediction_loss(view_logits, view_targets)


class MemoryBank(nn.Module):
    """Fixed-size FIFO ring of detached rows (logits or features) with their dataset indices.

    PPOT keeps one per head holding 10 x batch = 5120 logits (utils/memory.py:99-154), filled before training from
    the first 10 training batches (view 0, eval mode) and used from epoch 1 on. Rows and indices are buffers, so the
    bank moves with `.to()` and is saved in `state_dict()` (an exact resume needs it). Until the ring is full,
    `values()` holds only the rows written so far.

    Args:
        size: number of rows.
        dim: row width (K for logits).
        dtype: storage dtype (float32; lower-precision inputs are upcast).
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f'size and dim must be >= 1, got {size}, {dim}')
        self.size, self.dim = int(size), int(dim)
        self.register_buffer('memory', torch.zeros(self.size, self.dim, dtype=dtype))
        self.register_buffer('ids', torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer('ptr', torch.zeros((), dtype=torch.long))
        self.register_buffer('count', torch.zeros((), dtype=torch.long))

    @property
    def is_full(self) -> bool:
        return int(self.count) == self.size

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the bank."""
        self.memory.zero_()
        self.ids.fill_(-1)
        self.ptr.zero_()
        self.count.zero_()

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Write B rows at the head of the ring, overwriting the oldest ones.

        Args:
            x: (B, dim) rows, B <= size.
            ids: (B,) dataset indices, or None (stored as -1).

        Returns:
            (B,) long slots written, in order (wrapping around the end of the ring).
        """
        n = x.shape[0]
        if n > self.size:
            raise ValueError(f'cannot enqueue {n} rows into a bank of {self.size}')
        start = int(self.ptr)
        slots = (torch.arange(n, device=self.memory.device) + start) % self.size
        self.write(slots, x, ids)
        self.ptr.fill_((start + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))
        return slots

    @torch.no_grad()
    def write(self, slots: torch.Tensor, x: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Overwrite the given slots (e.g. view 1 into the slots of view 0) without moving the ring.

        Args:
            slots: (B,) long slots, as returned by `enqueue`.
            x: (B, dim) rows.
            ids: (B,) dataset indices, or None (stored as -1).
        """
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] != slots.numel():
            raise ValueError(f'expected ({slots.numel()}, {self.dim}) rows, got {tuple(x.shape)}')
        slots = slots.to(self.memory.device)
        self.memory[slots] = x.detach().to(device=self.memory.device, dtype=self.memory.dtype)
        if ids is None:
            self.ids[slots] = -1
        else:
            self.ids[slots] = torch.as_tensor(ids, dtype=torch.long).to(self.memory.device)

    def values(self) -> torch.Tensor:
        """(n, dim) rows written so far (the whole ring once full); row i is slot i."""
        return self.memory[:int(self.count)]

    def filled_ids(self) -> torch.Tensor:
        """(n,) dataset indices of `values()` (-1 where none was given)."""
        return self.ids[:int(self.count)]


Solver = P2OTSolver | SP2OTSolver


@torch.no_grad()
def pseudo_labels(
        solver: Solver,
        view_logits: Sequence[torch.Tensor],
        rho: float,
        bank: MemoryBank | None = None,
        ids: torch.Tensor | None = None,
        graph: KNNGraph | None = None,
) -> list[torch.Tensor]:
    """OT targets of every view of a batch for one head, on the batch alone or through the memory bank.

    Without a bank (PPOT's epoch 0) each view is solved on its own batch. With one, view 0 is enqueued and the
    following views overwrite its slots, each solve covering the whole bank (module docstring). An `SP2OTSolver`
    needs `graph` and the batch's dataset `ids`; its similarity is the graph restricted to the solved rows.

    Args:
        solver: a `P2OTSolver` or `SP2OTSolver` for this head (keeps its warm start).
        view_logits: V tensors (B, K), one per view.
        rho: transported mass of this step (`rho_schedule`).
        bank: this head's `MemoryBank`, or None.
        ids: (B,) dataset indices of the batch (required with a graph; stored in the bank).
        graph: the training set's `KNNGraph` (SP²OT only).

    Returns:
        V tensors (B, K) float32 of targets N * Q (N: rows solved), detached, on the logits' device.
    """
    needs_graph = isinstance(solver, SP2OTSolver)
    if needs_graph and (graph is None or ids is None):
        raise ValueError('SP2OTSolver needs the k-NN graph and the batch dataset ids')
    if not needs_graph and graph is not None:
        raise ValueError('a graph was given but the solver is not an SP2OTSolver')
    out, slots, sim = [], None, None
    for v, z in enumerate(view_logits):
        if bank is None:
            if needs_graph and sim is None:
                sim = graph.subgraph(torch.as_tensor(ids, device=z.device))
            q = solver(z, rho, sim) if needs_graph else solver(z, rho)
        else:
            if v == 0:
                slots = bank.enqueue(z, ids)
            else:
                bank.write(slots, z, ids)
            if needs_graph and sim is None:
                # the bank's ids are the same for every view: the views overwrite the same slots with the same ids
                sim = graph.subgraph(bank.filled_ids())
            mem = bank.values()
            q = solver(mem, rho, sim) if needs_graph else solver(mem, rho)
            q = q[slots]
        out.append(q.to(z.device))
    return out


def selection_score(mean_loss: float, rho: float) -> float:
    """Label-free model selection score of a head: mean epoch loss / rho; lower is better (PPOT train.py:188-257).

    Dividing by rho compares epochs with different transported mass, since the loss scales with it.
    """
    if rho <= 0:
        raise ValueError(f'rho must be > 0, got {rho}')
    return float(mean_loss) / float(rho)
