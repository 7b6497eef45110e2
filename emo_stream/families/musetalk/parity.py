"""`emo-stream parity` for MuseTalk golden sets (case.json "model": "musetalk").

The set's `weights/` load through the same loader users run; every case the set lists is replayed with the
settings it gives (audio length and fps, frame size, box, extra margin, seed, batch, rows, cheek widths, crop
boxes) and compared with MuseTalk's outputs:

    audio        log-mel, encoder hidden states (first 2 s), per-frame whisper chunks
    avatar       the face crop (cv2 LANCZOS4), latents for the UNet (sampled, seeded) and their means
    unet_decode  positional encoding, one batched UNet call at t=0, VAE decode to uint8 (+ the batch's inputs
                 against our own audio chunks and latents)
    blend        face parsing in three modes, the offline paste (get_image), the prepared real-time masks,
                 the real-time paste (PIL), and our tensor paste (the live path) against the same reference

Float tensors are max abs errors; uint8 pictures are GreyLevels (held to 1 grey level by the caller).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from emo_stream.parity import GREY_SUFFIX, GoldenFormatError, grey_levels

log = logging.getLogger(__name__)

GROUPS = ("audio", "avatar", "unet_decode", "blend")


def _need(section: dict, key: str, where: str):
    if key not in section:
        raise GoldenFormatError(f"case.json {where}: missing {key!r}")
    return section[key]


class _Files:
    """The set's safetensors files, read once, with one-line errors naming the file and tensor."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, file: str, key: str) -> torch.Tensor:
        if file not in self._cache:
            from safetensors.torch import load_file

            path = self.root / file
            if not path.is_file():
                raise GoldenFormatError(f"{path} is missing")
            try:
                self._cache[file] = load_file(str(path))
            except Exception as exc:
                raise GoldenFormatError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
        if key not in self._cache[file]:
            raise GoldenFormatError(f"{self.root / file}: tensor {key!r} is missing")
        return self._cache[file][key]


def _err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().float().cpu(), ref.float()
    if ours.shape != ref.shape:
        log.warning("shape %s != reference %s", tuple(ours.shape), tuple(ref.shape))
        return float("inf")
    return float((ours - ref).abs().max()) if ours.numel() else 0.0


def _read_wav(path: Path) -> np.ndarray:
    """16 kHz mono PCM16 as float32 / 32768 (what librosa.load(sr=16000) gives for such a file)."""
    from emo_stream.pcm import read_wav16

    if not path.is_file():
        raise GoldenFormatError(f"{path} is missing")
    return read_wav16(path, GoldenFormatError, " (MuseTalk converts its input to that)")


