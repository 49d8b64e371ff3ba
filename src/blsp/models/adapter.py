"""The modality adapter of BLSP (paper 4.1, as in the original code).

Three Conv1d (kernel 5, stride 2, padding 2), each followed by a GLU that halves the channels it
doubled, shorten the encoder output 8 times and map it to the LLM's width; then a Houlsby
bottleneck (Linear -> GELU -> Linear, no biases, residual) and a LayerNorm.

:class:`EmbeddingCtcHead` scores the adapter's outputs against the frozen LLM's token embeddings:
the CTC head of the alignment warm start (``blsp.models.ctc``), saved with the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
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


class EmbeddingCtcHead(nn.Module):
    """CTC logits ``scale * cos(y, [E[token_ids]; blank])`` against the frozen LLM input embeddings ``E``.

    Trainable: the blank vector and the scale. ``token_ids`` is a saved buffer; ``E`` is the LLM's
    (frozen, not saved with the head).
    """

    def __init__(self, embeddings: nn.Embedding, num_labels: int, token_ids: list[int] | None = None) -> None:
        super().__init__()
        dim = embeddings.embedding_dim
        self.blank = nn.Parameter(torch.randn(dim) * embeddings.weight.detach().float().std())
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        ids = torch.tensor(token_ids if token_ids is not None else [0] * (num_labels - 1), dtype=torch.long)
        if len(ids) != num_labels - 1:
            raise ValueError(f"{len(ids)} token ids for a head of {num_labels} labels (blank included)")
        self.register_buffer("token_ids", ids)
        object.__setattr__(self, "_embeddings", embeddings)  # a reference, not a submodule

    @property
    def weight(self) -> torch.Tensor:  # what ctc_log_probs casts the adapter output to
        return self.blank

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        table = self._embeddings.weight.detach()[self.token_ids].to(y.dtype)
        labels = torch.cat([F.normalize(table, dim=-1), F.normalize(self.blank.to(y.dtype), dim=0)[None]])
        return self.log_scale.exp() * F.normalize(y, dim=-1) @ labels.T
