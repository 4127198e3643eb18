"""Streaming Whisper features: hidden states [T,5,384] at 50 Hz from a live audio stream.

openai-whisper's encoder expects a 30 s segment. Here it runs on a short sliding window (a few
seconds) every hop, with the positional embedding taken at the window's absolute offset inside
its 30 s segment, and keeps only the features that already have `lookahead` seconds of audio to
their right. Each feature is emitted exactly once, in order. Features never look across a 30 s
segment boundary, because the offline pass (MuseTalk's) encodes each 30 s segment on its own.

Five hidden states are stacked per feature (DESIGN.md 2): the embedding (convs + positions) and
the outputs of blocks 1..4; in "v15" layout (MuseTalk v1.5, HF output_hidden_states) the last one
goes through the encoder's final LayerNorm, in "v1" layout it does not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from whisper.audio import log_mel_spectrogram, pad_or_trim
from whisper.model import AudioEncoder

from .audio_ring import AudioRing, RingClosed
from .timing import (
    FEATURE_RATE,
    SAMPLES_PER_FEATURE,
    SEGMENT_FEATURES,
    SEGMENT_SAMPLES,
    num_features,
)

if TYPE_CHECKING:
    from .encoder_batching import EncoderBatcher

LayerLayout = Literal["v15", "v1"]


@dataclass(frozen=True)
class StreamingConfig:
    window_s: float = 4.0  # encoder context; 4 s keeps parity >= 0.95 at 0.5 s lookahead
    hop_s: float = 0.2  # how often the encoder runs (5 runs per second)
    lookahead_s: float = 0.5  # right context a feature waits for before it is final
    layout: LayerLayout = "v15"

    @property
    def window_features(self) -> int:
        return round(self.window_s * FEATURE_RATE)

    @property
    def hop_features(self) -> int:
        return round(self.hop_s * FEATURE_RATE)

    @property
    def lookahead_features(self) -> int:
        return round(self.lookahead_s * FEATURE_RATE)

    def __post_init__(self) -> None:
        if self.hop_features < 1:
            raise ValueError(f"hop_s={self.hop_s} is shorter than one feature (20 ms)")
        if self.window_features > SEGMENT_FEATURES:
            raise ValueError(f"window_s={self.window_s} exceeds Whisper's 30 s context")
        # Emitted features must have left context inside the window: the window's first token
        # has none and is poor (DESIGN.md 4).
        if self.window_features <= self.hop_features + self.lookahead_features:
            raise ValueError(
                f"window_s={self.window_s} must be longer than hop_s + lookahead_s "
                f"({self.hop_s} + {self.lookahead_s})"
            )


@dataclass(frozen=True)
class WindowPlan:
    """One encoder run, in feature indices (1 feature = 320 samples = 20 ms)."""

    start: int  # first feature of the audio window (absolute)
    end: int  # one past the last feature of real audio in the window
    zero_pad: int  # features of silence appended after `end` (end of stream only)
    segment_start: int  # first feature of the 30 s segment the window lies in
    emit_from: int  # features [emit_from, emit_to) become final with this run
    emit_to: int


def plan_window(
    next_feature: int, available_features: int, config: StreamingConfig, final: bool, catch_up_hops: int = 1
) -> WindowPlan | None:
    """Decide the next encoder window; None when nothing new can be emitted yet.

    `available_features`: whole features of audio received so far. `final`: the stream has
    ended, so the last features are emitted with zero padding as their right context (as the
    offline pass pads the last segment). `catch_up_hops`: when more than one hop is ready (the
    encoder is behind), one run may emit up to that many hops (live sessions: a run slower than
    a 40 ms hop must not leave the encoder behind for good); 1 emits one hop per run.
    """
    segment_start = next_feature // SEGMENT_FEATURES * SEGMENT_FEATURES
    segment_end = segment_start + SEGMENT_FEATURES
    # Emit one hop per run, so every feature gets the same right context as in training; only a
    # backlog is emitted up to catch_up_hops hops at a time (those features hear more).
    hop, lookahead = config.hop_features, config.lookahead_features
    behind_hops = (available_features - next_feature - lookahead) // hop  # hops ready to emit
    # the emitted features keep at least half the window as left context
    most = max(1, min(catch_up_hops, (config.window_features // 2 - lookahead) // hop))
    emit_hop = max(1, min(behind_hops, most)) * hop
    end = min(available_features, segment_end, next_feature + emit_hop + config.lookahead_features)
    zero_pad = 0
    if end == segment_end:
        emit_to = end  # the offline pass sees nothing past a segment end either
    elif final and end == available_features:
        emit_to = end
        zero_pad = min(config.lookahead_features, segment_end - end)
    else:
        emit_to = end - config.lookahead_features
    if not final:
        emit_to = min(emit_to, next_feature + emit_hop)
        # Run once per hop, not for every new feature (except to close a segment).
        if emit_to - next_feature < config.hop_features and end != segment_end:
            return None
    if emit_to <= next_feature:
        return None
    start = max(segment_start, end + zero_pad - config.window_features)
    # With end-of-stream padding the window could slide past what it must emit: keep it covering.
    start = min(start, max(segment_start, next_feature - 1))
    return WindowPlan(start, end, zero_pad, segment_start, next_feature, emit_to)


def encoder_device(encoder: AudioEncoder) -> torch.device:
    """The device the encoder's weights are on (the mel is moved there, not the encoder)."""
    return encoder.conv1.weight.device


