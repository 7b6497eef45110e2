"""EchoMimicBackend: EchoMimic v1 weights behind the backend contract (emo_stream.backend).

    backend = create_backend(model="downloads/EchoMimic")   # the download folder as it comes, or our checkpoint
    # offline (emo-stream generate): EchoMimic's own pipeline over the whole audio
    for frames, audio in backend.render_video(avatar, audio16k, seed=0): ...
    # live (emo-stream serve): segments, each continuing the previous one through held frames
    frames = backend.generate([SegmentJob(avatar, state, backend.encode_audio(window, start, n), n)])

Offline reproduces EchoMimic's infer scripts: the face mask is the detected face box padded by 10% of its
size, the reference image goes through the ReferenceNet once, whisper-tiny features of the whole audio,
one latent video denoised with overlapping closed-loop context windows (any length), acc weights 6 DDIM
steps without guidance or the normal weights 30 steps with guidance 2.5, decoded with the folder's
sd-vae-ft-mse (or TAESD), 24 fps.

Live: EchoMimic has no motion frames. Each segment starts with the last `live_overlap` frames of the
previous one, held at their known clean latents re-noised to each step's level (the same noise per held
frame, the one it started from), so the temporal layers continue them (see docs/streaming.md). Its audio
tokens come from whisper on EchoMimic's 30 s grid of the session's audio (emo_stream.families.echomimic.audio,
"live"): EchoMimic's whole-file tokens of the audio received so far; every session's segments in one call.

The model is anything with the `EchoParts` methods (emo_stream.families.echomimic's model adapts to it).
Not thread-safe: one call at a time (the engine serialises model work on its device).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from emo_stream.backend import AudioContext, BackendBase, SegmentJob
from emo_stream.blocks.checks import check_crop, check_size
from emo_stream.families.echomimic.sampling import (ACC, NORMAL, EchoDenoiser, Held, context_windows, initial_latents,
                                           make_scheduler, sample)
from emo_stream.errors import ConfigError
from emo_stream.execution import BATCH_BUCKETS, ExecutionOptions, bucket_size, pad_rows, to_device
from emo_stream.families.echomimic.audio import audio_tokens, encode_live, live_context
from emo_stream.timeline import SAMPLE_RATE

log = logging.getLogger(__name__)

DECODE_CHUNK = 8          # frames per VAE decode call: bounds activation memory at 512 px
EXTRA_LOOKAHEAD_FRAMES = 0  # live: audio waited for past the tokens' reach (more of whisper's segment)
OFFLINE_FPS = 24          # EchoMimic's video rate (live runs at the engine's rate: 16000 / fps must be whole)


class EchoParts(Protocol):
    """What the backend needs from an EchoMimic model (weights loaded, eval mode)."""

    weights: str                 # "acc" or "normal": which set the folder held
    device: torch.device
    dtype: torch.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled VAE latents (B, 4, H/8, W/8) (mean * 0.18215)."""

    def decode_latents(self, latents: torch.Tensor, decoder: str = "vae") -> torch.Tensor:
        """(N, 4, h, w) scaled latents -> (N, 3, H, W) in [-1, 1]; decoder "vae" or "taesd"."""

    def has_decoder(self, decoder: str) -> bool: ...

    def reference_bank(self, ref_latents: torch.Tensor) -> Any:
        """ReferenceNet once on (1, 4, h, w) at t=0 -> what the denoiser attends to."""

    def face_feature(self, mask: torch.Tensor) -> torch.Tensor:
        """Face mask (1, 1, 1, H, W) in {0, 1} -> face-locator feature (1, C, 1, h, w)."""

    def denoiser(self, banks: list[Any]) -> EchoDenoiser:
        """The denoiser for a batch of sessions (row r uses banks[r % len(banks)])."""

    def whisper_features(self, waveform: np.ndarray) -> torch.Tensor:
        """16 kHz mono float32 -> (T, L + 1, 384) per-layer whisper features, 50 rows per second."""

    whisper_mels: int            # the whisper encoder's mel bins

    def whisper_segments(self, mel: torch.Tensor) -> torch.Tensor:
        """(segments, mels, 3000) padded log-mel -> (segments, 1500, L + 1, 384) features, one batched call."""


