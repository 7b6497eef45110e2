"""The live path's exact shortcuts (attention.py, backbone.py) equal the plain computation on the tiny preset:
reference K/V once per avatar, audio/speed K/V once per segment, the uniform-speed attention, the motion-frame
pruning in the temporal modules and the ReferenceNet's single-token cross-attention."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from emo_stream.families.emo.model import EmoModel

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = EmoModel.build("tiny").eval()
    with torch.no_grad():  # the new layers start at zero: make them matter
        for name, p in m.named_parameters():
            if ".processor." in name or "proj_out" in name:
                p.normal_(0, 0.05)
    return m


def _inputs(m, b=2, f=3, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(lat=torch.randn(b, 4, 8, 8, generator=g),
                feats=torch.randn(b, f, 5, m.config.audio_feature_dim, generator=g),
                mask=torch.ones(b, 1, 64, 64), motion=torch.randn(b, 4, n, 8, 8, generator=g),
                x=torch.randn(b, 4, f, 8, 8, generator=g), speed=torch.rand(b, f, generator=g) * 3)


def _plain(m, i, speed, ref, mot, t):
    m.set_shortcuts(False)
    try:
        c = m.condition(ref, i["feats"], i["mask"], speed, mot)
        assert not c.context.speed_uniform
        return m.predict_noise(i["x"], torch.tensor([t]), c)
    finally:
        m.set_shortcuts(True)


@pytest.mark.parametrize("varying_speed", [False, True])
@torch.no_grad()
def test_cached_pruned_path_equals_plain(model, varying_speed):
    m, i = model, _inputs(model)
    speed = i["speed"] if varying_speed else None
    ref = m.encode_reference(i["lat"], project=True)
    mot = m.encode_motion(i["motion"])
    cond = m.condition(ref, i["feats"], i["mask"], speed, mot, cache=True)
    assert cond.context.reference_kv is not None and cond.context.speed_uniform is (not varying_speed)
    for t in (900, 500, 100):  # later steps reuse the segment's audio/speed K/V cache
        fast = m.predict_noise(i["x"], torch.tensor([t]), cond)
        plain = _plain(m, i, speed, ref, mot, t)
        assert fast.abs().mean() > 1e-2
        assert (fast - plain).abs().max() <= TOL
    assert cond.context.kv_cache  # filled at the first step


@torch.no_grad()
def test_a_wrong_cache_is_caught(model):
    """The comparison can fail: another avatar's reference K/V changes the output."""
    m, i = model, _inputs(model)
    ref = m.encode_reference(i["lat"], project=True)
    other = m.encode_reference(i["lat"].flip(-1), project=True)
    ref.kv = other.kv
    mot = m.encode_motion(i["motion"])
    fast = m.predict_noise(i["x"], torch.tensor([500]), m.condition(ref, i["feats"], i["mask"], None, mot, cache=True))
    plain = _plain(m, i, None, ref, mot, 500)
    assert (fast - plain).abs().max() > 1e-3


@torch.no_grad()
def test_guidance_batch_keeps_caches_apart(model):
    """Classifier-free guidance concatenates a null-audio branch: its audio K/V must not reuse the conditional's."""
    from emo_stream.families.emo.model import Conditioning

    m, i = model, _inputs(model)
    ref = m.encode_reference(i["lat"], project=True)
    mot = m.encode_motion(i["motion"])
    cond = m.condition(ref, i["feats"], i["mask"], None, mot, cache=True)
    both = Conditioning.cat(cond, cond.with_null_audio())
    x2 = torch.cat([i["x"], i["x"]])
    fast = m.predict_noise(x2, torch.tensor([500]), both)
    plain_c = _plain(m, i, None, ref, mot, 500)
    assert (fast[:2] - plain_c).abs().max() <= TOL
    assert (fast[:2] - fast[2:]).abs().max() > 1e-4  # the null branch differs


@torch.no_grad()
def test_pruning_keeps_gradients_exact(model):
    """Training also runs the pruned temporal modules: same loss gradient as the plain path."""
    m, i = model, _inputs(model, b=1, f=2, n=2)
    ref, mot = m.encode_reference(i["lat"]), m.encode_motion(i["motion"])
    grads = []
    for prune in (True, False):
        m.backbone.options.prune_motion = prune
        with torch.enable_grad():
            m.zero_grad(set_to_none=True)
            c = m.condition(ref, i["feats"], i["mask"], i["speed"], mot)
            m.predict_noise(i["x"], torch.tensor([400]), c).square().mean().backward()
        p = m.backbone.unet.down_blocks[0].motion_modules[0].transformer_blocks[0].ff.net[2].weight
        grads.append(p.grad.clone())
    m.backbone.options.prune_motion = True
    m.zero_grad(set_to_none=True)
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() <= TOL


@torch.no_grad()
def test_reference_net_single_token_shortcut(model):
    m, i = model, _inputs(model)
    unet = m.reference_net.unet
    fast = m.reference_net(i["lat"])
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({k: (AttnProcessor2_0() if k.endswith("attn2.processor") else v)
                             for k, v in saved.items()})
    try:
        plain = m.reference_net(i["lat"])
    finally:
        unet.set_attn_processor(saved)
    m.set_shortcuts(False)
    try:
        off = m.reference_net(i["lat"])
    finally:
        m.set_shortcuts(True)
    for k in plain.sites:
        assert torch.equal(off.sites[k], plain.sites[k])
    for k in plain.tokens:
        assert (fast.tokens[k] - plain.tokens[k]).abs().max() <= TOL
    for k in plain.sites:
        assert (fast.sites[k] - plain.sites[k]).abs().max() <= TOL