def encoder_hidden_states(
    encoder: AudioEncoder, mel: torch.Tensor, position_offset: int, layout: LayerLayout = "v15"
) -> torch.Tensor:
    """Run the encoder on a mel window [80, 2T] with positions offset..offset+T -> [T,5,384]
    (float32, on the encoder's device)."""
    return batched_hidden_states(encoder, mel.unsqueeze(0), [position_offset], layout)[0]


def batched_hidden_states(
    encoder: AudioEncoder, mels: torch.Tensor, position_offsets: list[int], layout: LayerLayout = "v15"
) -> torch.Tensor:
    """Several windows of the same length in one encoder call: mels [B, 80, 2T] (any device;
    moved to the encoder's) with one position offset each -> [B, T, 5, 384] on the encoder's
    device. Windows of different sessions due in the same tick share one call this way
    (DESIGN.md 11: 64 windows of 2 s in 3.6 ms on an H200 vs 1.5 ms for one)."""
    if len(position_offsets) != mels.shape[0]:
        raise ValueError(f"{mels.shape[0]} mel windows but {len(position_offsets)} position offsets")
    mels = mels.to(encoder_device(encoder), encoder.conv1.weight.dtype)
    n = (mels.shape[-1] + 1) // 2  # conv2's stride 2
    positions = torch.stack([encoder.positional_embedding[o : o + n] for o in position_offsets])
    runner = getattr(encoder, "onnx_runner", None)  # onnx_encoder.attach_onnx_encoder (CPU)
    if runner is not None:
        stacked = runner(mels, positions)
        if layout == "v15":
            stacked[:, :, -1] = encoder.ln_post(stacked[:, :, -1])
        return stacked
    return torch.stack(encoder_states(encoder, mels, positions, layout), dim=2).float()


def encoder_states(encoder: AudioEncoder, mels: torch.Tensor, positions: torch.Tensor,
                   layout: LayerLayout | None = "v15") -> list[torch.Tensor]:
    """The encoder's body in torch: mels [B, n_mels, 2T], positions [B, T, D] -> the input of
    every block and the last output, each [B, T, D] (ln_post on the last for layout "v15";
    None: never). export/encoder_onnx.py exports exactly this."""
    x = F.gelu(encoder.conv1(mels))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + positions
    states = [x]
    for block in encoder.blocks:
        x = block(x)
        states.append(x)
    if layout == "v15":
        states[-1] = encoder.ln_post(states[-1])
    return states


