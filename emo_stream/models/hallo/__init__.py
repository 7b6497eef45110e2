"""Hallo / Hallo2 (fudan-generative-vision, MIT): the EMO-like public model with the best fidelity.

    from emo_stream.models.hallo.loader import load_hallo
    model = load_hallo("pretrained_models")          # a Hallo or Hallo2 download as published
    from emo_stream.models.hallo.parity import run_cases
    errors = run_cases("../shared/golden/hallo")    # {case.tensor: max abs error}

Files: config (dataclass), modules (face locator, projections, audio block, motion module), unet (the two
diffusers UNets with Hallo's processors and hooks), model (conditioning + guided DDIM per clip), audio
(wav2vec2 features), masks (face / lip region masks), loader (net.pth, download folders, convert),
identity (ArcFace ONNX embedding, optional onnxruntime), parity (golden-set replay).

Nothing heavy is imported here: the family registry imports `loader` just to detect folders.
"""
