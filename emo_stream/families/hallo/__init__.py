"""Hallo / Hallo2 (fudan-generative-vision, MIT): the EMO-like public model with the best fidelity.

    from emo_stream.families.hallo.loader import load_hallo
    model = load_hallo("pretrained_models")          # a Hallo or Hallo2 download as published
    from emo_stream.families.hallo.parity import run_cases
    errors = run_cases("../shared/golden/hallo")    # {case.tensor: max abs error}

Files: config (dataclass), modules (face locator, projections, audio block, motion module), unet (the two
diffusers UNets with Hallo's processors and hooks), model (conditioning + guided DDIM per clip), audio
(wav2vec2 features), masks (face / lip region masks), loader (net.pth, download folders, convert),
identity (ArcFace ONNX embedding, optional onnxruntime), parity (golden-set replay), backend (HalloBackend and
the registry's factory), flops (FLOP records for bench/flops.py).

Nothing heavy is imported here: the registry reads FAMILY (and imports `loader` only to detect folders).
"""

from emo_stream.families import Family

FAMILY = Family(
    name="hallo", title="Hallo / Hallo2",
    summary="Hallo / Hallo2 (--model: the fudan-generative-ai/hallo or hallo2 download folder as it comes; slow, best fidelity)",
    backend="emo_stream.families.hallo.backend:create_backend",
    architecture="hallo",
    detect="emo_stream.families.hallo.loader:detect",
    load="emo_stream.families.hallo.loader:load_hallo",
    convert="emo_stream.families.hallo.loader:convert",
    parity="emo_stream.families.hallo.parity:run_cases", parity_models=("hallo",),
    flops="emo_stream.families.hallo.flops:records",
)
