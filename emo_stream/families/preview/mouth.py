"""Audio -> mouth shape, one value set per video frame.

`audio_features` is stateless (it runs in the engine's audio stage): per 40 ms frame it measures the
loudness of the voiced band (drives the jaw), the share of high-frequency energy (fricatives keep the
mouth nearly shut) and a spectral centroid inside the vowel-formant range (low: rounded "oo", high:
spread "ee"). `MouthFilter` turns those into jaw opening and lip width with a loudness reference that
adapts to the speaker's level and an attack/release smoother, so syllables read as speech rather than
flapping; its state is carried across segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emo_stream.timeline import SAMPLE_RATE, samples_per_frame



@dataclass(frozen=True)
class MouthConfig:
    window: int = 1024            # analysis window (64 ms), centred a little after the frame centre
    lead_samples: int = 160       # analysis centre = frame centre + lead: the mouth moves slightly early
    gate_db: float = -52.0        # below this (dBFS) a frame is silence: mouth closed
    dynamic_range_db: float = 30.0  # jaw goes from closed to open over this range under the reference
    reference_floor_db: float = -40.0  # quiet speakers are not normalised up beyond this
    reference_decay_db: float = 0.06   # per frame: the loudness reference forgets old peaks slowly
    floor_rise_db: float = 0.12   # per frame: how fast the background-level estimate may rise
    floor_margin_db: float = 3.0  # the jaw starts opening this far above the background
    min_range_db: float = 8.0     # never squeeze the jaw's range below this (loud, steady noise)
    # per-frame values at 25 fps (MouthFilter converts them for other frame rates)
    attack: float = 0.75          # one-pole gain per frame when the jaw opens
    release: float = 0.5          # ... and when it closes
    width_gain: float = 0.35      # per-frame smoothing gain of the lip width


# feature columns returned by audio_features
LEVEL, VOICED, HIGH_SHARE, CENTROID = range(4)
NUM_FEATURES = 4


def _band_masks(window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    freqs = np.fft.rfftfreq(window, 1.0 / SAMPLE_RATE)
    voiced = (freqs >= 80) & (freqs < 2500)
    high = (freqs >= 3000) & (freqs < 7800)
    formant = (freqs >= 250) & (freqs < 3500)
    return voiced, high, formant


def audio_features(audio: np.ndarray, start: int, num_frames: int, fps: int = 25,
                   config: MouthConfig = MouthConfig()) -> np.ndarray:
    """(num_frames, NUM_FEATURES) float32 for frames whose first sample is audio[start].

    Samples outside `audio` count as silence, so any left context / look-ahead length works.
    """
    spf = samples_per_frame(fps)
    win = config.window
    audio = np.asarray(audio, np.float32)
    centres = start + np.arange(num_frames) * spf + spf // 2 + config.lead_samples
    first = centres - win // 2
    # one padded copy, then a strided view of all windows (no per-frame Python work)
    pad_left = max(0, -int(first.min(initial=0)))
    pad_right = max(0, int(first.max(initial=0)) + win - len(audio))
    padded = np.pad(audio, (pad_left, pad_right))
    idx = first + pad_left
    frames = np.lib.stride_tricks.sliding_window_view(padded, win)[idx]
    spec = np.abs(np.fft.rfft(frames * np.hanning(win).astype(np.float32), axis=1)) ** 2
    voiced, high, formant = _band_masks(win)
    norm = (np.hanning(win) ** 2).sum() * win / 2  # full-scale sine -> 0 dB
    total = spec.sum(1) + 1e-12
    out = np.empty((num_frames, NUM_FEATURES), np.float32)
    out[:, LEVEL] = 10 * np.log10(total / norm + 1e-12)
    out[:, VOICED] = 10 * np.log10(spec[:, voiced].sum(1) / norm + 1e-12)
    out[:, HIGH_SHARE] = spec[:, high].sum(1) / total
    f = np.fft.rfftfreq(win, 1.0 / SAMPLE_RATE)[formant]
    pf = spec[:, formant]
    out[:, CENTROID] = (pf * f).sum(1) / (pf.sum(1) + 1e-12)
    return out


@dataclass
class MouthState:
    jaw: float = 0.0        # 0 closed .. 1 wide open
    width: float = 0.0      # -1 rounded .. 0 neutral .. 1 spread
    reference_db: float = -24.0
    floor_db: float = -90.0


@dataclass
class MouthFilter:
    """Maps per-frame audio features to smoothed (jaw, width) with state carried across segments."""

    config: MouthConfig = field(default_factory=MouthConfig)
    fps: int = 25

    def __post_init__(self) -> None:
        # the config's per-frame gains and rates are given at 25 fps; keep their timing at any rate
        c, k = self.config, 25.0 / self.fps
        self._attack = 1.0 - (1.0 - c.attack) ** k
        self._release = 1.0 - (1.0 - c.release) ** k
        self._width_gain = 1.0 - (1.0 - c.width_gain) ** k
        self._decay_db = c.reference_decay_db * k
        self._rise_db = c.floor_rise_db * k

    def targets(self, feats: np.ndarray, state: MouthState) -> tuple[np.ndarray, np.ndarray]:
        """Unsmoothed per-frame jaw and width targets; updates the loudness reference."""
        c = self.config
        n = len(feats)
        jaw = np.zeros(n, np.float32)
        width = np.zeros(n, np.float32)
        ref, floor = state.reference_db, state.floor_db
        for i in range(n):
            level, voiced_db, high_share, centroid = feats[i]
            ref = max(voiced_db, ref - self._decay_db, c.reference_floor_db)
            # background (music, noise): the quietest recent level; drops at once, rises slowly
            floor = min(voiced_db, floor + self._rise_db)
            if level < c.gate_db:
                continue
            bottom = min(max(ref - c.dynamic_range_db, floor + c.floor_margin_db), ref - c.min_range_db)
            x = (voiced_db - bottom) / (ref - bottom)
            j = float(np.clip(x, 0.0, 1.0)) ** 1.6
            # fricatives (s, sh, f): energy is high-frequency; the jaw stays nearly shut
            j *= 1.0 - 0.65 * float(np.clip((high_share - 0.35) / 0.4, 0.0, 1.0))
            jaw[i] = j
            # low formant centroid: rounded vowels; high: spread vowels (only meaningful when voiced)
            w = float(np.clip((centroid - 850.0) / 450.0, -1.0, 1.0))
            width[i] = w * min(1.0, j * 2.5)
        state.reference_db, state.floor_db = ref, floor
        return jaw, width

    def __call__(self, feats: np.ndarray | None, num_frames: int, state: MouthState) -> np.ndarray:
        """(num_frames, 2) smoothed jaw, width. `feats` None: silence (the mouth relaxes shut)."""
        if feats is None:
            jaw_t = np.zeros(num_frames, np.float32)
            width_t = np.zeros(num_frames, np.float32)
        else:
            if len(feats) != num_frames:
                raise ValueError(f"features cover {len(feats)} frames, segment has {num_frames}")
            jaw_t, width_t = self.targets(feats, state)
        out = np.empty((num_frames, 2), np.float32)
        jaw, width = state.jaw, state.width
        for i in range(num_frames):
            gain = self._attack if jaw_t[i] > jaw else self._release
            jaw += gain * (float(jaw_t[i]) - jaw)
            width += self._width_gain * (float(width_t[i]) - width)
            out[i] = jaw, width
        state.jaw, state.width = jaw, width
        return out
