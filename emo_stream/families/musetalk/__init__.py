"""MuseTalk 1.5 (github TMElyralab/MuseTalk): real-time lip sync by one UNet step in the SD VAE latent space.

    config.py        MuseTalkConfig: the networks' configs and the pipeline's constants (YAML-able)
    loader.py        the download folder (models/) and our checkpoint: detect, load, convert
    model.py         MuseTalkModel: whisper chunks, latents for the UNet, one batched UNet + decode
    audio.py         whisper-tiny hidden states and per-frame audio prompts (whole files and live windows)
    face_parsing.py  BiSeNet (ResNet18 backbone) and the raw / neck / jaw paste masks
    blending.py      pasting the crop back: MuseTalk's PIL/cv2 reference and the tensor path of the live server
    parity.py        `emo-stream parity` for MuseTalk golden sets
    testing.py       a tiny random download folder in the published formats
    avatar.py        avatars: face boxes from 68 landmarks, crops, latents, masks; the on-disk cache
    backend.py       MuseTalkBackend (the backend protocol), create_backend (the registry's factory)
"""

from emo_stream.families import Family

FAMILY = Family(
    name="musetalk", title="MuseTalk 1.5",
    summary="MuseTalk 1.5 (--model: MuseTalk's models/ download folder as it comes): real-time lip sync of the mouth region",
    backend="emo_stream.families.musetalk.backend:create_backend",
    architecture="musetalk",
    detect="emo_stream.families.musetalk.loader:detect",
    load="emo_stream.families.musetalk.loader:load",
    convert="emo_stream.families.musetalk.loader:convert",
    parity="emo_stream.families.musetalk.parity:run_cases", parity_models=("musetalk",),
    flops="emo_stream.families.musetalk.flops:records",
)
