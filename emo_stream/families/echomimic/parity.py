"""`emo-stream parity` for EchoMimic v1 golden sets (case.json "model": "echomimic-v1").

Loads the set's `weights/` through the same importer users run (importer.load_download), sized by the set's
own configs (case.json unet_2d_config / unet_3d_config / unet_additional_kwargs / face_locator /
weights.whisper_dims), and replays every case listed: the face locator, the audio features, one denoiser call
and the guidance pair, and each sampler run through emo_stream.families.echomimic.sampling (EchoMimic's pipelines:
windows, rotation, averaging, guidance, acc pseudo-velocity, the normal pipeline's overlap-sum quirk).
Returns {case.tensor: max abs error}.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from emo_stream.families.echomimic.config import (ARCHITECTURE, EchoMimicConfig, FaceLocatorConfig, sd15_denoiser,
                                                sd15_reference_unet)
from emo_stream.parity import GoldenFormatError

log = logging.getLogger(__name__)

_BLOCKS_3D = {"CrossAttnDownBlock3D": "CrossAttnDownBlockMotion", "DownBlock3D": "DownBlockMotion",
              "CrossAttnUpBlock3D": "CrossAttnUpBlockMotion", "UpBlock3D": "UpBlockMotion"}


def _need(case: dict, key: str, where: str = "case.json") -> Any:
    if key not in case:
        raise GoldenFormatError(f"{where}: missing {key!r}")
    return case[key]


def config_from_case(case: dict, weights: Path | None = None) -> EchoMimicConfig:
    """Our EchoMimicConfig from a golden set's EchoMimic-style configs (GoldenFormatError for variants our
    model does not implement). The face locator and whisper sizes come from case.json ("face_locator",
    "weights.whisper_dims"), or, where it leaves them out, from the files in `weights`."""
    import inspect

    from diffusers import UNet2DConditionModel

    c2, c3 = dict(_need(case, "unet_2d_config")), dict(_need(case, "unet_3d_config"))
    add = _need(case, "unet_additional_kwargs")
    mm = add.get("motion_module_kwargs", {})
    levels = len(c3["block_out_channels"])
    checks = {
        "motion modules at every level": sorted(add.get("motion_module_resolutions", [])) ==
        [2 ** i for i in range(levels)] and add.get("use_motion_module", True) and not add.get(
            "motion_module_decoder_only", False),
        "a mid-block motion module": add.get("motion_module_mid_block", True),
        "Vanilla motion modules with 2 Temporal_Self attentions": add.get("motion_module_type", "Vanilla") ==
        "Vanilla" and mm.get("attention_block_types", ["Temporal_Self"] * 2) == ["Temporal_Self", "Temporal_Self"],
        "temporal position encoding": mm.get("temporal_position_encoding", False),
        "temporal_attention_dim_div 1": mm.get("temporal_attention_dim_div", 1) == 1,
        "per-frame (inflated) group norm": add.get("use_inflated_groupnorm", True),
        "no cross-frame or extra temporal attention in the spatial blocks": not add.get(
            "unet_use_cross_frame_attention") and not add.get("unet_use_temporal_attention"),
        "sinusoidal timesteps flip_sin_to_cos=True, freq_shift=0, center_input_sample=False":
            c3.get("flip_sin_to_cos", True) and c3.get("freq_shift", 0) == 0 and not c3.get("center_input_sample"),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise GoldenFormatError(f"case.json: unsupported EchoMimic variant (this model implements {bad[0]})")
    # the 2D config is diffusers 0.24's UNet2DConditionModel kwargs, all still accepted
    allowed = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    unknown = sorted(set(c2) - allowed)
    if unknown:
        raise GoldenFormatError(f"case.json unet_2d_config: unknown key {unknown[0]!r}")
    ref = sd15_reference_unet()
    ref.update(c2)
    heads = c3["attention_head_dim"]
    if isinstance(heads, list):
        if len(set(heads)) != 1:
            raise GoldenFormatError("case.json unet_3d_config: per-level attention_head_dim is not supported")
        heads = heads[0]
    den = sd15_denoiser(c3["block_out_channels"], c3["layers_per_block"], heads, c3["norm_num_groups"],
                        add["cross_attention_dim"], mm.get("num_attention_heads", 8),
                        mm.get("temporal_position_encoding_max_len", 24))
    try:
        den.update(down_block_types=[_BLOCKS_3D[t] for t in c3["down_block_types"]],
                   up_block_types=[_BLOCKS_3D[t] for t in c3["up_block_types"]])
    except KeyError as exc:
        raise GoldenFormatError(f"case.json: unknown 3D block type {exc}") from None
    for key in ("sample_size", "in_channels", "out_channels", "norm_eps", "act_fn", "mid_block_scale_factor",
                "downsample_padding", "use_linear_projection"):
        if key in c3:
            den[key] = c3[key]
    blocks = int(mm.get("num_transformer_block", 2))
    den.update(temporal_transformer_layers_per_block=blocks, temporal_transformer_layers_per_mid_block=blocks)
    fl, dims = case.get("face_locator"), (case.get("weights") or {}).get("whisper_dims")
    if fl is None or dims is None:
        if weights is None:
            raise GoldenFormatError(f"case.json: missing {'face_locator' if fl is None else 'weights.whisper_dims'}")
        from emo_stream.families.echomimic.importer import infer_config, read_parts

        _, files, parts, file_dims = read_parts(weights, weights_set_of(case))
        inferred = infer_config(parts["denoiser"], parts["motion"], parts["face_locator"], file_dims, files)
        dims = dims if dims is not None else inferred.whisper
        face = inferred.face_locator
        if fl is None:
            fl = {"block_out_channels": face.channels, "conditioning_channels": face.conditioning_channels,
                  "conditioning_embedding_channels": face.out_channels}
    return EchoMimicConfig(reference_unet=ref, denoiser=den, whisper={k: int(dims[k]) for k in (
        "n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")},
        face_locator=FaceLocatorConfig(channels=list(fl["block_out_channels"]),
                                       out_channels=int(fl["conditioning_embedding_channels"]),
                                       conditioning_channels=int(fl.get("conditioning_channels", 1))))


def weights_set_of(case: dict) -> str | None:
    """The weights set a golden set's case.json names ("acc" when it lists denoising_unet_acc.pth)."""
    names = set(case.get("weights", {}))
    if "denoising_unet_acc.pth" in names:
        return "acc"
    if "denoising_unet.pth" in names:
        return "normal"
    return None


