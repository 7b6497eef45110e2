"""Device memory counted without a GPU (emo_stream.blocks.memory; bench/memory.py writes the full-size table):
the peak counter's arithmetic, attention counted as CUDA's fused kernels hold it, and the profile that `serve`
and `worker` take their capacity from (server.app.build_engine -> device_capacity -> backend.memory_profile),
here for MuseTalk at a tiny size."""

from __future__ import annotations

import pytest
import torch

from emo_stream.blocks.memory import GIB, PeakMemory, device_capacity
from tests.family_cases import CASES


def test_peak_counts_live_storages_and_frees():
    with PeakMemory() as peak:
        a = torch.empty(1024, device="meta")            # 4 KiB
        b = torch.empty(2048, device="meta")            # 8 KiB
        del a
        c = torch.empty(256, device="meta")             # 1 KiB
        view = b[:10]                                   # a view: no new storage
    assert peak.peak == (1024 + 2048) * 4 and peak.current == (2048 + 256) * 4
    del b, c, view


def test_attention_is_counted_as_a_fused_kernel():
    """On meta scaled_dot_product_attention decomposes into its math form (the whole attention matrix, float32
    for bf16 inputs); CUDA's flash / memory-efficient kernels hold the output and a log-sum-exp only."""
    q = torch.zeros(2, 8, 4096, 40, device="meta", dtype=torch.bfloat16)
    with PeakMemory() as peak:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
    lse = 2 * 8 * 4096 * 4
    assert peak.peak == q.numel() * 2 + lse           # 5 MiB + 256 KiB, not the 2 GiB of the math form


@pytest.mark.timeout(900)
def test_musetalk_profile_feeds_the_capacity_from_memory(monkeypatch):
    torch.set_num_threads(1)
    case = CASES["musetalk"]
    backend = case.backend()                           # a tiny fp32 model on the CPU: counted on a meta twin
    profile = backend.memory_profile((1, 2, 4))
    m = backend.model
    own = sum(p.numel() * 4 for p in list(m.parameters()) + list(m.buffers()))
    assert profile.weights == own                      # this model has no face-parsing net (live only)
    monkeypatch.setattr(m, "parser", object())         # one that has it keeps BiSeNet (float32) on the device
    assert backend.memory_profile((1,)).weights == own + _bisenet_bytes()
    monkeypatch.setattr(m, "parser", None)
    # per session: 100 base frames of the preview loop (4 s at 25 fps) and their idle cache, latents, masks
    frames = 100 * backend.size * backend.size * 3
    assert 2 * frames < profile.session < 2 * frames + 100 * 8 * 8 * 8 * 4 + 100 * backend.size ** 2
    acts = profile.activations
    assert 0 < acts[1] < acts[2] < acts[4]             # more sessions' frames per call, more activations

    # serve / worker: an empty max_sessions on CUDA -> free memory / this profile
    monkeypatch.setattr(backend, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 24 * GIB))
    n, why = device_capacity(backend, max_batch=4)
    prof4 = backend.memory_profile((1, 4))
    assert n == prof4.sessions(10 * GIB, max_batch=4, loaded=True) > 4 and "from the device's memory" in why


def _bisenet_bytes() -> int:
    from emo_stream.families.musetalk.face_parsing import BiSeNet

    with torch.device("meta"):
        net = BiSeNet()
    return sum(t.numel() * 4 for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()) + \
        sum(t.numel() * t.element_size() for t in net.buffers() if not t.is_floating_point())