@torch.inference_mode()
def offline_features(encoder: AudioEncoder, audio: np.ndarray, layout: LayerLayout = "v15") -> np.ndarray:
    """The reference (MuseTalk) features of a whole clip: each 30 s segment zero-padded to 30 s
    and encoded at once, trimmed to floor(duration * 50) features -> [T,5,384] float32."""
    n_mels = encoder.conv1.in_channels
    out = []
    for seg_start in range(0, max(len(audio), 1), SEGMENT_SAMPLES):
        segment = torch.from_numpy(pad_or_trim(audio[seg_start : seg_start + SEGMENT_SAMPLES]))
        mel = log_mel_spectrogram(segment, n_mels=n_mels, device=encoder_device(encoder))
        out.append(encoder_hidden_states(encoder, mel, 0, layout))
    return torch.cat(out).cpu().numpy()[: num_features(len(audio))]


@dataclass
class FeatureBlock:
    """Final features first_index .. first_index+len-1 (feature k covers audio [20k, 20k+20) ms)."""

    first_index: int
    states: np.ndarray  # [n,5,384] float32
    encoded_at: float  # time.monotonic() when the encoder produced them

    @property
    def start_s(self) -> float:
        return self.first_index / FEATURE_RATE


class StreamingWhisper:
    """Turns audio from an AudioRing into final Whisper features, each exactly once, in order.

    `step(final)` does one encoder run synchronously (call it from a worker thread);
    `stream()` is the asyncio driver: it waits on the ring and runs the encoder off the event
    loop. The ring's sample index is the clock: feature k is audio samples [320k, 320k+320).
    """

    def __init__(self, encoder: AudioEncoder, ring: AudioRing, config: StreamingConfig = StreamingConfig(),
                 catch_up_hops: int = 1, batcher: "EncoderBatcher | None" = None):
        self.encoder = encoder.eval()
        self.catch_up_hops = catch_up_hops  # see plan_window
        # optional: encodes this stream's windows together with other sessions' (one call per tick)
        self.batcher = batcher
        self.ring = ring
        self.config = config
        self.next_feature = 0
        self.n_mels = encoder.conv1.in_channels
        self.runs = 0
        self._level_segment, self._segment_max = -1, -np.inf
        self.encode_seconds = 0.0  # total encoder wall time, for stats

    def plan(self, final: bool = False) -> WindowPlan | None:
        available = self.ring.write_index // SAMPLES_PER_FEATURE
        return plan_window(self.next_feature, available, self.config, final, self.catch_up_hops)

    @torch.inference_mode()
    def run(self, plan: WindowPlan) -> FeatureBlock:
        t0 = time.monotonic()
        mel = self.window_mel(plan)
        states = encoder_hidden_states(self.encoder, mel, plan.start - plan.segment_start, self.config.layout)
        return self.finish_run(plan, states, t0)

    @torch.inference_mode()
    def window_mel(self, plan: WindowPlan) -> torch.Tensor:
        """The log-mel [80, 2T] of a planned window, on the encoder's device (the first half
        of run(); a batcher encodes the mels of several sessions in one call)."""
        audio = self.ring.read(plan.start * SAMPLES_PER_FEATURE, plan.end * SAMPLES_PER_FEATURE)
        if plan.zero_pad:
            audio = np.concatenate([audio, np.zeros(plan.zero_pad * SAMPLES_PER_FEATURE, np.float32)])
        mel = log_mel_spectrogram(torch.from_numpy(audio), n_mels=self.n_mels, device=encoder_device(self.encoder))
        return self._floor_like_offline(mel, plan.segment_start)

    def finish_run(self, plan: WindowPlan, states: torch.Tensor, t0: float) -> FeatureBlock:
        """The second half of run(): keep the final features [T,5,384] of the window (host
        float32) and advance."""
        kept = states[plan.emit_from - plan.start : plan.emit_to - plan.start].float().cpu().numpy()
        self.next_feature = plan.emit_to
        now = time.monotonic()
        self.runs += 1
        self.encode_seconds += now - t0
        return FeatureBlock(plan.emit_from, kept, now)

    def _floor_like_offline(self, mel: torch.Tensor, segment_start: int) -> torch.Tensor:
        """Whisper floors the log-mel at (max - 8) over the whole 30 s segment; a window alone
        would floor quiet audio far lower. Use the loudest level heard so far in the segment.

        log_mel_spectrogram returns (max(l, m - 8) + 4) / 4 with m the window's own max; for a
        running max M >= m the offline value is max(that, (M - 4) / 4).
        """
        if segment_start != self._level_segment:
            self._level_segment, self._segment_max = segment_start, -np.inf
        self._segment_max = max(self._segment_max, 4.0 * float(mel.max()) - 4.0)
        return torch.clamp(mel, min=(self._segment_max - 4.0) / 4.0)

    @torch.inference_mode()
    def _silent_window_mel(self) -> torch.Tensor:
        audio = torch.zeros(self.config.window_features * SAMPLES_PER_FEATURE)
        return log_mel_spectrogram(audio, n_mels=self.n_mels, device=encoder_device(self.encoder))

    @torch.inference_mode()
    def _encode_alone(self, mel: torch.Tensor) -> torch.Tensor:
        return encoder_hidden_states(self.encoder, mel, 0, self.config.layout)

    async def probe(self) -> float:
        """Seconds one live encoder run takes now, under whatever else the machine does: a
        window of silence of the live length through the same path as live windows (the
        batcher, or a worker thread). Nothing is emitted and the stream's state is untouched;
        sessions time one while nobody speaks so that the next talk spurt's delay is sized from
        the current load, not from the start-up measurement."""
        t0 = time.monotonic()
        mel = await asyncio.to_thread(self._silent_window_mel)
        if self.batcher is None:
            await asyncio.to_thread(self._encode_alone, mel)
        else:
            await self.batcher.encode(mel, 0, self.config.layout)
        return time.monotonic() - t0

    def step(self, final: bool = False) -> FeatureBlock | None:
        plan = self.plan(final)
        return None if plan is None else self.run(plan)

    def skip_to(self, feature: int) -> None:
        """Forget everything before `feature` (barge-in, or a consumer that fell too far behind)."""
        self.next_feature = max(self.next_feature, feature)

    async def stream(self) -> AsyncIterator[FeatureBlock]:
        """Yield feature blocks as audio arrives; ends after the ring is closed and drained."""
        lookahead_samples = (self.config.hop_features + self.config.lookahead_features) * SAMPLES_PER_FEATURE
        while True:
            final = self.ring.closed
            plan = self.plan(final)
            if plan is not None:
                if self.batcher is None:
                    yield await asyncio.to_thread(self.run, plan)
                else:
                    t0 = time.monotonic()
                    mel = await asyncio.to_thread(self.window_mel, plan)  # the STFT, off the loop
                    states = await self.batcher.encode(mel, plan.start - plan.segment_start, self.config.layout)
                    yield self.finish_run(plan, states, t0)
                continue
            if final:
                return
            try:
                # The next run becomes possible once one more hop of audio (plus lookahead) exists.
                await self.ring.wait_until(self.next_feature * SAMPLES_PER_FEATURE + lookahead_samples)
            except RingClosed:
                pass