class _Golden:
    """Tensors of a golden set's safetensors files, with one-line errors for what is missing."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, dict[str, torch.Tensor]] = {}

    def has(self, file: str, key: str) -> bool:
        return key in self.keys(file)

    def keys(self, file: str) -> list[str]:
        self._read(file)
        return list(self.files[file])

    def _read(self, file: str) -> None:
        if file not in self.files:
            from safetensors.torch import load_file

            path = self.root / file
            if not path.is_file():
                raise GoldenFormatError(f"{path} is missing")
            try:
                self.files[file] = load_file(str(path))
            except Exception as exc:
                raise GoldenFormatError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None

    def __call__(self, file: str, key: str) -> torch.Tensor:
        self._read(file)
        if key not in self.files[file]:
            raise GoldenFormatError(f"{self.root / file}: tensor {key!r} is missing")
        return self.files[file][key]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _read_wav(path: Path) -> torch.Tensor:
    """PCM16 mono WAV -> int16 / 32768, what whisper.audio.load_audio returns for a 16 kHz mono file."""
    from emo_stream.pcm import read_wav16

    return torch.from_numpy(read_wav16(path, GoldenFormatError))


def run_cases(golden_dir: Path, only: set[str] | None = None) -> dict[str, float]:
    """{case.tensor: max abs error}; only: case groups to replay (face_locator, audio, denoiser_single, and
    the sampler cases' names), all when None. Every case section is optional (a set without e.g.
    std_long_video_cfg simply does not report it); an output tensor is compared when its file holds it, and
    one that the section's "tensors" lists but the file lacks is an error."""
    from emo_stream.families.echomimic.audio import frame_rows, log_mel
    from emo_stream.families.echomimic.importer import load_download
    from emo_stream.families.echomimic.layers import face_mask
    from emo_stream.parity import read_case

    golden_dir = Path(golden_dir)
    case = read_case(golden_dir)
    if case["model"] != ARCHITECTURE:
        raise GoldenFormatError(f"{golden_dir}: case.json model is {case['model']!r}, not {ARCHITECTURE!r}")
    fc, ac, dc = (case.get(k) or {} for k in ("face_locator_case", "audio_case", "denoiser_single_case"))
    samplers = case.get("sampler_cases") or {}
    if not (fc or ac or dc or samplers):
        raise GoldenFormatError(f"{golden_dir / 'case.json'}: lists no case (face_locator_case, audio_case, "
                                f"denoiser_single_case, sampler_cases)")
    if only is not None:
        known = {"face_locator", "audio", "denoiser_single", *samplers}
        unknown = sorted(set(only) - known)
        if unknown:
            raise GoldenFormatError(f"unknown case {unknown[0]!r} (known: {', '.join(sorted(known))})")
    weights = golden_dir / "weights"
    if not weights.is_dir():
        raise GoldenFormatError(f"{golden_dir}: no weights/ folder")
    config = config_from_case(case, weights)
    model = load_download(weights, config=config, weights_set=weights_set_of(case), with_vae=False)
    scheduler_kwargs = case.get("noise_scheduler_kwargs", {})
    g = _Golden(golden_dir)
    errors: dict[str, float] = {}

    def wanted(group: str, section: dict) -> bool:
        return bool(section) and (only is None or group in only)

    # face locator
    ff = fc.get("file", "face_locator.safetensors")
    if wanted("face_locator", fc):
        h, w = _need(fc, "image_hw", "case.json face_locator_case")
        mask = face_mask(_need(fc, "face_box_xyxy_pixels", "case.json face_locator_case"), h, w, clamp=False)
        _compare(errors, g, ff, fc, "face_locator.face_mask", "face_mask", mask)
        _compare(errors, g, ff, fc, "face_locator.face_feature", "face_feature",
                 lambda: model.face_feature(g(ff, "face_mask")))

    # audio features
    af = ac.get("file", "audio.safetensors")
    if wanted("audio", ac):
        wav = _read_wav(golden_dir / str(ac.get("wav", "audio.wav")).split()[0])
        fps = ac.get("fps", model.config.fps)
        feats = model.audio_features(wav)
        chunks = model.audio_tokens(wav, fps=fps)
        for key, ours in (("waveform", wav), ("log_mel", lambda: log_mel(wav, model.whisper.n_mels)),
                          ("whisper_features", feats), ("whisper_chunks", chunks),
                          ("chunk_feature_index", lambda: frame_rows(len(chunks), feats.shape[0], fps))):
            _compare(errors, g, af, ac, f"audio.{key}", key, ours)

    # the denoiser cases take the reference face feature and audio tokens (an upstream error is reported
    # once, by its own case); read only when a denoiser case runs
    def gold_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        if not fc or not ac:
            raise GoldenFormatError(f"{golden_dir / 'case.json'}: the denoiser cases need face_locator_case and "
                                    f"audio_case (their face_feature and whisper_chunks are the inputs)")
        return g(af, "whisper_chunks"), g(ff, "face_feature")

    # one denoiser call, bank in fp16 (as EchoMimic) and fp32, and the guidance pair
    if wanted("denoiser_single", dc):
        errors.update(_denoiser_single(model, g, dc.get("file", "denoiser_single.safetensors"), dc, *gold_inputs()))

    # sampler runs
    for name, sc in samplers.items():
        if wanted(name, sc):
            errors.update(_sampler_case(model, g, name, sc, scheduler_kwargs, *gold_inputs()))
    return errors


