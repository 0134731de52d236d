"""Small models with known residual Jacobians, shared by the alignment tests."""

import torch
from torch import nn


def orthogonal(n: int, seed: int) -> torch.Tensor:
    """A random ``n x n`` orthogonal matrix (QR of a Gaussian one)."""
    q, r = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q * torch.sign(torch.diagonal(r))


class LinearResidualBlock(nn.Module):
    """``x -> x + A x``: its branch Jacobian is ``A`` everywhere."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.branch = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class LinearResNet(nn.Module):
    """A stack of :class:`LinearResidualBlock` over given matrices, with a linear classifier on top."""

    def __init__(self, matrices: list[torch.Tensor], num_classes: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(LinearResidualBlock(matrix) for matrix in matrices)
        self.head = nn.Linear(matrices[0].shape[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def mlp_block(n: int, hidden: int, seed: int, decay: float | None = None) -> nn.Sequential:
    """``Linear(n, hidden) -> ReLU -> Linear(hidden, n)``; with ``decay`` the weights get singular values
    ``decay ** i`` (a trained-looking, decaying spectrum), else Gaussian ones (flat spectrum)."""
    generator = torch.Generator().manual_seed(seed)
    block = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n))
    with torch.no_grad():
        for layer in (block[0], block[2]):
            out_dim, in_dim = layer.weight.shape
            weight = torch.randn(out_dim, in_dim, generator=generator) / in_dim**0.5
            if decay is not None:
                u, _, vh = torch.linalg.svd(weight, full_matrices=False)
                weight = u @ torch.diag(decay ** torch.arange(u.shape[1], dtype=torch.float32)) @ vh
            layer.weight.copy_(weight)
            layer.bias.copy_(0.1 * torch.randn(out_dim, generator=generator))
    return block
