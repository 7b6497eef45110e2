"""Proof that a MuseTalk-shaped model learns lip sync, shown through the live streaming path, on a CPU.

    python bench/learn_musetalk_sync.py [--minutes 8] [--out /tmp/musetalk_learn_sync] [--json FILE]

1. writes the synthetic talking-face set of bench/learn_sync.py (emo_stream.training.synthetic: procedural
   faces whose mouth opening follows espeak-ng speech) and a tiny MuseTalk download folder with random weights
   (emo_stream.families.musetalk.testing: the 8-channel UNet with cross_attention_dim 384, a tiny SD-style VAE,
   a 2-layer whisper of whisper-tiny's width), read back by the family's own loader
2. fits the random VAE to the face crops (emo_stream.training.vae_fit), then trains the UNet alone with
   MuseTalk's objective: from the target crop with its lower half blanked + a reference crop of another frame
   of the same clip (both as VAE latents) + the target frame's whisper prompt, reconstruct the target's
   latents at t = 0 (L1 on latents); whisper stays frozen, as in MuseTalk
3. saves the trained model as a MuseTalk download folder (musetalkV15/unet.pth + musetalk.json, sd-vae/,
   whisper/, face-parse-bisent/), converts it with the family's `convert` (our checkpoint: config.yaml, whose
   crop_size is set to the small crop trained here; the download format has no place for it)
4. for the untrained model (the same folder with the UNet's random weights) and the trained one: the musetalk
   backend through the streaming engine, each held-out identity's session fed held-out speech (phrases never
   trained on) in 40 ms chunks, frames read as a client reads them; lip-sync r = Pearson between the mouth
   opening measured on the output frames (synthetic.mouth_darkness) and the envelope of the audio each frame
   carries (synthetic.speech_envelope), as bench/learn_sync.py measures EMO.

The synthetic faces are found by a stand-in face analyzer that knows the layout (the real one looks for human
faces): its 68 landmarks put the jaw on the face ellipse and landmark 29 on the nose bridge, so MuseTalk's box
rule (its chin margin scaled to these small faces) puts the whole mouth, wide open, in the crop's blanked lower
half as on a real face (tests/test_musetalk_learn_sync.py checks it). The random face-parsing net is made to
call every pixel skin (testing.label_everything_skin) so the paste mask covers the lower face.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from _common import (  # bench/; puts the repo on sys.path
    emit_json, loss_summary, save_contact_sheet, shared_cpu_device, start_learning_run)
from learn_sync import pearson
from emo_stream.face import FaceInfo
from emo_stream.training.synthetic import (FACE_CENTER, FACE_RADII, generate_dataset, identity_reference,
                                           mouth_darkness, random_speech, speech_envelope)

log = logging.getLogger("learn_musetalk_sync")
SPF = 640
NOSE_Y = -0.1   # landmark 29 (nose bridge) sits this far (in face half-heights) below the face centre


def synthetic_landmarks(box: np.ndarray) -> np.ndarray:
    """68 (x, y) points for a face box (x0, y0, x1, y1) of the synthetic layout: jaw 0-16 on the lower half of
    the face ellipse, nose 27-35, and eyes, brows and mouth inside. MuseTalk's box uses their extent and 29."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    lm = np.tile(np.array([cx, cy], np.float32), (68, 1))
    ang = np.linspace(np.pi, 0, 17)                       # jaw: left ear, chin, right ear
    lm[0:17] = np.stack([cx + rx * np.cos(ang), cy + ry * np.sin(ang)], 1)
    lm[17:27] = np.stack([np.linspace(cx - 0.6 * rx, cx + 0.6 * rx, 10), np.full(10, cy - 0.35 * ry)], 1)
    lm[27:31] = np.stack([np.full(4, cx), np.linspace(cy - 0.2 * ry, cy + NOSE_Y * ry, 4)], 1)
    lm[31:36] = np.stack([np.linspace(cx - 0.15 * rx, cx + 0.15 * rx, 5), np.full(5, cy + 0.2 * ry)], 1)
    lm[36:48] = np.stack([np.repeat([cx - 0.4 * rx, cx + 0.4 * rx], 6), np.full(12, cy - 0.25 * ry)], 1)
    lm[48:68] = np.stack([cx + 0.45 * rx * np.cos(np.linspace(0, 2 * np.pi, 20)),
                          cy + 0.45 * ry + 0.1 * ry * np.sin(np.linspace(0, 2 * np.pi, 20))], 1)
    return lm.astype(np.float32)