def echomimic_face_mask(box: np.ndarray, size: int) -> torch.Tensor:
    """EchoMimic's mask of a (size, size) crop: the face box (rounded to pixels) widened by int(10%) of its
    width/height on each side, 1 inside, as a (1, 1, 1, size, size) float tensor."""
    from emo_stream.families.echomimic.layers import face_mask

    return face_mask([round(float(v)) for v in box], size, size, clamp=True)


@dataclass
class EchoAvatar:
    """A prepared portrait: crop, face box, and what every segment reuses."""

    image: np.ndarray            # (size, size, 3) uint8 crop
    face_box: np.ndarray         # (4,) x0 y0 x1 y1 in crop pixels
    latent: torch.Tensor         # (1, 4, h, w)
    face: torch.Tensor           # (1, C, 1, h, w) face-locator feature
    bank: Any                    # ReferenceNet output the denoiser attends to


@dataclass
class EchoState:
    """Per-session live state: the previous segment's tail (clean latents, their noise, audio tokens)."""

    avatar: EchoAvatar
    seed: int
    generator: torch.Generator
    tail_latents: torch.Tensor | None = None   # (1, 4, k, h, w)
    tail_noise: torch.Tensor | None = None     # (1, 4, k, h, w) the noise those frames started from
    tail_audio: torch.Tensor | None = None     # (k, tokens, 384)
    frames_done: int = 0


