"""Hallo face identity: ArcFace-style alignment and the onnxruntime embedding (a tiny generated ONNX model
stands in for insightface's glintr100.onnx), and the one-line message without onnxruntime."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from emo_stream.errors import WeightsError
from emo_stream.families.hallo import identity


def test_similarity_recovers_a_known_transform():
    ang, scale, t = 0.3, 1.7, np.array([12.0, -5.0])
    r = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    src = np.random.default_rng(1).uniform(0, 100, (5, 2))
    dst = src @ (scale * r).T + t
    m = identity.similarity(src, dst)
    np.testing.assert_allclose(m, np.hstack([scale * r, t[:, None]]), atol=1e-9)


def test_align_puts_the_eyes_on_the_template():
    img = np.zeros((300, 300, 3), np.uint8)
    pts = identity.ARCFACE_TEMPLATE * 2.0 + 40.0
    for x, y in pts[:2]:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    crop = identity.align(img, pts)
    for x, y in identity.ARCFACE_TEMPLATE[:2]:
        assert crop[int(round(y)), int(round(x))].max() > 100


@pytest.fixture
def tiny_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["fc1"])],
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "glintr100.onnx"
    onnx.save(model, str(path))
    return path, w


def test_embedding_matches_insightface_preprocessing(tiny_onnx):
    path, w = tiny_onnx
    emb = identity.FaceEmbedder(path)
    crop = np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    expected = ((crop.astype(np.float32) - 127.5) / 127.5).mean(axis=(0, 1)) @ w
    np.testing.assert_allclose(emb.embed_aligned(crop), expected, rtol=1e-4, atol=1e-4)
    assert identity.find_recognition_model(path.parent) == path


def test_without_onnxruntime_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(WeightsError) as exc:
        identity.FaceEmbedder(tmp_path / "glintr100.onnx")
    assert "pip install onnxruntime" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_model_falls_back_to_zeros(tmp_path, caplog):
    emb = identity.face_embedding(np.zeros((64, 64, 3), np.uint8), np.zeros((68, 2)), tmp_path)
    assert emb.shape == (512,) and not emb.any()
    assert "zero embedding" in caplog.text