# The live setting our own (compact) models are trained with: they learn from exactly the
# features the streaming encoder gives at this lookahead, so no parity with the offline pass is
# needed and latency stays low (DESIGN.md 4). MuseTalk weights need StreamingConfig() instead.
LOW_LATENCY = StreamingConfig(window_s=2.0, hop_s=0.12, lookahead_s=0.1)


@torch.inference_mode()
def stream_features(encoder: AudioEncoder, audio: np.ndarray, config: StreamingConfig = LOW_LATENCY) -> np.ndarray:
    """The features a live session would produce for this clip, computed as fast as possible
    (same windows, hops and lookahead, no waiting) -> [floor(len/320), 5, 384] float32."""
    from .audio_ring import AudioRing

    ring = AudioRing(max(len(audio), 1))
    whisper = StreamingWhisper(encoder, ring, config)
    blocks = []
    hop = config.hop_features * SAMPLES_PER_FEATURE
    for i in range(0, len(audio), hop):
        ring.write(audio[i : i + hop])
        while (block := whisper.step()) is not None:
            blocks.append(block.states)
    ring.close()
    while (block := whisper.step(final=True)) is not None:
        blocks.append(block.states)
    layers, dim = len(encoder.blocks) + 1, encoder.ln_post.normalized_shape[0]
    return np.concatenate(blocks) if blocks else np.zeros((0, layers, dim), np.float32)