def face_crop_bgr(frame_bgr: np.ndarray, box, extra_margin: int, size: int) -> tuple[np.ndarray, list[int]]:
    """v1.5's crop: frame[y1:min(y2 + margin, H), x1:x2] resized to size x size (cv2 LANCZOS4); and that box."""
    import cv2

    x1, y1, x2, y2 = (int(v) for v in box)
    y2 = min(y2 + int(extra_margin), frame_bgr.shape[0])
    crop = cv2.resize(frame_bgr[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LANCZOS4)
    return crop, [x1, y1, x2, y2]


def run_cases(golden_dir: Path, only: set[str] | None = None) -> dict[str, float]:
    from emo_stream.families.musetalk.loader import load
    from emo_stream.parity import read_case

    golden_dir = Path(golden_dir)
    case = read_case(golden_dir)
    if case["model"] != "musetalk":
        raise GoldenFormatError(f"{golden_dir}: case.json model is {case['model']!r}, not 'musetalk'")
    unknown = sorted(set(only or ()) - set(GROUPS))
    if unknown:
        raise GoldenFormatError(f"unknown case {unknown[0]!r} (MuseTalk sets have: {', '.join(GROUPS)})")
    wanted = [g for g in GROUPS if g in case and (not only or g in only)]
    return replay(load(golden_dir / "weights"), golden_dir, case, wanted)


def replay(model, golden_dir: Path, case: dict, groups=GROUPS) -> dict[str, float]:
    """{case: error} of the listed case groups with an already loaded model (tests perturb its weights)."""
    files = _Files(Path(golden_dir))
    errors: dict[str, float] = {}
    with torch.no_grad():
        if "audio" in groups:
            errors.update(_audio(model, case["audio"], Path(golden_dir), files))
        if "avatar" in groups:
            errors.update(_avatar(model, case["avatar"], files, model.config))
        if "unet_decode" in groups:
            errors.update(_unet_decode(model, case, files))
        if "blend" in groups:
            errors.update(_blend(model, case, files))
    return errors


def _audio(model, sec: dict, root: Path, files: _Files) -> dict[str, float]:
    from emo_stream.families.musetalk import audio as A

    f = "audio.safetensors"
    wav = _read_wav(root / _need(sec, "file", "audio"))
    fps = int(_need(sec, "fps", "audio"))
    left, right = int(sec.get("padding_left", 2)), int(sec.get("padding_right", 2))
    out = {}
    mel = A.log_mel(model.extractor, wav)
    out["audio.input_features"] = _err(mel, files(f, "input_features"))
    ref_states = files(f, "encoder_hidden_states_all_first2s")
    states = A.encoder_states(model.whisper, files(f, "input_features"))   # the reference's mel: one stage at a time
    out["audio.encoder_hidden_states_all_first2s"] = _err(states[:, : ref_states.shape[1]], ref_states)
    chunks = A.file_chunks(model.whisper, model.extractor, wav, fps, left, right)
    out["audio.whisper_chunks"] = _err(chunks, files(f, "whisper_chunks"))
    return out


def _avatar(model, sec: dict, files: _Files, cfg) -> dict[str, float]:
    f = "avatar.safetensors"
    frames = files(f, "frames_bgr").numpy()
    box = _need(sec, "box_xyxy", "avatar")
    margin = int(sec.get("extra_margin", cfg.extra_margin))
    crops = np.stack([face_crop_bgr(fr, box, margin, cfg.crop_size)[0] for fr in frames])
    out = {f"avatar.crops_bgr{GREY_SUFFIX}": grey_levels(crops, files(f, "crops_bgr"))}
    # the VAE reads the reference's crops (one stage at a time), converted BGR -> RGB as MuseTalk's preprocess
    ref_crops = files(f, "crops_bgr").numpy()[..., ::-1].copy()
    gen = torch.Generator().manual_seed(int(_need(sec, "torch_seed_before_encodes", "avatar")))
    out["avatar.latents_for_unet"] = _err(model.latents_for_unet(ref_crops, generator=gen), files(f, "latents_for_unet"))
    out["avatar.latent_means"] = _err(model.latents_for_unet(ref_crops, sample=False), files(f, "latent_means"))
    return out


def _unet_decode(model, case: dict, files: _Files) -> dict[str, float]:
    f = "unet_decode.safetensors"
    sec = case["unet_decode"]
    if int(sec.get("timestep", 0)) != 0:
        raise GoldenFormatError("case.json unet_decode: MuseTalk runs its UNet at timestep 0 only")
    audio, latents = files(f, "audio_batch"), files(f, "latent_batch")
    out = {"unet_decode.audio_with_pe": _err(model.with_positions(audio), files(f, "audio_with_pe"))}
    pred = model.denoise(latents, audio)
    out["unet_decode.pred_latents"] = _err(pred, files(f, "pred_latents"))
    recon_rgb = model.decode(files(f, "pred_latents"))
    out[f"unet_decode.recon_bgr_uint8{GREY_SUFFIX}"] = grey_levels(recon_rgb.flip(-1), files(f, "recon_bgr_uint8"))
    # the batch's inputs are MuseTalk's own chunks and latents: check they are ours too, where the set has them
    batch = audio.shape[0]
    try:
        out["unet_decode.audio_batch"] = _err(files("audio.safetensors", "whisper_chunks")[:batch], audio)
        rows = _need(sec, "frame_of_each_row", "unet_decode")
        out["unet_decode.latent_batch"] = _err(files("avatar.safetensors", "latents_for_unet")[list(rows)], latents)
    except GoldenFormatError:
        pass   # a set without the audio / avatar cases: the inputs are taken as given
    return out


def _blend(model, case: dict, files: _Files) -> dict[str, float]:
    import cv2
    from PIL import Image

    from emo_stream.families.musetalk import blending as B
    from emo_stream.families.musetalk.face_parsing import FaceParser, MaskRule

    f = "blend.safetensors"
    sec, cfg = case["blend"], model.config
    if model.parser is None:
        raise GoldenFormatError("the set's weights have no face-parse-bisent/79999_iter.pth")
    width = int(sec.get("cheek_width", cfg.left_cheek_width))
    parser = FaceParser(model.parser.net, MaskRule(width, width))
    ub = case["avatar"]
    frames = files("avatar.safetensors", "frames_bgr").numpy()
    rows = list(_need(case["unet_decode"], "frame_of_each_row", "unet_decode"))
    recon = files("unet_decode.safetensors", "recon_bgr_uint8").numpy()
    x1, y1, x2, y2 = (int(v) for v in _need(ub, "box_xyxy", "avatar"))
    y2 = min(y2 + int(ub.get("extra_margin", cfg.extra_margin)), frames.shape[1])
    box = (x1, y1, x2, y2)
    out: dict[str, float] = {}

    crop_box = _need(sec, "parsing_crop_box", "blend")
    pil = Image.fromarray(frames[0][:, :, ::-1]).crop(tuple(crop_box))
    for mode in ("raw", "neck", "jaw"):
        key = f"parsing_{mode}"
        out[f"blend.{key}{GREY_SUFFIX}"] = grey_levels(parser(pil, mode), files(f, key))

    offline, realtime, masks, tensor_paths = [], [], [], []
    boxes = _need(sec, "crop_boxes", "blend")
    for i, row in enumerate(rows):
        frame = frames[row]
        res = cv2.resize(recon[i], (x2 - x1, y2 - y1))
        offline.append(B.offline_blend(frame, res, box, parser, mode="jaw", upper_boundary_ratio=cfg.upper_boundary_ratio,
                                       expand=cfg.blend_expand, blur=cfg.blur_offline))
        mask, cbox = B.prepare_blend(frame, box, parser, mode="jaw", upper_boundary_ratio=cfg.upper_boundary_ratio,
                                     expand=cfg.blend_expand, blur=cfg.blur_realtime)
        if list(cbox) != list(boxes[i]):
            log.warning("crop box %s != reference %s", cbox, boxes[i])
        masks.append(mask)
        realtime.append(B.realtime_blend(frame, res, box, mask, cbox))
        # the live path: RGB tensors, the decoded crop resized and composited by tensor ops
        plan = B.plan_from_material(box, mask, cbox)
        frame_rgb = torch.from_numpy(frame[:, :, ::-1].copy())
        crop_rgb = torch.from_numpy(recon[i][:, :, ::-1].copy())
        tensor_paths.append(B.paste_one(frame_rgb, crop_rgb, plan).flip(-1))
    g = GREY_SUFFIX
    out[f"blend.offline_bgr{g}"] = grey_levels(np.stack(offline), files(f, "offline_bgr"))
    out[f"blend.realtime_masks{g}"] = grey_levels(np.stack(masks), files(f, "realtime_masks"))
    out[f"blend.realtime_bgr{g}"] = grey_levels(np.stack(realtime), files(f, "realtime_bgr"))
    out[f"blend.realtime_bgr_tensor_path{g}"] = grey_levels(torch.stack(tensor_paths), files(f, "realtime_bgr"))
    return out