def _compare(errors: dict[str, float], g: "_Golden", file: str, section: dict, name: str, key: str, ours) -> None:
    """errors[name] = max abs error of `ours` (a tensor or a function making it) vs file:key when the file
    holds it; listed in the section's "tensors" but missing is an error; neither: not reported."""
    if g.has(file, key):
        errors[name] = _err(ours() if callable(ours) else ours, g(file, key))
    elif key in listed_tensors(section):
        raise GoldenFormatError(f"{g.root / file}: tensor {key!r} is listed in case.json but missing")


def listed_tensors(section: dict) -> set[str]:
    """The tensor names a case section promises: its "tensors" and "outputs" keys ("a / b" names two) and
    its own keys holding a shape (e.g. audio_case "log_mel": [80, 100])."""
    names = set(section.get("tensors") or {})
    names |= {part.strip() for key in (section.get("outputs") or {}) for part in str(key).split("/")}
    names |= {k for k, v in section.items() if isinstance(v, list) and v and all(isinstance(x, int) for x in v)}
    return names


def _denoiser_single(model, g: _Golden, df: str, dc: dict, gold_chunks, gold_face) -> dict[str, float]:
    errors: dict[str, float] = {}
    x, ref = g(df, "latents"), g(df, "ref_latents")
    if g.has(df, "timestep"):
        t = g(df, "timestep").reshape(())
    else:
        t = torch.tensor(int(_need(dc, "timestep", "case.json denoiser_single_case")))
    audio = gold_chunks[: x.shape[2]][None]
    bank = model.encode_reference(ref)
    _compare(errors, g, df, dc, "denoiser_single.pred", "pred",
             lambda: model.denoise(x, t, audio, gold_face, None, bank))
    _compare(errors, g, df, dc, "denoiser_single.pred_bank_fp32", "pred_bank_fp32",
             lambda: model.denoise(x, t, audio, gold_face, None, _bank_fp32(model, ref)))
    if any(g.has(df, k) or k in listed_tensors(dc) for k in ("cfg_pred_uncond", "cfg_pred_cond")):
        pair = model.denoise(x.repeat(2, 1, 1, 1, 1), t, torch.cat([torch.zeros_like(audio), audio]),
                             torch.cat([torch.zeros_like(gold_face), gold_face]), torch.tensor([False, True]), bank)
        _compare(errors, g, df, dc, "denoiser_single.cfg_pred_uncond", "cfg_pred_uncond", pair[:1])
        _compare(errors, g, df, dc, "denoiser_single.cfg_pred_cond", "cfg_pred_cond", pair[1:])
    return errors


