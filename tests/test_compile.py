"""torch.compile of every family's per-step denoiser, proven on the CPU (tests/family_cases.py).

CI (one dynamo trace per family, eager backend: tracing is what costs on 2 cores):
- the denoiser UNet compiles as ONE graph (fullgraph=True: any graph break fails) and the segment loop then
  runs two segments of two steps each without a recompilation (new timesteps, new conditioning, motion /
  held frames appearing);
- batch buckets: whatever the number of sessions (1..6), the denoiser sees one batch size per bucket (MuseTalk:
  its rows are frames, every session's, cut into calls of at most the largest bucket and each padded to one).
slow (-m slow): inductor-compiled output equals eager within TOLERANCE, and varying the number of sessions
recompiles once per bucket touched, not once per session count.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from emo_stream.execution import BATCH_BUCKETS, bucket_size
from tests.family_cases import CASES, Models

FAMILIES = sorted(CASES)
TOLERANCE = 1e-4   # inductor vs eager, fp32, relative to the output's max (fused kernels reorder sums)


def denoiser_module(family: str, backend) -> torch.nn.Module:
    """The module the product compiles (emo_stream.execution.compile_forward): the per-step UNet."""
    if family == "emo":
        return backend.model.backbone.unet
    if family == "echomimic":
        return backend.model.model.denoiser
    if family == "musetalk":
        return backend.model.unet
    return backend.model.denoising_unet.unet


@pytest.fixture(scope="module")
def models():
    return Models()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(module: torch.nn.Module, backend) -> None:
    module.forward = torch.compile(module.forward, backend=backend, dynamic=False, fullgraph=True)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_one_graph_no_recompile_across_steps_and_segments(family, models):
    case = CASES[family]
    backend = case.backend(steps=2, model=models[family])
    counter = CompileCounter()
    _compile(denoiser_module(family, backend), counter)
    if isinstance(getattr(backend, "execution", None), dict):
        # compiled as the product compiles it: the backend then keeps no per-segment K/V cache inside the
        # compiled call (a dict filled at step 0 would fail dynamo's guards at step 1: a recompile per step)
        backend.execution = dict(backend.execution, compile="test")
    jobs = case.jobs(backend, sessions=2 if case.batched else 1)
    graphs = []
    for _ in range(3):   # first segment, then continuing ones (motion frames / held frames now present)
        case.run_segment(backend, jobs)
        graphs.append(counter.frame_count)
    # at most one graph for the first segment and one for every later one (EchoMimic's first segment has no
    # held frames, so its clip is shorter); a third segment must compile nothing new
    assert graphs[-1] == graphs[-2] <= 2, f"{family}: graphs after each segment {graphs} (recompiled)"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", [f for f in FAMILIES if CASES[f].batched])
@torch.no_grad()
def test_batch_buckets_bound_the_shapes_the_denoiser_sees(family, models):
    case = CASES[family]
    backend = case.backend(steps=1, model=models[family])
    backend.batch_buckets = BATCH_BUCKETS
    module = denoiser_module(family, backend)
    eager, shapes = module.forward, set()

    def spy(sample, *args, **kwargs):
        shapes.add(tuple(sample.shape))
        return eager(sample, *args, **kwargs)
    module.forward = spy
    sessions = range(1, 7)
    outs = {n: case.run_segment(backend, case.jobs(backend, sessions=n)) for n in sessions}
    assert all(len(outs[n]) == n for n in sessions)
    if not case.steps:   # MuseTalk: 8 frames a session, 8..48 rows, calls of at most 32 rows, padded to a bucket
        assert {s[0] for s in shapes} == {8, 16, 32}, shapes
        return
    rows = 2 if getattr(backend, "guidance", 1.0) != 1.0 else 1   # guidance doubles the denoiser's batch
    assert {s[0] // rows for s in shapes} == {bucket_size(n) for n in sessions} == {1, 2, 4, 8}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", [f for f in FAMILIES if CASES[f].batched])
@torch.no_grad()
def test_padding_rows_do_not_change_the_sessions_output(family, models):
    """A session's latents are the same whether its batch was padded to a bucket or not."""
    case = CASES[family]
    plain = case.backend(steps=1, model=models[family])
    padded = case.backend(steps=1, model=models[family])
    padded.batch_buckets = (4,) if case.steps else (32,)   # MuseTalk: 3 sessions x 8 frames = 24 rows -> 32
    if case.steps:
        a = case.run_segment(plain, case.jobs(plain, sessions=3))
        b = case.run_segment(padded, case.jobs(padded, sessions=3))
    else:   # MuseTalk's segment ends in uint8 frames: compare its predicted latents (every session's rows)
        a = [plain.denoise(case.jobs(plain, sessions=3)).latents]
        b = [padded.denoise(case.jobs(padded, sessions=3)).latents]
        assert a[0].shape[0] == 24
    for x, y in zip(a, b):
        assert (x - y).abs().max() <= 1e-5 * max(1.0, float(x.abs().max()))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_inductor_equals_eager(family, models):
    case = CASES[family]
    backend = case.backend(model=models[family])
    fn, x, t = case.step(backend, case.jobs(backend, sessions=2 if case.batched else 1))
    want = fn(x, t)
    module = denoiser_module(family, backend)
    module.forward = torch.compile(module.forward, backend="inductor", dynamic=False, fullgraph=True)
    got = fn(x, t)
    assert (got - want).abs().max() <= TOLERANCE * float(want.abs().max())


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", [f for f in FAMILIES if CASES[f].batched])
@torch.no_grad()
def test_recompiles_once_per_bucket_as_sessions_vary(family, models):
    case = CASES[family]
    backend = case.backend(steps=1, model=models[family])
    backend.batch_buckets = BATCH_BUCKETS
    counter = CompileCounter()
    _compile(denoiser_module(family, backend), counter)
    for n in (1, 2, 3, 4, 5):
        case.run_segment(backend, case.jobs(backend, sessions=n))
    if not case.steps:   # MuseTalk: 8..40 rows in calls of <= 32, padded: buckets 8, 16, 32
        assert counter.frame_count == 3
        return
    # 1, 2, 3, 4, 5 sessions -> buckets 1, 2, 4, 4, 8: one graph per bucket (4), not per session count (5)
    assert counter.frame_count == len({bucket_size(n) for n in (1, 2, 3, 4, 5)}) == 4