class SyntheticFaces:
    """The FaceAnalyzer stand-in: `box` is the face of the next picture (set before each avatar)."""

    def __init__(self, box: np.ndarray):
        self.box = np.asarray(box, np.float32)

    def detect(self, image: np.ndarray) -> FaceInfo:
        return FaceInfo(box=self.box.copy(), landmarks=synthetic_landmarks(self.box))

    analyze = detect


def crop_of(frame: np.ndarray, box: np.ndarray, crop: int, margin: int) -> np.ndarray:
    """The face crop the avatar preparation makes (avatar.face_box, cv2 LANCZOS4 to crop x crop)."""
    import cv2

    from emo_stream.families.musetalk.avatar import face_box

    x0, y0, x1, y1 = face_box(synthetic_landmarks(box), frame.shape[0], margin)
    return cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), (crop, crop), interpolation=cv2.INTER_LANCZOS4)


# ---- the model ---------------------------------------------------------------------------------------------
def tiny_download(root: Path, seed: int) -> Path:
    """A random tiny MuseTalk download folder whose face parsing calls everything skin."""
    from emo_stream.families.musetalk.loader import load
    from emo_stream.families.musetalk.testing import label_everything_skin, write_download

    write_download(root, seed=seed, parsing_dtype=torch.float32)
    m = load(root)
    label_everything_skin(m.parser.net)
    torch.save(m.parser.net.state_dict(), root / "face-parse-bisent" / "79999_iter.pth")
    return root


def save_download(model, root: Path, like: Path) -> Path:
    """The model as a MuseTalk download folder (`like`'s whisper/ and face parsing, this UNet and VAE)."""
    shutil.copytree(like, root, dirs_exist_ok=True)
    torch.save(model.unet.state_dict(), root / "musetalkV15" / "unet.pth")
    model.vae.save_pretrained(root / "sd-vae", safe_serialization=False)
    return root


