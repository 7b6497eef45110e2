"""Building blocks two or more model families share; imports no family (tests/test_import_graph.py).

    checkpoint.py   our checkpoint folder (config.yaml + model.safetensors): save_checkpoint, load_checkpoint
    weights.py      reading weight files (safetensors, .bin, .pth, sharded) and strict loading with one-line
                    errors naming the file, key and shape; building modules without allocating weights
    device.py       --device -> torch.device, --dtype -> torch.dtype (torch_device, parse_dtype)
    checks.py       the backends' size, fps and crop checks (check_size, check_fps, check_crop)
    wav2vec2.py     wav2vec2 from a downloaded transformers folder (EMO's audio encoder, Hallo's audio features)
    flops.py        FLOP-counting helpers for the families' flops.py
    memory.py       device memory counted without a GPU (PeakMemory on meta), per-session profiles, capacity
"""
