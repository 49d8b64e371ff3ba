"""The frozen Whisper encoder on variable-length input.

Whisper was trained on 30 s windows and the ``transformers`` encoder insists on 3000 mel frames.
Here each clip is featurised on its own (no padding to 30 s), a batch is padded only to its
longest clip, and the padding is kept out of every computation: zeroed before each convolution
and masked out of self-attention. A clip's frames encoded inside a padded batch therefore equal
its encoding alone. Clips longer than 30 s are cut into 30 s windows that are encoded and joined,
never truncated.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from blsp.errors import AudioError


class SpeechEncoder(nn.Module):
    """Wraps a ``transformers`` ``WhisperEncoder`` and its feature extractor."""

    def __init__(self, whisper_encoder: nn.Module, feature_extractor) -> None:
        super().__init__()
        self.whisper = whisper_encoder
        self.feature_extractor = feature_extractor
        self.hidden_size: int = whisper_encoder.config.d_model
        self.num_mel_bins: int = whisper_encoder.config.num_mel_bins
        # 1500 positions after the stride-2 conv: 3000 mel frames = 30 s.
        self.window_frames: int = whisper_encoder.config.max_source_positions * 2
        self.sampling_rate: int = feature_extractor.sampling_rate

    # ----------------------------------------------------------------- features
    def features(self, audio: np.ndarray) -> torch.Tensor:
        """Log-mel features ``[num_mel_bins, frames]`` of one clip (16 kHz float32), unpadded."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise AudioError(f"expected mono audio (1-D array), got shape {tuple(audio.shape)}")
        if audio.size < self.feature_extractor.hop_length:
            raise AudioError(
                f"audio has {audio.size} samples: too short to encode (need at least "
                f"{self.feature_extractor.hop_length} samples at {self.sampling_rate} Hz)"
            )
        if not np.isfinite(audio).all():
            raise AudioError("audio contains NaN or infinite samples")
        out = self.feature_extractor(
            audio,
            sampling_rate=self.sampling_rate,
            padding="longest",
            truncation=False,
            return_tensors="pt",
        )
        return out.input_features[0]

    def output_length(self, frames: int) -> int:
        """Encoder frames for ``frames`` mel frames (per 30 s window, each conv2 halves, rounding up)."""
        full, rest = divmod(int(frames), self.window_frames)
        return full * (self.window_frames // 2) + (rest + 1) // 2

    # ----------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``features [N, mel, T]`` with valid ``lengths [N]`` frames.

        Returns ``(hidden [N, T', D], out_lengths [N])``; positions past a clip's length are zero.
        """
        lengths = lengths.tolist() if torch.is_tensor(lengths) else list(lengths)
        # Cut every clip into <= 30 s windows and encode all windows as one padded batch.
        windows, owners = [], []
        for i, n in enumerate(lengths):
            for start in range(0, n, self.window_frames):
                stop = min(start + self.window_frames, n)
                windows.append((i, start, stop))
                owners.append(i)
        w_len = torch.tensor([stop - start for _, start, stop in windows], device=features.device)
        t_max = int(w_len.max())
        x = features.new_zeros(len(windows), features.shape[1], t_max)
        for j, (i, start, stop) in enumerate(windows):
            x[j, :, : stop - start] = features[i, :, start:stop]
        hidden, h_len = self._encode_windows(x, w_len)
        # Join each clip's windows back together.
        out_lengths = [
            sum(int(h_len[j]) for j, o in enumerate(owners) if o == i) for i in range(len(lengths))
        ]
        out = hidden.new_zeros(len(lengths), max(out_lengths), hidden.shape[-1])
        cursor = [0] * len(lengths)
        for j, i in enumerate(owners):
            n = int(h_len[j])
            out[i, cursor[i] : cursor[i] + n] = hidden[j, :n]
            cursor[i] += n
        return out, torch.tensor(out_lengths, device=features.device)

    def _encode_windows(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.whisper
        x = x.to(enc.conv1.weight.dtype)
        mask = _length_mask(lengths, x.shape[-1])  # [B, T]
        x = nn.functional.gelu(enc.conv1(x * mask[:, None]))
        x = nn.functional.gelu(enc.conv2(x * mask[:, None]))
        out_lengths = (lengths + 1) // 2
        t = x.shape[-1]
        x = x.permute(0, 2, 1) + enc.embed_positions.weight[:t]
        key_mask = _length_mask(out_lengths, t)
        attn = torch.zeros(key_mask.shape, dtype=x.dtype, device=x.device)
        attn = attn.masked_fill(~key_mask, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in enc.layers:
            x = layer(x, attn)
            if isinstance(x, tuple):  # older transformers return (hidden_states, ...)
                x = x[0]
        x = enc.layer_norm(x)
        return x * key_mask[..., None], out_lengths


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]