def _sampler_case(model, g: _Golden, name: str, sc: dict, scheduler_kwargs: dict, gold_chunks,
                  gold_face) -> dict[str, float]:
    import re

    from emo_stream.families.echomimic.sampling import (EchoSampling, context_windows, initial_latents, make_scheduler,
                                               rotated, sample)

    errors: dict[str, float] = {}
    where = f"case.json sampler_cases.{name}"
    sf = sc.get("file", f"{name}.safetensors")
    acc = "_acc" in sc.get("pipeline", "")
    settings = EchoSampling(steps=int(_need(sc, "num_inference_steps", where)),
                            guidance=float(_need(sc, "guidance_scale", where)),
                            context_frames=int(_need(sc, "context_frames", where)),
                            context_overlap=int(_need(sc, "context_overlap", where)),
                            pseudo_velocity=acc, sum_unguided_overlaps=not acc)
    if int(sc.get("context_stride", 1)) != 1 or int(sc.get("context_batch_size", 1)) != 1:
        raise GoldenFormatError(f"{where}: only context_stride 1 and context_batch_size 1 are replayed")
    scheduler = make_scheduler(**scheduler_kwargs)
    x0 = g(sf, "initial_latents")
    frames = x0.shape[2]
    seed = re.search(r"manual_seed\((\d+)\)", str(sc.get("generator", "")))
    if seed:   # prepare_latents: randn from that generator, clamped (the pipeline's own noise)
        noise = initial_latents(tuple(x0.shape), torch.Generator().manual_seed(int(seed.group(1))))
        errors[f"{name}.initial_latents"] = _err(noise, x0)
    # the context windows our sampler uses, against the ones the set lists (step 0 and after rotation)
    base = context_windows(frames, settings.context_frames, settings.context_overlap)
    listed = {"windows_step0": base,
              "windows_per_step_after_rotation": [rotated(base, i, settings.rotation, frames)
                                                  for i in range(settings.steps)]}
    shown = {k: v for k, v in listed.items() if k in sc}
    if shown:   # (per step: the steps replayed)
        same = all(sc[k][: len(v)] == v for k, v in shown.items())
        errors[f"{name}.windows"] = 0.0 if same else float("inf")
    bank = model.encode_reference(g(sf, "ref_latents"))
    outputs: dict[int, torch.Tensor] = {}
    calls: dict[int, list[torch.Tensor]] = {}
    denoise = model.denoiser_fn(bank)

    def recording(*args, _denoise=denoise, _calls=calls, _outputs=outputs):
        out = _denoise(*args)
        _calls.setdefault(len(_outputs), []).append(out)   # calls of the step in progress
        return out

    final = sample(recording, x0, gold_chunks[:frames][None], gold_face, settings, scheduler=scheduler,
                   on_step=lambda i, v: outputs.__setitem__(i, v))
    scheduler.set_timesteps(settings.steps)
    _compare(errors, g, sf, sc, f"{name}.timesteps", "timesteps", scheduler.timesteps)
    for i in range(settings.steps):
        _compare(errors, g, sf, sc, f"{name}.step{i}_model_output", f"step{i}_model_output", outputs[i])
    stored = set(g.keys(sf)) | listed_tensors(sc)
    for key in sorted(stored):
        m = re.fullmatch(r"step(\d+)_call(\d+)_out", key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            ours = calls.get(i, [])
            _compare(errors, g, sf, sc, f"{name}.{key}", key, ours[j] if j < len(ours) else torch.empty(0))
    _compare(errors, g, sf, sc, f"{name}.final_latents", "final_latents", final)
    return errors


def _bank_fp32(model, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bank kept in float32 (not what EchoMimic does; its golden output helps tell the cast apart)."""
    saved = model.config.bank_dtype
    model.config.bank_dtype = "float32"
    try:
        return model.encode_reference(ref)
    finally:
        model.config.bank_dtype = saved
