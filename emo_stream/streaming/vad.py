"""Voice activity: which parts of the pushed audio are speech, so silence is rendered as cheap idle motion.

silero-vad (weights bundled with the pip package, no download) runs on 512-sample chunks (32 ms) as the
audio is windowed; one model is loaded per engine and each session gets its own copy (its recurrent state).
With VAD disabled a cheap RMS-energy detector stands in.
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from emo_stream.timeline import SAMPLE_RATE

log = logging.getLogger(__name__)

CHUNK = 512  # silero-vad's chunk at 16 kHz


def load_silero():
    """The silero-vad model (TorchScript), from the package's bundled weights.

    Importing silero_vad calls torch.set_num_threads(1) for the whole process; undo that, so the
    model stages keep their threads."""
    import torch

    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad

        return load_silero_vad()
    finally:
        torch.set_num_threads(threads)


class VoiceActivity:
    """Per-session speech/silence decisions over the absolute sample clock of the pushed audio.

    feed() consumes audio in order; voiced(lo, hi) says whether any 32 ms chunk overlapping [lo, hi)
    (widened by the hangover before lo) was speech. A tail shorter than a chunk is judged by energy.
    """

    def __init__(self, model=None, threshold: float = 0.5, energy_threshold_db: float = -45.0,
                 hangover_samples: int = 3200) -> None:
        self._model = copy.deepcopy(model) if model is not None else None
        self.threshold = threshold
        self._energy_thr = 10 ** (energy_threshold_db / 20)
        self.hangover = int(hangover_samples)
        self._pending = np.zeros(0, np.float32)
        self._origin = 0                    # absolute sample of _flags[0]'s chunk
        self._flags: list[bool] = []        # per chunk, from _origin
        self._fed = 0                       # absolute samples fed

    @property
    def uses_silero(self) -> bool:
        return self._model is not None

    @property
    def fed(self) -> int:
        """Absolute samples fed so far (the window's clock)."""
        return self._fed

    def feed(self, samples: np.ndarray) -> None:
        x = np.concatenate([self._pending, np.asarray(samples, np.float32)]) if len(self._pending) else \
            np.asarray(samples, np.float32)
        self._fed += len(samples)
        whole = len(x) - len(x) % CHUNK
        if whole:
            self._flags.extend(self._classify(x[:whole].reshape(-1, CHUNK)))
        self._pending = x[whole:].copy()

    def _classify(self, chunks: np.ndarray) -> list[bool]:
        if self._model is None:
            rms = np.sqrt(np.mean(np.square(chunks, dtype=np.float64), axis=1))
            return [bool(r > self._energy_thr) for r in rms]
        import torch

        # silero's tiny ops are 10-50x slower with several intra-op threads (thread wake-ups dominate),
        # which is why silero_vad sets one thread for the whole process on import. We keep the process
        # setting and use one thread only while classifying (a model op starting in another stage during
        # these few ms may run single-threaded: slower, never wrong).
        threads = torch.get_num_threads()
        try:
            if threads != 1:
                torch.set_num_threads(1)
            with torch.inference_mode():
                return [float(self._model(torch.from_numpy(c.copy()), SAMPLE_RATE)) >= self.threshold for c in chunks]
        finally:
            if threads != 1:
                torch.set_num_threads(threads)

    def voiced(self, lo: int, hi: int) -> bool:
        """Speech anywhere in [lo - hangover, hi) of the audio fed so far."""
        a = max(0, (lo - self.hangover - self._origin) // CHUNK)
        b = max(0, -(-(hi - self._origin) // CHUNK))
        if any(self._flags[a:b]):
            return True
        tail_start = self._origin + len(self._flags) * CHUNK
        if hi > tail_start and len(self._pending):
            rms = float(np.sqrt(np.mean(np.square(self._pending, dtype=np.float64))))
            return rms > self._energy_thr
        return False

    def forget_before(self, sample: int) -> None:
        """Drop decisions no longer needed (bounded memory)."""
        drop = max(0, (sample - self.hangover - self._origin) // CHUNK - 1)
        if drop:
            del self._flags[:drop]
            self._origin += drop * CHUNK

    def reset(self, at_sample: int) -> None:
        """Interrupt: the next audio fed starts at `at_sample`; the model's recurrent state restarts."""
        if self._model is not None:
            self._model.reset_states()
        self._pending = np.zeros(0, np.float32)
        self._flags.clear()
        self._origin = at_sample
        self._fed = at_sample