def checkpoint(download: Path, out: Path, crop: int, margin: int) -> Path:
    """The family's `convert`, then the crop size and chin margin this small model works at (MuseTalk's: 256
    and 10 px, for faces of 256 px and more)."""
    import yaml

    from emo_stream.families.musetalk.loader import convert

    convert(download, out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["crop_size"], cfg["extra_margin"] = crop, margin
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


# ---- training data -----------------------------------------------------------------------------------------
def training_set(model, store, crop: int, progress: bool) -> list[dict]:
    """Per clip: every frame's face crop and whisper prompt (frozen whisper: computed once)."""
    from tqdm import tqdm

    clips = []
    for i in tqdm(range(len(store)), desc="crops + whisper", disable=not progress):
        c = store.load(i)
        crops = np.stack([crop_of(f, b, crop, model.config.extra_margin) for f, b in zip(c.frames, c.boxes)])
        chunks = model.audio_chunks(c.audio, fps=25)
        n = min(len(chunks), len(crops))
        clips.append({"audio": chunks[:n], "crops": crops[:n]})
    return clips


@torch.no_grad()
def add_latents(model, clips: list[dict], batch_size: int = 64) -> None:
    """Masked and whole latents (posterior means) of every crop, as latents_for_unet computes them, batched."""
    for c in clips:
        crops = torch.from_numpy(c["crops"])
        for key, half in (("masked", True), ("whole", False)):
            parts = [model.vae.encode(model._pixels(crops[i:i + batch_size], half)).latent_dist.mean
                     for i in range(0, len(crops), batch_size)]
            c[key] = torch.cat(parts) * model.scaling_factor


class CropStore:
    """data.ClipStore's face for vae_fit.fit_vae: each clip's frames are its face crops."""

    def __init__(self, clips: list[dict]):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def load(self, i: int):
        return SimpleNamespace(frames=self.clips[i]["crops"])


def batch(clips: list[dict], rng: np.random.Generator, size: int):
    """MuseTalk's training sample: cat(masked target, whole reference of another frame), prompt, target."""
    x, a, y = [], [], []
    for _ in range(size):
        c = clips[int(rng.integers(len(clips)))]
        n = len(c["whole"])
        t, r = int(rng.integers(n)), int(rng.integers(n))
        x.append(torch.cat([c["masked"][t], c["whole"][r]]))
        a.append(c["audio"][t])
        y.append(c["whole"][t])
    return torch.stack(x), torch.stack(a), torch.stack(y)


def train_unet(model, clips: list[dict], seconds: float, batch_size: int, lr: float, seed: int,
               max_steps: int = 1_000_000) -> dict:
    """L1 on latents, UNet only, at t = 0, until `seconds` or max_steps."""
    rng = np.random.default_rng([seed, 7])
    unet = model.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.monotonic()
    losses: list[float] = []
    step = 0
    while step < max_steps and time.monotonic() - t0 < seconds:
        x, a, y = batch(clips, rng, batch_size)
        pred = unet(x, torch.zeros((), dtype=torch.long), encoder_hidden_states=model.with_positions(a)).sample
        loss = torch.nn.functional.l1_loss(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            log.info("step %d  L1 %.4f  (%.0f s)", step, np.mean(losses[-50:]), time.monotonic() - t0)
    unet.eval().requires_grad_(False)
    return {"steps": step, "seconds": time.monotonic() - t0, "losses": losses}


# ---- evaluation through the live path -------------------------------------------------------------------------
def evaluate_live(ckpt: Path, size: int, audio: np.ndarray, identities: int, seed: int, segment: int,
                  chunk_ms: float = 40.0) -> dict:
    """Every identity a streaming session of the musetalk backend, fed `audio` in chunk_ms pieces; r between
    the output frames' mouth opening and the envelope of the audio they carry."""
    from emo_stream.families.musetalk.backend import create_backend
    from emo_stream.streaming import EngineConfig, StreamingEngine

    refs = [identity_reference(size, seed=seed, index=i) for i in range(identities)]
    faces = SyntheticFaces(refs[0][1])
    backend = create_backend(str(ckpt), size=size, fps=25, device="cpu", dtype="float32", segment_frames=segment,
                             portrait_motion="still", cache_dir="", face_analyzer=faces)
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    chunk = int(chunk_ms * 16)

    async def run():
        engine = StreamingEngine(backend, EngineConfig(segment_frames=segment, max_sessions=identities,
                                                       max_batch=identities, vad=False, energy_threshold_db=-120,
                                                       max_delay_ms=1e9))
        await engine.start()
        handles = []
        for image, box in refs:
            faces.box = np.asarray(box, np.float32)
            handles.append(await engine.prepare_avatar(image))
        sessions = [engine.open_session(h, seed=i) for i, h in enumerate(handles)]

        async def feed(s):
            for i in range(0, len(pcm), chunk):
                await s.push_audio(pcm[i:i + chunk], sample_rate=16000)
            s.end_of_speech()

        async def read(s):
            out = []
            async for f in s.frames():
                if f.speech:
                    out.append(f)
                if f.segment_end:
                    break
            return out

        feeders = [asyncio.create_task(feed(s)) for s in sessions]
        frames = await asyncio.gather(*(read(s) for s in sessions))
        await asyncio.gather(*feeders)
        stats = engine.stats()
        await engine.stop()
        return frames, stats

    t0 = time.monotonic()
    per_session, stats = asyncio.run(run())
    rs, pictures = [], []
    for frames in per_session:
        imgs = np.stack([f.image for f in frames])
        heard = np.concatenate([f.audio for f in frames])
        rs.append(pearson(mouth_darkness(imgs), speech_envelope(heard, len(frames))))
        pictures.append(imgs)
    return {"r": round(float(np.mean(rs)), 3), "r_per_identity": [round(r, 3) for r in rs],
            "frames": [len(f) for f in per_session], "dropped": int(sum(f.dropped for s in per_session for f in s)),
            "mean_batch": stats.get("mean_batch"), "seconds": round(time.monotonic() - t0, 1), "_frames": pictures}


def prepare_and_train(args, out: Path, untrained: Path, trained: Path) -> dict:
    """Data, the random folder, the VAE fit, the untrained and the trained checkpoints; their summary."""
    from emo_stream.families.musetalk.loader import load
    from emo_stream.training.data import ClipStore
    from emo_stream.training.vae_fit import fit_vae

    t_start = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    generate_dataset(out / "data", clips=args.clips, size=args.size, seconds=4.0, identities=args.identities,
                     seed=args.seed)
    random_dl = tiny_download(out / "random" / "models", args.seed)
    model = load(random_dl)
    model.config.crop_size, model.config.extra_margin = args.crop, args.margin
    t_data = time.monotonic() - t_start

    t1 = time.monotonic()
    store = ClipStore([out / "data"])
    clips = training_set(model, store, args.crop, progress=False)
    vae_losses = fit_vae(model.vae, CropStore(clips), args.crop, args.vae_steps, seed=args.seed)
    add_latents(model, clips)   # latents of the fitted VAE
    t_vae = time.monotonic() - t1
    # the untrained model: the fitted VAE with the UNet's random weights (only the UNet differs from trained)
    checkpoint(save_download(model, out / "untrained" / "models", random_dl), untrained, args.crop, args.margin)
    run = train_unet(model, clips, args.minutes * 60, args.batch_size, args.lr, args.seed)
    checkpoint(save_download(model, out / "trained" / "models", random_dl), trained, args.crop, args.margin)

    return {
        "model": {"unet_params": sum(p.numel() for p in model.unet.parameters()),
                  "vae_params": sum(p.numel() for p in model.vae.parameters()),
                  "whisper_params": sum(p.numel() for p in model.whisper.parameters()),
                  "whisper_layers": model.config.whisper_layers - 1, "trained": "UNet only (VAE fitted first)"},
        "train": {"objective": "L1 on latents: masked target + reference of another frame + whisper prompt, t=0",
                  "batch_size": args.batch_size, "lr": args.lr, "steps": run["steps"],
                  "seconds": round(run["seconds"], 1), **loss_summary(run["losses"])},
        "vae_fit": {"steps": args.vae_steps, "loss_first": round(float(np.mean(vae_losses[:10])), 4),
                    "loss_last": round(float(np.mean(vae_losses[-10:])), 4)},
        "minutes": {"data_and_model": round(t_data / 60, 2), "latents_and_vae_fit": round(t_vae / 60, 2),
                    "unet_training": round(run["seconds"] / 60, 2)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=8.0, help="UNet training time")
    p.add_argument("--out", default="/tmp/musetalk_learn_sync")
    p.add_argument("--size", type=int, default=64, help="frames (the backend's minimum output size)")
    p.add_argument("--crop", type=int, default=64, help="face crop side: latents are crop / 8")
    p.add_argument("--margin", type=int, default=2, help="v1.5's chin margin in pixels (10 at 256 px faces)")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--identities", type=int, default=4)
    p.add_argument("--eval-identities", type=int, default=2)
    p.add_argument("--eval-seconds", type=float, default=6.0)
    p.add_argument("--segment-frames", type=int, default=10, help="live segment (one whisper window each)")
    p.add_argument("--vae-steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints an earlier run left in --out")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    t_start = start_learning_run(args.threads)
    out = Path(args.out)
    untrained, trained = out / "untrained_ckpt", out / "trained_ckpt"
    if args.eval_only:   # the checkpoints and train.json of an earlier run in --out
        summary = json.loads((out / "train.json").read_text())
    else:
        summary = prepare_and_train(args, out, untrained, trained)
        (out / "train.json").write_text(json.dumps(summary, indent=1))

    audio = random_speech(np.random.default_rng([args.seed, 999]), args.eval_seconds)  # never trained on
    t3 = time.monotonic()
    n_eval = min(args.eval_identities, args.identities)
    res = {name: evaluate_live(path, args.size, audio, n_eval, args.seed, args.segment_frames)
           for name, path in (("untrained", untrained), ("trained", trained))}
    t_eval = time.monotonic() - t3
    # a contact sheet of the trained model's first identity, next to the checkpoints
    save_contact_sheet(out / "trained_frames.png", [res["trained"]["_frames"][0][::6][:12]])
    for v in res.values():
        v.pop("_frames")
    result = {
        "bench": "learn_musetalk_sync",
        "device": shared_cpu_device(args.threads),
        "torch": torch.__version__,
        "size": args.size, "crop": args.crop, "extra_margin": args.margin, "latents": args.crop // 8,
        "clips": args.clips,
        "identities": args.identities,
        **{k: v for k, v in summary.items() if k != "minutes"},
        "eval": {"path": "live: StreamingEngine + musetalk backend (converted checkpoint), one session per "
                         "identity, audio pushed in 40 ms chunks, frames as a client reads them",
                 "speech_seconds": args.eval_seconds, "held_out": True, "identities": n_eval,
                 "segment_frames": args.segment_frames,
                 "measure": "Pearson r, mouth darkness in the synthetic mouth region vs RMS envelope of each "
                            "frame's own audio"},
        "r_untrained": res["untrained"]["r"], "r_trained": res["trained"]["r"], "detail": res,
        "minutes": {**summary["minutes"], "eval": round(t_eval / 60, 2),
                    "total_this_process": round((time.monotonic() - t_start) / 60, 2)},
        "command": "python " + " ".join(["bench/learn_musetalk_sync.py", *(argv if argv is not None else sys.argv[1:])]),
        "target": "r_trained >= 0.5, r_untrained ~ 0",
    }
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