class EchoMimicBackend(BackendBase):
    name = "echomimic"

    def __init__(self, model: EchoParts, size: int = 512, fps: int = 25, steps: int | None = None,
                 guidance: float | None = None, decoder: str | None = None, live_overlap: int = 4,
                 segment_frames: int = 8, context_frames: int | None = None, context_overlap: int | None = None,
                 idle_steps: int | None = None, extra_lookahead_frames: int = EXTRA_LOOKAHEAD_FRAMES,
                 face_analyzer=None, compile: str = "off"):
        check_size(size, 8, "EchoMimic")
        if fps <= 0:
            raise ConfigError(f"fps must be positive (got {fps})")
        self.model = model
        self.size, self.fps = size, fps
        base = ACC if model.weights == "acc" else NORMAL
        saved = getattr(model, "defaults", None)  # the checkpoint's own steps / guidance / windows
        if saved is not None:
            base = replace(base, steps=int(saved.steps), guidance=float(saved.guidance))
            context_frames = context_frames or int(saved.context_frames)
            context_overlap = int(saved.context_overlap) if context_overlap is None else context_overlap
        context_frames = context_frames or 12
        context_overlap = 3 if context_overlap is None else context_overlap
        try:
            self.sampling = replace(base, steps=base.steps if steps is None else int(steps),
                                    guidance=base.guidance if guidance is None else float(guidance),
                                    context_frames=context_frames, context_overlap=context_overlap).validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.decoder = decoder or "vae"
        if self.decoder not in ("vae", "taesd"):
            raise ConfigError(f"decoder must be vae or taesd (got {self.decoder!r})")
        if not model.has_decoder(self.decoder):
            where = ("sd-vae-ft-mse/ (a diffusers AutoencoderKL folder, see README) in the download folder"
                     if self.decoder == "vae" else "a diffusers AutoencoderTiny folder at <model>/taesd")
            raise ConfigError(f"decoder {self.decoder} asked for, but the model has none: it needs {where}")
        if not 0 <= live_overlap < context_frames or not 1 <= segment_frames <= context_frames - live_overlap:
            raise ConfigError(f"need 0 <= live_overlap and segment_frames >= 1 with live_overlap + segment_frames "
                              f"<= context_frames ({context_frames}); got {live_overlap} + {segment_frames}")
        if not isinstance(extra_lookahead_frames, int) or not 0 <= extra_lookahead_frames <= 250:
            raise ConfigError(f"extra_lookahead_frames must be an integer between 0 and 250: "
                              f"got {extra_lookahead_frames!r}")
        self.live_overlap = live_overlap
        # silence: half the steps and no guidance (idle motion should not cost what speech costs)
        self.idle_steps = int(idle_steps) if idle_steps is not None else max(1, self.sampling.steps // 2)
        if self.idle_steps < 1:
            raise ConfigError(f"idle_steps must be >= 1 (got {self.idle_steps})")
        self.stream_segment_frames = segment_frames
        self.clip_frames = context_frames
        self.device = model.device
        # torch.compile of the denoiser on CUDA (emo_stream.execution); compiled, batches are padded to a few
        # sizes and short (end-of-speech) segments to the segment length: a bounded set of graphs
        ExecutionOptions(compile=compile).validate()
        if compile != "off" and self.device.type != "cuda":
            log.warning("compile=%s asked for on %s: torch.compile is used on CUDA only; running eagerly",
                        compile, self.device)
            compile = "off"
        if compile != "off" and hasattr(model, "compile"):
            model.compile(compile)
        self.compile = compile
        self.batch_buckets: tuple[int, ...] = BATCH_BUCKETS if compile != "off" else ()
        self.pad_frames = compile != "off"
        self._face_analyzer = face_analyzer
        self._silence: dict[int, torch.Tensor] = {}
        self._audio_lock = threading.Lock()
        # live windows on whisper's 30 s grid, from the line before its first token row's, to its last token row
        self.audio_context: AudioContext = live_context(fps, extra_lookahead_frames)

    # ---- avatar --------------------------------------------------------------------------------
    def prepare_avatar(self, image: np.ndarray) -> EchoAvatar:
        """Detect the face, crop to the model size, encode the reference and the face mask once."""
        from emo_stream.face import crop_portrait

        # EchoMimic's infer scripts crop the face box widened by half its size on each side (the face is half
        # the crop's width, centred), then build the mask from the same box
        face = self.portrait_analyzer(image).analyze(image)
        crop = crop_portrait(image, face, self.size, face_fraction=0.5, center_shift=0.0)
        return self.avatar_from_crop(crop.image, crop.face.box)

    @torch.inference_mode()
    def avatar_from_crop(self, image: np.ndarray, face_box: np.ndarray) -> EchoAvatar:
        """An already cropped (size, size, 3) portrait and its face box -> EchoAvatar (no detection)."""
        check_crop(image, self.size)
        m = self.model
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1
        latent = m.encode_image(x.to(m.device, m.dtype))
        face = m.face_feature(echomimic_face_mask(face_box, self.size).to(m.device, m.dtype))
        return EchoAvatar(image=image, face_box=np.asarray(face_box, np.float32), latent=latent, face=face,
                          bank=m.reference_bank(latent))

    def new_state(self, avatar: EchoAvatar, seed: int = 0) -> EchoState:
        return EchoState(avatar=avatar, seed=int(seed), generator=torch.Generator().manual_seed(int(seed)))

    # ---- offline: EchoMimic's pipeline over the whole audio ------------------------------------
    @torch.inference_mode()
    def render_video(self, avatar: EchoAvatar, audio: np.ndarray, seed: int = 0,
                     progress: Callable[[str, int, int], None] | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (frames, audio they cover) for a whole 16 kHz audio, frames decoded chunk by chunk.

        progress(stage, done, total) is called per denoiser call ("denoise") and per decoded chunk ("decode").
        """
        m = self.model
        num_frames = max(1, int(round(len(audio) * self.fps / SAMPLE_RATE)))
        with self._audio_lock:
            feats = m.whisper_features(np.asarray(audio, np.float32))
        tokens = audio_tokens(feats, self.fps, num_frames)
        latents = self._denoise_video(avatar, tokens, seed, progress)
        edges = [int(round(i * SAMPLE_RATE / self.fps)) for i in range(num_frames + 1)]
        padded = np.concatenate([np.asarray(audio, np.float32), np.zeros(max(0, edges[-1] - len(audio)), np.float32)])
        for first in range(0, num_frames, DECODE_CHUNK):
            last = min(num_frames, first + DECODE_CHUNK)
            frames = self._to_pixels(latents[0, :, first:last].permute(1, 0, 2, 3))
            if progress is not None:
                progress("decode", last, num_frames)
            yield frames, padded[edges[first]:edges[last]]

    def _denoise_video(self, avatar: EchoAvatar, tokens: torch.Tensor, seed: int,
                       progress: Callable[[str, int, int], None] | None) -> torch.Tensor:
        m = self.model
        frames = tokens.shape[0]
        h = self.size // 8
        x = initial_latents((1, 4, frames, h, h), torch.Generator().manual_seed(int(seed))).to(m.device, m.dtype)
        calls = [0]
        total = len(context_windows(frames, self.sampling.context_frames, self.sampling.context_overlap)) \
            * self.sampling.steps

        def tick() -> None:
            calls[0] += 1
            if progress is not None:
                progress("denoise", calls[0], total)

        return sample(m.denoiser([avatar.bank]), x, tokens[None].to(m.device, m.dtype), avatar.face,
                      self.sampling, scheduler=make_scheduler(), on_call=tick)

    # ---- live ----------------------------------------------------------------------------------
    def encode_audio(self, audio: np.ndarray, start: int, num_frames: int) -> torch.Tensor:
        """(num_frames, 10 * (L + 1), 384) audio tokens; audio[:start] is history and audio[0] sits on
        whisper's 30 s grid of the stream (the window AudioContext.align_samples gives)."""
        return self.encode_audio_batch([(audio, start, num_frames)])[0]

    def encode_audio_batch(self, requests: list[tuple[np.ndarray, int, int]]) -> list[torch.Tensor]:
        """encode_audio for several (window, start, num_frames) at once: every 30 s segment they touch (one,
        or two across a boundary) goes through whisper in one batched call."""
        # the engine may encode while denoise computes silent tokens: one whisper call at a time
        with self._audio_lock, torch.no_grad():
            return encode_live(self.model.whisper_segments, requests, self.fps, self.model.whisper_mels,
                               self.model.device)

    def _silent_tokens(self, num_frames: int) -> torch.Tensor:
        """Tokens of silence at a stream's start (idle segments: the denoiser wants tokens, any fixed ones)."""
        if num_frames not in self._silence:
            spf = SAMPLE_RATE / self.fps
            zeros = np.zeros(int(np.ceil((num_frames + self.audio_context.lookahead_frames) * spf)), np.float32)
            self._silence[num_frames] = self.encode_audio(zeros, 0, num_frames)
        return self._silence[num_frames]

    @torch.inference_mode()
    def denoise(self, jobs: list[SegmentJob]) -> list[torch.Tensor]:
        """Each job's new frames' latents (1, 4, num_frames, h, w); jobs with the same shape share a batch."""
        out: list[torch.Tensor | None] = [None] * len(jobs)
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for i, job in enumerate(jobs):
            if job.num_frames < 1:
                raise ValueError("num_frames must be >= 1")
            held = 0 if job.state.tail_latents is None else job.state.tail_latents.shape[2]
            speech = bool(job.speech and job.features is not None)
            groups.setdefault((job.num_frames, held, speech), []).append(i)
        for (frames, held, speech), idx in groups.items():
            new = self._denoise_group([jobs[i] for i in idx], frames, held, speech)
            for k, i in enumerate(idx):
                out[i] = new[k:k + 1]
        return out  # type: ignore[return-value]

    def _denoise_group(self, jobs: list[SegmentJob], frames: int, held: int, speech: bool) -> torch.Tensor:
        m = self.model
        dev, dt = m.device, m.dtype
        h = self.size // 8
        # compiled: a short segment runs at the full length, its tail silent (what follows the end of speech)
        run = self.stream_segment_frames if self.pad_frames and frames < self.stream_segment_frames else frames
        tokens = []
        for j in jobs:
            t = j.features if speech else self._silent_tokens(frames)
            if t.shape[0] != frames:
                raise ValueError(f"features cover {t.shape[0]} frames, the job asks for {frames}")
            if run > frames:
                t = torch.cat([t, self._silent_tokens(run - frames).to(t.device, t.dtype)])
            tokens.append(torch.cat([j.state.tail_audio, t.to(j.state.tail_audio.device)]) if held else t)
        rows = bucket_size(len(jobs), self.batch_buckets)   # padding rows: the last session repeated, dropped
        audio = pad_rows(torch.stack(tokens).to(dev, dt), rows)
        noise = to_device(torch.cat([initial_latents((1, 4, run, h, h), j.state.generator) for j in jobs]), dev, dt)
        noise = pad_rows(noise, rows)
        hold = None
        x = noise
        if held:
            tail_noise = pad_rows(torch.cat([j.state.tail_noise for j in jobs]).to(dev, dt), rows)
            hold = Held(latents=pad_rows(torch.cat([j.state.tail_latents for j in jobs]).to(dev, dt), rows),
                        noise=tail_noise)
            x = torch.cat([tail_noise, noise], dim=2)
        settings = replace(self.sampling, rotation=0, context_frames=max(self.sampling.context_frames, held + run),
                           guidance=self.sampling.guidance if speech else 1.0,
                           steps=self.sampling.steps if speech else self.idle_steps)
        face = pad_rows(torch.cat([j.state.avatar.face for j in jobs]), rows)
        banks = [j.state.avatar.bank for j in jobs]
        banks += banks[-1:] * (rows - len(jobs))
        latents = sample(m.denoiser(banks), x, audio, face, settings, scheduler=make_scheduler(), held=hold)
        end = held + frames                      # the real frames: held ones, then this segment's
        latents, x, audio = latents[:len(jobs), :, :end], x[:len(jobs), :, :end], audio[:len(jobs), :end]
        k = self.live_overlap
        for r, j in enumerate(jobs):
            st = j.state
            st.tail_latents = latents[r:r + 1, :, -k:].clone() if k else None
            st.tail_noise = x[r:r + 1, :, -k:].clone() if k else None
            st.tail_audio = audio[r, -k:].clone() if k else None
            st.frames_done += frames
        return latents[:, :, held:]

    @torch.inference_mode()
    def decode(self, jobs: list[SegmentJob], latents: list[torch.Tensor]) -> list[np.ndarray]:
        """Latents from denoise -> (num_frames, size, size, 3) uint8 per job."""
        flat = torch.cat([lat[0].permute(1, 0, 2, 3) for lat in latents])
        pixels = self._to_pixels(flat)
        out, at = [], 0
        for lat in latents:
            out.append(pixels[at:at + lat.shape[2]])
            at += lat.shape[2]
        return out

    def generate(self, jobs: list[SegmentJob]) -> list[np.ndarray]:
        if not jobs:
            return []
        return self.decode(jobs, self.denoise(jobs))

    def memory_profile(self, batches: tuple[int, ...] = (1, 4)):
        """Device memory of this configuration (weights, per session, activations per batch), counted on a
        structure-only twin on the meta device (emo_stream.blocks.memory); None for a model without ModelParts."""
        from emo_stream.blocks.memory import profile_segments, weight_bytes

        parts = self.model
        if not isinstance(parts, ModelParts):
            return None
        if parts.device.type == "meta":
            twin = self
        else:
            from diffusers import AutoencoderTiny

            from emo_stream.families.echomimic.model import EchoMimicModel

            model = EchoMimicModel.build(parts.model.config, empty=True).eval().to("meta", parts.dtype)
            taesd = AutoencoderTiny.from_config(parts.taesd.config).to("meta", parts.dtype) if parts.taesd else None
            twin = EchoMimicBackend(ModelParts(model, taesd), size=self.size, fps=self.fps, steps=1,
                                    decoder=self.decoder, live_overlap=self.live_overlap,
                                    segment_frames=self.stream_segment_frames, context_frames=self.clip_frames)
        s = self.size
        avatar = twin.avatar_from_crop(np.zeros((s, s, 3), np.uint8), np.array([s / 4, s / 4, 3 * s / 4, 3 * s / 4]))
        f = twin.stream_segment_frames

        def jobs(n: int):
            c = parts.model.config
            tokens = torch.zeros(f, c.audio_tokens_per_frame, c.audio_dim, device="meta", dtype=parts.dtype)
            return twin, [SegmentJob(avatar, twin.new_state(avatar, k), tokens, f) for k in range(n)]
        return profile_segments("echomimic", s, weight_bytes(parts.model, parts.taesd), jobs,
                                lambda b, j: b.decode(j, b.denoise(j)), batches)

    def _to_pixels(self, latents: torch.Tensor) -> np.ndarray:
        """(N, 4, h, w) -> (N, size, size, 3) uint8."""
        images = []
        for chunk in latents.split(DECODE_CHUNK):
            img = self.model.decode_latents(chunk, self.decoder)
            images.append(((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(images).numpy()


class ModelParts:
    """EchoParts over emo_stream.families.echomimic's EchoMimicModel, plus an optional TAESD decoder."""

    def __init__(self, model: Any, taesd: Any = None):
        self.model, self.taesd = model, taesd
        self.weights = model.config.weights_set
        self.defaults = model.config.sampling

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def has_decoder(self, decoder: str) -> bool:
        return (self.taesd if decoder == "taesd" else self.model.vae) is not None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def decode_latents(self, latents: torch.Tensor, decoder: str = "vae") -> torch.Tensor:
        if decoder == "taesd":  # TAESD decodes SD-scaled latents directly (its scaling_factor is 1)
            return self.taesd.decode(latents.to(self.taesd.device, self.taesd.dtype)).sample
        return self.model.decode_latents(latents)

    def reference_bank(self, ref_latents: torch.Tensor) -> Any:
        return self.model.encode_reference(ref_latents)

    def face_feature(self, mask: torch.Tensor) -> torch.Tensor:
        return self.model.face_feature(mask).to(self.dtype)

    def compile(self, mode: str) -> None:
        """torch.compile the denoiser UNet (emo_stream.execution.compile_forward)."""
        from emo_stream.execution import compile_forward

        compile_forward(self.model.denoiser, mode, "EchoMimic denoiser UNet")

    def denoiser(self, banks: list[Any]) -> EchoDenoiser:
        # one batch of sessions: bank rows in session order (the model maps row r to bank row r % B)
        bank = banks[0] if len(banks) == 1 else {k: torch.cat([b[k] for b in banks]) for k in banks[0]}
        return self.model.denoiser_fn(bank)

    def whisper_features(self, waveform: np.ndarray) -> torch.Tensor:
        return self.model.audio_features(waveform)

    @property
    def whisper_mels(self) -> int:
        return self.model.whisper.n_mels

    def whisper_segments(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model.whisper.segment_states(mel)


def load_taesd(folder: str, device: torch.device, dtype: torch.dtype) -> Any:
    """<model>/taesd (a diffusers AutoencoderTiny folder, e.g. madebyollin/taesd), or None."""
    from pathlib import Path

    path = Path(folder) / "taesd"
    if not (path / "config.json").is_file():
        return None
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(str(path)).to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_parts(model: str, device: torch.device, dtype: torch.dtype | None = None,
               weights_set: str | None = None) -> EchoParts:
    """An EchoMimic download folder (as it comes) or our converted checkpoint -> the model, logging which
    weights set (acc or normal) was found."""
    from emo_stream.registry import model_family_for

    family, found = model_family_for("echomimic", model)
    log.info("found %s", found)
    kwargs = {"weights_set": weights_set} if weights_set else {}
    loaded = family.load_model(model, device=device, dtype=dtype, **kwargs)
    log.info("EchoMimic v1 %s weights loaded", loaded.config.weights_set)
    return ModelParts(loaded, load_taesd(model, device, dtype or torch.float32))


def create_backend(model: str | None = None, *, size: int = 512, fps: int = OFFLINE_FPS, device: str | None = None,
                   dtype: Any = None, **options: Any) -> EchoMimicBackend:
    """Registry factory (emo_stream.registry): --model is an EchoMimic download folder or our checkpoint of one."""
    if not model:
        raise ConfigError("the echomimic backend needs --model: the BadToBest/EchoMimic download folder (see README)")
    from emo_stream.blocks.device import parse_dtype, torch_device

    dev = torch_device(device)
    known = {"steps", "guidance", "decoder", "live_overlap", "segment_frames", "idle_steps", "face_analyzer",
             "compile", "extra_lookahead_frames"}
    unknown = set(options) - known - {"weights_set"}
    if unknown:
        raise ConfigError(f"unknown EchoMimic backend options: {', '.join(sorted(unknown))}")
    parts = load_parts(model, dev, parse_dtype(dtype, dev), options.pop("weights_set", None))
    return EchoMimicBackend(parts, size=size, fps=fps, **options)
