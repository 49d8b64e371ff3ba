"""The modality adapter of BLSP (paper 4.1, as in the original code).

Three Conv1d (kernel 5, stride 2, padding 2), each followed by a GLU that halves the channels it
doubled, shorten the encoder output 8 times and map it to the LLM's width; then a Houlsby
bottleneck (Linear -> GELU -> Linear, no biases, residual) and a LayerNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ModalityAdapter(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_sizes: Sequence[int] = (5, 5, 5),
        stride: int = 2,
        bottleneck_dim: int = 512,
    ) -> None:
        super().__init__()
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.stride = stride
        n = len(self.kernel_sizes)
        self.convs = nn.ModuleList(
            nn.Conv1d(
                in_dim,
                2 * in_dim if i < n - 1 else 2 * out_dim,  # GLU halves the channels again
                k,
                stride=stride,
                padding=k // 2,
            )
            for i, k in enumerate(self.kernel_sizes)
        )
        self.fc1 = nn.Linear(out_dim, bottleneck_dim, bias=False)
        self.fc2 = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def output_lengths(self, lengths: torch.Tensor | int) -> torch.Tensor | int:
        """Exact output lengths: each conv maps L to floor((L + 2*(k//2) - k) / stride) + 1."""
        for k in self.kernel_sizes:
            lengths = (lengths + 2 * (k // 2) - k) // self.stride + 1
        return lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, T, in_dim]`` with valid ``lengths [N]`` -> ``([N, T', out_dim], lengths')``.

        Padded positions are zeroed before every convolution, so a clip gives the same output
        alone or inside a padded batch.
        """
        x = x.transpose(1, 2)
        for conv, k in zip(self.convs, self.kernel_sizes, strict=True):
            x = x * (torch.arange(x.shape[-1], device=x.device) < lengths[:, None])[:, None]
            x = nn.functional.glu(conv(x), dim=1)
            lengths = (lengths + 2 * (k // 2) - k) // self.stride + 1
        x = x.transpose(1, 2)
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.norm(x), lengths
