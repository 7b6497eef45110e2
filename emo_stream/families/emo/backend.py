"""EmoBackend: the EMO model behind the backend protocol (emo_stream.backend).

    backend = EmoBackend.load("tiny", size=64)           # preset (random weights), checkpoint folder or init YAML
    avatar = backend.prepare_avatar(rgb)                  # face crop + ReferenceNet, once per portrait
    state = backend.new_state(avatar, seed=0)
    feats = backend.encode_audio(window, start, n)        # wav2vec2, streaming windows with left context
    frames = backend.generate([SegmentJob(avatar, state, feats, n)])
    # or, to overlap decoding with the next denoise:  lat = backend.denoise(jobs); frames = backend.decode(jobs, lat)

Sampling: DDIM (diffusers) for `steps` steps on the clip's latents, classifier-free guidance on the audio
(unconditional branch = zeroed audio tokens), the clip conditioned on the cached reference features and on
the previous clip's last n frames (motion frames). Jobs of several sessions with the same frame count are
denoised in one batch. Idle (silent) jobs use `idle_steps`, no guidance, and silent-audio features computed
once, so they cost a fraction of speech.

Not thread-safe: one call at a time per backend (the engine serialises model work on its device).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from emo_stream.backend import AudioContext, BackendBase, SegmentJob
from emo_stream.blocks.checks import check_crop, check_fps, check_size
from emo_stream.timeline import SAMPLE_RATE
from emo_stream.errors import ConfigError, WeightsError
from emo_stream.execution import BATCH_BUCKETS, bucket_size, pad_rows, step_timesteps, to_device
from emo_stream.families.emo.config import PRESETS, load_config
from emo_stream.families.emo.model import CONFIG_FILE, EmoModel
from emo_stream.families.emo.reference_net import ReferenceFeatures

log = logging.getLogger(__name__)

DECODE_CHUNK = 16  # frames per VAE decode call: bounds activation memory at 512 px


@dataclass
class EmoAvatar:
    """A prepared portrait: its crop, face mask, reference latent and cached ReferenceNet features."""

    image: np.ndarray                  # (size, size, 3) uint8 crop the model animates
    face_box: np.ndarray               # (4,) x0 y0 x1 y1 in crop pixels
    face_mask: torch.Tensor            # (1, 1, size, size)
    latent: torch.Tensor               # (1, 4, h, w) scaled VAE latent
    reference: ReferenceFeatures       # batch 1, on the model's device
    motion0: dict[str, torch.Tensor]   # motion features before any frame exists: the reference, n times


@dataclass
class EmoState:
    """Per-session sampling state."""

    avatar: EmoAvatar
    seed: int
    generator: torch.Generator
    motion_latents: torch.Tensor | None = None   # (1, 4, n, h, w) last n generated frames' latents
    frames_done: int = 0
    speed: float | None = None                   # head-speed control; None: the model's default


def load_model(model: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None,
               seed: int = 0) -> EmoModel:
    """Preset name (random weights, seeded), checkpoint folder (from_pretrained) or init YAML -> EmoModel.

    An init YAML names pretrained folders:  {preset: sd15, sd15: DIR, wav2vec2: DIR, motion_adapter: DIR,
    taesd: DIR, vae: DIR} (paths relative to the YAML file; the last three optional).
    """
    spec = str(model)
    path = Path(spec).expanduser()
    if spec in PRESETS:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        rng_devices = [dev.index or 0] if dev.type == "cuda" else []
        # random weights, reproducible, global RNG untouched; initialised on the target device (the sd15
        # preset's ~2.5B parameters initialise in seconds on a GPU, minutes on a CPU)
        with torch.random.fork_rng(devices=rng_devices), dev:
            torch.manual_seed(seed)
            m = EmoModel.build(load_config(spec))
    elif path.is_dir():
        from emo_stream.registry import model_family_for

        model_family_for("emo", str(path))   # an EchoMimic/Hallo folder: name the backend that runs it
        m = EmoModel.from_pretrained(path)
    elif path.is_file() and path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict) or "sd15" not in data or "wav2vec2" not in data:
            raise ConfigError(f"{path}: an init file needs keys sd15 and wav2vec2 (folders), optionally "
                              f"preset, motion_adapter, taesd, vae")
        from emo_stream.families.emo.from_folders import init_from_folders

        base = path.parent
        folder = lambda key: (base / data[key]) if data.get(key) else None  # noqa: E731 (paths relative to the file)
        unknown = set(data) - {"preset", "sd15", "wav2vec2", "motion_adapter", "taesd", "vae"}
        if unknown:
            raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
        m = init_from_folders(data.get("preset", "sd15"), sd15=folder("sd15"), wav2vec2=folder("wav2vec2"),
                              motion_adapter=folder("motion_adapter"), taesd=folder("taesd"), vae=folder("vae"))
    else:
        raise WeightsError(f"model not found: {spec} (give an EchoMimic or Hallo download folder; a checkpoint "
                           f"folder with {CONFIG_FILE}; a preset: {', '.join(PRESETS)}; or an init .yaml)")
    m.eval()
    if device is not None or dtype is not None:
        m.to(device=device, dtype=dtype)
    return m


class EmoBackend(BackendBase):
    name = "emo"

    def __init__(self, model: EmoModel, size: int = 512, fps: int = 25, steps: int | None = None,
                 guidance: float | None = None, decoder: str | None = None, idle_steps: int | None = None,
                 face_analyzer=None, scheduler: str | None = None, compile: str = "off",
                 channels_last: bool | None = None):
        cfg = model.config
        check_size(size, cfg.size_multiple, f"model {cfg.name!r}")
        self.spf = check_fps(fps)
        self.model = model
        self.size, self.fps = size, fps
        self.steps = int(cfg.sampling.steps if steps is None else steps)
        # silence: fewer steps (and no guidance, see _denoise_group)
        self.idle_steps = int(idle_steps if idle_steps is not None
                              else min(cfg.sampling.idle_steps, max(1, self.steps // 2)))
        self.guidance = float(cfg.sampling.guidance if guidance is None else guidance)
        self.decoder = decoder or cfg.sampling.decoder
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise ConfigError(f"guidance must be a number >= 0 (1 = no guidance; got {self.guidance})")
        if self.steps < 1 or self.idle_steps < 1:
            raise ConfigError(f"steps must be >= 1 (got {self.steps})")
        if self.decoder not in ("vae", "taesd"):
            raise ConfigError(f"decoder must be vae or taesd (got {self.decoder!r})")
        if self.decoder == "taesd" and model.taesd is None:
            raise ConfigError("decoder taesd asked for, but the model has no TAESD decoder")
        self.clip_frames = cfg.clip_frames
        # live: shorter than an offline clip for latency, long enough for temporal context and batching
        self.stream_segment_frames = min(8, cfg.clip_frames)
        self.motion_frames = cfg.motion_frames
        self.audio_context = AudioContext(left_samples=int(cfg.audio.left_context_seconds * SAMPLE_RATE),
                                          lookahead_frames=cfg.audio.window)
        self._face_analyzer = face_analyzer
        self._silence: dict[int, torch.Tensor] = {}
        self._scheduler_config = cfg.noise.scheduler_kwargs()   # the checkpoint's own noise schedule
        self._scheduler_name = scheduler or cfg.sampling.scheduler
        if self._scheduler_name not in ("ddim", "lcm"):
            raise ConfigError(f"scheduler must be ddim or lcm (got {self._scheduler_name!r})")
        from emo_stream.execution import ExecutionOptions, apply_execution

        # channels-last / torch.compile on CUDA; plain eager on the CPU (emo_stream/execution.py)
        self.execution = apply_execution(model, ExecutionOptions(compile=compile, channels_last=channels_last))
        # compiled: batches padded to a few sizes and short (end-of-speech) segments to the segment length, so
        # the compiled denoiser sees a bounded set of shapes whatever the number of sessions
        compiled = self.execution["compile"] != "off"
        self.batch_buckets: tuple[int, ...] = BATCH_BUCKETS if compiled else ()
        self.pad_frames = compiled

    @classmethod
    def load(cls, model: str = "tiny", size: int = 512, fps: int = 25, device: str | None = None,
             steps: int | None = None, guidance: float | None = None, decoder: str | None = None,
             dtype: Any = None, **options: Any) -> "EmoBackend":
        """Build the backend from a preset name, a checkpoint folder or an init YAML (see load_model)."""
        from emo_stream.blocks.device import parse_dtype, torch_device

        dev = torch_device(device)
        if dev.type == "cpu":
            _default_cpu_threads()
        m = load_model(model, device=dev, dtype=parse_dtype(dtype, dev))
        unknown = set(options) - {"idle_steps", "face_analyzer", "scheduler", "compile", "channels_last"}
        if unknown:
            raise ConfigError(f"unknown EMO backend options: {', '.join(sorted(unknown))}")
        return cls(m, size=size, fps=fps, steps=steps, guidance=guidance, decoder=decoder, **options)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- avatar --------------------------------------------------------------------------------
    def prepare_avatar(self, image: np.ndarray) -> EmoAvatar:
        """Detect the face, crop and align to the model size, encode the reference once."""
        from emo_stream.face import prepare_portrait

        crop = prepare_portrait(image, self.size, self.portrait_analyzer(image))
        return self.avatar_from_crop(crop.image, crop.face.box)

    @torch.inference_mode()
    def avatar_from_crop(self, image: np.ndarray, face_box: np.ndarray) -> EmoAvatar:
        """An already cropped (size, size, 3) portrait and its face box -> EmoAvatar (no face detection)."""
        from emo_stream.face import face_region_mask

        check_crop(image, self.size)
        m = self.model
        # the head moves during a clip: EMO's mask is the union of the clip's face boxes, so widen the box
        mask = torch.from_numpy(face_region_mask([face_box], self.size, margin=0.25))[None, None].to(m.device)
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1
        latent = m.encode_image(x.to(m.device)).to(m.dtype)
        reference = m.encode_reference(latent, project=True)  # its key/values too: once per avatar
        return EmoAvatar(image=image, face_box=np.asarray(face_box, np.float32), face_mask=mask, latent=latent,
                         reference=reference, motion0=m.motion_from_reference(reference))

    def new_state(self, avatar: EmoAvatar, seed: int = 0) -> EmoState:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        return EmoState(avatar=avatar, seed=int(seed), generator=gen)

    # ---- audio ---------------------------------------------------------------------------------
    def encode_audio(self, audio: np.ndarray, start: int, num_frames: int) -> torch.Tensor:
        """(num_frames, 2m + 1, feature_dim) wav2vec2 features; audio[:start] is left context."""
        return self.model.audio_encoder.encode(audio, start, num_frames, self.fps)

    def _silent_features(self, num_frames: int) -> torch.Tensor:
        if num_frames not in self._silence:
            left = self.audio_context.left_samples
            zeros = np.zeros(left + (num_frames + self.audio_context.lookahead_frames) * self.spf, np.float32)
            self._silence[num_frames] = self.encode_audio(zeros, left, num_frames)
        return self._silence[num_frames]

    # ---- sampling ------------------------------------------------------------------------------
    def _scheduler(self):
        from diffusers import DDIMScheduler, LCMScheduler

        if self._scheduler_name == "lcm":
            return LCMScheduler(**self._scheduler_config)
        return DDIMScheduler(**self._scheduler_config)

    @torch.inference_mode()
    def denoise(self, jobs: list[SegmentJob]) -> list[torch.Tensor]:
        """Sample each job's clip latents, (1, 4, num_frames, h, w), and advance its motion frames.

        Jobs are grouped by (num_frames, speech) and each group is one batched sampling loop.
        """
        out: list[torch.Tensor | None] = [None] * len(jobs)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, job in enumerate(jobs):
            if job.num_frames < 1:
                raise ValueError("num_frames must be >= 1")
            speech = bool(job.speech and job.features is not None)
            groups.setdefault((job.num_frames, speech), []).append(i)
        for (frames, speech), idx in groups.items():
            latents = self._denoise_group([jobs[i] for i in idx], frames, speech)
            for k, i in enumerate(idx):
                out[i] = latents[k:k + 1]
        for job, lat in zip(jobs, out):
            self._advance(job.state, lat)
        return out  # type: ignore[return-value]

    def _denoise_group(self, jobs: list[SegmentJob], frames: int, speech: bool) -> torch.Tensor:
        m = self.model
        dev, dt = m.device, m.dtype
        steps = self.steps if speech else self.idle_steps
        guidance = self.guidance if speech else 1.0
        feats = torch.stack([(j.features if speech else self._silent_features(frames)).to(dev) for j in jobs])
        if feats.shape[1] != frames:
            raise ValueError(f"features cover {feats.shape[1]} frames, the job asks for {frames}")
        run = frames
        if self.pad_frames and frames < self.stream_segment_frames:
            # a short segment runs at the full length, its tail silent (what follows the end of speech); the
            # extra frames are dropped
            run = self.stream_segment_frames
            quiet = self._silent_features(run - frames).to(dev, feats.dtype)
            feats = torch.cat([feats, quiet[None].expand(len(jobs), *quiet.shape)], dim=1)
        reference = ReferenceFeatures.cat([j.state.avatar.reference for j in jobs])
        motion = self._motion_features([j.state for j in jobs])
        mask = torch.cat([j.state.avatar.face_mask for j in jobs])
        # host data: the model decides the uniform-speed shortcut on it without reading the device back
        speed = torch.tensor([[m.config.speed.default if j.state.speed is None else j.state.speed] * run
                              for j in jobs])
        cond = m.condition(reference, feats, mask, speed, motion, cache=True)
        rows = bucket_size(len(jobs), self.batch_buckets)
        cond = cond.padded(rows)
        if self.execution["compile"] != "off":
            # CUDA graphs reuse their outputs' memory on the next replay: keep no tensor made inside the
            # compiled denoiser across steps (the audio/speed K/V are tiny; the reference K/V come from outside)
            cond.context.kv_cache = None
        from emo_stream.families.emo.model import Conditioning

        use_cfg = guidance != 1.0
        if use_cfg:
            cond = Conditioning.cat(cond, cond.with_null_audio())
        h = w = self.size // m.config.latent_factor
        noise = [torch.randn((1, m.config.latent_channels, run, h, w), generator=j.state.generator) for j in jobs]
        x = pad_rows(to_device(torch.cat(noise), dev, dt), rows)
        sched = self._scheduler()
        timesteps = step_timesteps(sched, steps, dev)
        x = x * sched.init_noise_sigma
        step_kwargs = {"generator": self._lcm_generators(jobs, dev, rows)} if self._scheduler_name == "lcm" else {}
        # the per-step loop: no host sync in it (tests/test_device_discipline.py counts them)
        for t, t_dev in timesteps:
            inp = torch.cat([x, x]) if use_cfg else x
            eps = m.predict_noise(sched.scale_model_input(inp, t), t_dev, cond)
            if use_cfg:
                e_c, e_u = eps.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            x = sched.step(eps, t, x, return_dict=False, **step_kwargs)[0]
        return x[:len(jobs), :, :frames]

    @staticmethod
    def _lcm_generators(jobs: list[SegmentJob], dev: torch.device, rows: int) -> list[torch.Generator] | None:
        """LCM re-noises between steps: one generator per batch row on the model's device, seeded from the
        session's own (host) generator, so the noise is drawn where it is used (a host generator means a
        blocking host->device copy at every step). None on the meta device (no generators there)."""
        if dev.type == "meta":
            return None
        seeds = [int(torch.randint(0, 2 ** 62, (1,), generator=j.state.generator)) for j in jobs]
        seeds += [0] * (rows - len(jobs))   # batch-bucket padding rows
        return [torch.Generator(dev).manual_seed(s) for s in seeds]

    def _motion_features(self, states: list[EmoState]) -> dict[str, torch.Tensor]:
        """Per-state motion features: the reference until frames exist, then the ReferenceNet on the last
        n frames' latents (one batched pass for every state that has them)."""
        have = [i for i, s in enumerate(states) if s.motion_latents is not None]
        encoded = self.model.encode_motion(torch.cat([states[i].motion_latents for i in have])) if have else {}
        rows: list[dict[str, torch.Tensor]] = []
        for i, s in enumerate(states):
            if i in have:
                k = have.index(i)
                rows.append({site: v[k:k + 1] for site, v in encoded.items()})
            else:
                rows.append(s.avatar.motion0)
        return {site: torch.cat([r[site] for r in rows]) for site in rows[0]}

    def _advance(self, state: EmoState, latents: torch.Tensor) -> None:
        n = self.motion_frames
        prev = state.motion_latents if state.motion_latents is not None else \
            state.avatar.latent[:, :, None].expand(-1, -1, n, -1, -1)
        state.motion_latents = torch.cat([prev, latents], dim=2)[:, :, -n:].contiguous()
        state.frames_done += latents.shape[2]

    @torch.inference_mode()
    def decode(self, jobs: list[SegmentJob], latents: list[torch.Tensor]) -> list[np.ndarray]:
        """Latents from denoise -> (num_frames, size, size, 3) uint8 per job (VAE or TAESD)."""
        flat = torch.cat([lat[0].permute(1, 0, 2, 3) for lat in latents])  # (total frames, 4, h, w)
        images = []
        for chunk in flat.split(DECODE_CHUNK):
            img = self.model.decode_latents(chunk, self.decoder)
            images.append(((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        pixels = torch.cat(images).numpy()
        out, at = [], 0
        for lat in latents:
            f = lat.shape[2]
            out.append(pixels[at:at + f])
            at += f
        return out

    def generate(self, jobs: list[SegmentJob]) -> list[np.ndarray]:
        if not jobs:
            return []
        return self.decode(jobs, self.denoise(jobs))

    def memory_profile(self, batches: tuple[int, ...] = (1, 4)):
        """Device memory of this configuration (weights, per session, activations per batch), counted on a
        structure-only twin on the meta device: no device memory is used (emo_stream.blocks.memory)."""
        from emo_stream.blocks.memory import profile_segments, weight_bytes

        m = self.model
        twin = self if m.device.type == "meta" else EmoBackend(
            EmoModel.build(m.config, empty=True).eval().to("meta", m.dtype), size=self.size, fps=self.fps,
            steps=1, guidance=self.guidance, decoder=self.decoder)
        s = self.size
        avatar = twin.avatar_from_crop(np.zeros((s, s, 3), np.uint8), np.array([s / 4, s / 4, 3 * s / 4, 3 * s / 4]))
        f, cfg = twin.stream_segment_frames, m.config

        def jobs(n: int):
            feats = torch.zeros(f, 2 * cfg.audio.window + 1, cfg.audio_feature_dim, device="meta", dtype=m.dtype)
            return twin, [SegmentJob(avatar, twin.new_state(avatar, k), feats, f) for k in range(n)]
        return profile_segments("emo", s, weight_bytes(m), jobs, lambda b, j: b.decode(j, b.denoise(j)), batches)


def cpu_threads_default(cores: int | None = None) -> int:
    """Torch threads for EMO on the CPU: half the cores, at most 8. Torch's default (every core) lost to
    one thread by 3.4x on a 2-core box shared with the server's own threads (event loop, encoders, JPEG):
    the diffusion thread pool and those threads fight over the same cores."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def _default_cpu_threads() -> None:
    # only when nobody chose: OMP_NUM_THREADS / MKL_NUM_THREADS, or torch.set_num_threads before loading
    if any(os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return
    if torch.get_num_threads() != _TORCH_THREADS_AT_IMPORT:
        return
    threads = cpu_threads_default()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("EMO on the CPU: %d torch thread(s) of %d cores (OMP_NUM_THREADS chooses)", threads, os.cpu_count())


_TORCH_THREADS_AT_IMPORT = torch.get_num_threads()  # torch's own choice unless changed before this import


def create_backend(model: str | None = None, *, size: int = 512, fps: int = 25, device: str | None = None,
                   **options: Any) -> EmoBackend:
    """Registry factory (emo_stream.registry): a checkpoint folder, init YAML or preset."""
    if not model:
        # once this fell back to the tiny preset: minutes of random-weight noise after one warning line
        raise ConfigError("the emo backend needs --model: a checkpoint folder (emo-stream train), an "
                          "EchoMimic/Hallo download folder, or a preset like sd15/tiny for random-weight benchmarks")
    if model in PRESETS:
        # easy to get by mistake (--backend emo without --model): say why the video will be noise
        log.warning("EMO model %r is a preset with random weights: the video will be noise. For real "
                    "output pass --model with a trained checkpoint folder (see README).", model)
    return EmoBackend.load(model, size=size, fps=fps, device=device, **options)
