"""The sinusoidal positional encoding added to a frame's audio tokens before cross-attention.

A frame's window is [10 features x 5 Whisper layers, 384] flattened time-major to 50 tokens;
the tokens carry no order of their own, so MuseTalk adds the transformer sinusoid table
(Vaswani et al.) over token positions 0..49: even dimensions get sin(pos * w_k), odd ones
cos(pos * w_k), with w_k = 10000^(-2k/d). MuseTalk builds the table in float32 with
`exp(arange(0, d, 2) * -ln(10000)/d)`; we build it the same way so that official weights see
bit-identical inputs. The compact family uses the same function.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from realtime_avatar.timing import AUDIO_TOKENS, WHISPER_DIM

PE_BASE = 10000.0  # wavelength base of the sinusoids (the transformer paper's, MuseTalk's)


def sinusoidal_positions(n_positions: int = AUDIO_TOKENS, dim: int = WHISPER_DIM) -> torch.Tensor:
    """[n_positions, dim] float32 table: row p = [sin(p w_0), cos(p w_0), sin(p w_1), ...]."""
    if dim % 2:
        raise ValueError(f"positional encoding needs an even dimension, got {dim}")
    position = torch.arange(0, n_positions, dtype=torch.float32).unsqueeze(1)
    inv_wavelength = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(PE_BASE) / dim)
    )
    table = torch.zeros(n_positions, dim, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * inv_wavelength)
    table[:, 1::2] = torch.cos(position * inv_wavelength)
    return table


class AudioPositionalEncoding(nn.Module):
    """Adds the sinusoid table to [N, T, dim] audio tokens (T <= n_positions).

    The table is a non-persistent buffer: it is a pure function of the shape, so it is not
    stored in checkpoints (MuseTalk's unet.pth does not hold it either) and it moves with
    `.to(device)`. The sum is done in the table's float32 and cast back to the input dtype.
    """

    def __init__(self, n_positions: int = AUDIO_TOKENS, dim: int = WHISPER_DIM):
        super().__init__()
        self.register_buffer("table", sinusoidal_positions(n_positions, dim), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n_tokens, dim = tokens.shape[-2:]
        tracing = torch.jit.is_tracing()  # (ONNX export: shapes are traced values there)
        if not tracing and (dim != self.table.shape[1] or n_tokens > self.table.shape[0]):
            raise ValueError(
                f"audio tokens have shape {tuple(tokens.shape)}; expected [N, <= {self.table.shape[0]}, "
                f"{self.table.shape[1]}] (a frame window flattened to [tokens, Whisper dim])"
            )
        return (tokens.float() + self.table[:n_tokens]).to(tokens.dtype)
