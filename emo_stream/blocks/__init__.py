"""Building blocks two or more model families share; imports no family (tests/test_import_graph.py).

    checkpoint.py   our checkpoint folder (config.yaml + model.safetensors): save_checkpoint, load_checkpoint
    weights.py      reading weight files (safetensors, .bin, .pth, sharded) and strict loading with one-line
                    errors naming the file, key and shape; building modules without allocating weights
    device.py       --device -> torch.device, --dtype -> torch.dtype (torch_device, parse_dtype)
"""
