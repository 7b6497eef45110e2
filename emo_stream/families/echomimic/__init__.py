"""EchoMimic v1 (github antgroup/echomimic, weights BadToBest/EchoMimic, Apache-2.0) as an emo-stream family.

    config.py    EchoMimicConfig (architecture "echomimic-v1"): sizes, scheduler, sampling defaults, fps 24,
                 audio-feature layout, bank dtype, what guidance's unconditional branch drops
    layers.py    the processors/norm/face locator that make diffusers' UNets compute EchoMimic's numbers
    audio.py     whisper log-mel (own slaney filters), per-layer encoder features, per-frame audio tokens
    model.py     EchoMimicModel (build, from_pretrained/save_pretrained, the inference pieces)
    importer.py  the published .pth files: detection, acc/normal choice, strict per-file loading, convert
    parity.py    `emo-stream parity` runner for golden sets of this family
    sampling.py  EchoMimic's sampling loop (context windows, held frames)
    backend.py   EchoMimicBackend (the backend protocol), create_backend (the registry's factory)
    flops.py     FLOP records (bench/flops.py)
    testing.py   tiny random download folders for tests

Python API (fp32 on CPU reproduces EchoMimic's own outputs to < 2e-5; see tests/test_echomimic_model.py):

    from emo_stream.registry import load_model
    model = load_model("pretrained_weights/")          # a download folder (acc preferred) or our checkpoint
    model = importer.load_download(folder, weights_set="normal")   # pick the set explicitly
    model.to("cuda", torch.float16)                    # EchoMimic runs fp16 on CUDA
    model.config.sampling                              # steps/guidance/context of the loaded weights set

    ref = model.encode_image(img)                      # (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8), needs a VAE
    bank = model.encode_reference(ref)                 # {block: (B, tokens, C)} once per avatar (fp16, as EchoMimic)
    face = model.face_feature(layers.face_mask(box, H, W))         # (1, 320, 1, H/8, W/8)
    audio = model.audio_tokens(wave16k)                # (frames, 50, 384) at config.fps (24); or, for streaming,
    feats = model.audio_features(wave16k)              # (T, 5, 384) rows at 50/s, then audio.audio_tokens(feats, fps)
    v = model.denoise(latents, t, audio_rows, face_rows, with_reference, bank)   # one call: latents (R, 4, f, h, w),
        # audio_rows (R, f, 50, 384), face_rows (R, 320, 1, h, w), with_reference (R,) bool; row r uses bank row r % B
        # (several avatars: concatenate their banks along dim 0)
    from emo_stream.families.echomimic.sampling import sample, initial_latents, EchoSampling
    x = sample(model.denoiser_fn(bank), initial_latents(shape, gen), audio[None], face, EchoSampling(...))
    frames = model.decode_latents(x[0].permute(1, 0, 2, 3))        # (f, 3, H, W) in [-1, 1]
"""

from emo_stream.families import Family

FAMILY = Family(
    name="echomimic", title="EchoMimic v1",
    summary="EchoMimic v1 (--model: the BadToBest/EchoMimic download folder as it comes, acc or normal weights)",
    backend="emo_stream.families.echomimic.backend:create_backend",
    architecture="echomimic-v1",
    detect="emo_stream.families.echomimic.importer:detect",
    load="emo_stream.families.echomimic.importer:load",
    convert="emo_stream.families.echomimic.importer:convert",
    parity="emo_stream.families.echomimic.parity:run_cases", parity_models=("echomimic-v1",),
    flops="emo_stream.families.echomimic.flops:records",
    default_fps=24,
)
