"""EMO (Emote Portrait Alive): ReferenceNet, video backbone, attention processors, audio encoder, face locator,
speed layers, and its backend.

    model.py          EmoModel (build, from_pretrained/save_pretrained, forward for training), Conditioning
    config.py         EmoConfig and the presets (tiny, sd15, sd15_live, ...)
    backbone.py, reference_net.py, attention.py, audio_encoder.py, face_locator.py, speed.py   its parts
    init_weights.py   the SD1.5 / wav2vec2 / motion-adapter / TAESD folders a user downloaded -> EmoModel parts
    from_folders.py   init_from_folders(preset, sd15=..., wav2vec2=..., ...)
    backend.py        EmoBackend (the backend protocol), create_backend (the registry's factory)
    flops.py          FLOP records (bench/flops.py)
    testing.py        test helpers (liven_new_layers)

    from emo_stream.families.emo.model import EmoModel
    from emo_stream.families.emo.config import load_config
    model = EmoModel.build(load_config("tiny"))     # random weights from a preset
    model = EmoModel.from_pretrained("ckpt/")       # our own checkpoint

Nothing heavy is imported here: the registry reads FAMILY.
"""

from emo_stream.families import Family

FAMILY = Family(
    name="emo", title="EMO",
    summary="EMO diffusion model (--model: a checkpoint folder or a preset: tiny, sd15)",
    backend="emo_stream.families.emo.backend:create_backend",
    architecture="emo",
    load="emo_stream.families.emo.model:load_emo_checkpoint",
    flops="emo_stream.families.emo.flops:records",
)
