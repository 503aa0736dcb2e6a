"""Sparse count input for the first layer of an encoder.

Count minibatches are mostly zeros; a linear layer over them needs only the nonzeros. The weight
is stored ``(n_in, n_out)`` so that each nonzero reads one contiguous row of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import _native


@dataclass(frozen=True)
class SparseRows:
    """A ``(n_rows, n_cols)`` matrix in CSR form.

    Attributes
    ----------
    row_ptr
        ``(n_rows + 1,)`` int64; row ``b``'s entries are ``row_ptr[b]:row_ptr[b + 1]``.
    cols
        ``(nnz,)`` int64 column of each entry.
    values
        ``(nnz,)`` float values.
    n_cols
        Width of the matrix.
    """

    row_ptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    n_cols: int

    @classmethod
    def from_coordinates(
        cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int, n_cols: int
    ) -> SparseRows:
        """From coordinates sorted by row (as the loaders yield them)."""
        counts = torch.bincount(rows, minlength=n_rows)
        row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(counts, 0, out=row_ptr[1:])
        return cls(row_ptr, cols, values, n_cols)

    @property
    def n_rows(self) -> int:
        return self.row_ptr.numel() - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    def rows(self) -> torch.Tensor:
        """``(nnz,)`` row of each entry."""
        lengths = self.row_ptr[1:] - self.row_ptr[:-1]
        return torch.repeat_interleave(torch.arange(self.n_rows, device=lengths.device), lengths)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[self.rows(), self.cols] = self.values
        return dense


class _NativeSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, row_ptr, cols, values, weight, bias):
        n_rows, n_out = row_ptr.numel() - 1, weight.shape[1]
        out = torch.empty(n_rows, n_out, dtype=weight.dtype)
        threads = torch.get_num_threads()
        kernel.sparse_linear_forward(
            n_rows,
            n_out,
            row_ptr.data_ptr(),
            cols.data_ptr(),
            values.data_ptr(),
            weight.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            threads,
        )
        ctx.kernel, ctx.threads = kernel, threads
        ctx.has_bias = bias is not None
        ctx.save_for_backward(row_ptr, cols, values)
        ctx.weight_shape = weight.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        row_ptr, cols, values = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[4]:
            grad_weight = torch.empty(ctx.weight_shape, dtype=grad_out.dtype)
            ctx.kernel.sparse_linear_backward_weight(
                row_ptr.numel() - 1,
                ctx.weight_shape[0],
                ctx.weight_shape[1],
                row_ptr.data_ptr(),
                cols.data_ptr(),
                values.data_ptr(),
                grad_out.data_ptr(),
                grad_weight.data_ptr(),
                ctx.threads,
            )
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad_out.sum(0)
        return None, None, None, None, grad_weight, grad_bias


class SparseLinear(nn.Module):
    """``x @ weight + bias`` for ``x`` a :class:`SparseRows` (or a dense ``(B, n_in)`` tensor).

    Costs ``nnz * n_out`` multiply-adds in the native kernel of :mod:`sclatent._native` (CPU,
    float32); elsewhere it densifies the minibatch and uses a matmul. Initialised as
    ``torch.nn.Linear``. No gradient flows to the input (it is data).
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        bound = 1.0 / math.sqrt(n_in)
        # nn.Linear's default init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(n_in), 1/sqrt(n_in))
        self.weight = nn.Parameter(torch.empty(n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_out).uniform_(-bound, bound)) if bias else None

    def forward(self, x: SparseRows | torch.Tensor) -> torch.Tensor:
        if isinstance(x, SparseRows):
            kernel = self._kernel(x)
            if kernel is not None:
                # the kernel reads int64 indices: any other integer type would be read out of bounds
                row_ptr, cols = x.row_ptr.to(torch.int64).contiguous(), x.cols.to(torch.int64).contiguous()
                return _NativeSparseLinear.apply(kernel, row_ptr, cols, x.values.contiguous(), self.weight, self.bias)
            x = x.to_dense()
        out = x @ self.weight
        return out + self.bias if self.bias is not None else out

    def _kernel(self, x: SparseRows):
        if x.values.dtype != self.weight.dtype or x.values.device != self.weight.device:
            return None
        return _native.kernels(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, bias={self.bias is not None}"
