"""Face detection, cropping and masks: on real portraits from ../shared/data when present, else on
synthetic ones made here from the built-in portrait (mirrored, off-centre on a larger canvas)."""

import numpy as np
import pytest

from emo_stream.errors import NoFaceError
from emo_stream.face import FaceAnalyzer, face_region_mask, no_face_error, prepare_portrait
from emo_stream.media import load_image


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


def _portraits() -> list[np.ndarray]:
    from tests.conftest import shared_data_dir

    shared = shared_data_dir()
    if shared is not None:
        return [load_image(p) for p in sorted((shared / "portraits").glob("*.jpg"))]
    from emo_stream.default_avatar import default_portrait

    face = default_portrait(384)
    canvas = np.full((640, 900, 3), 90, np.uint8)  # a wide photo with the face off to one side
    canvas[200:584, 480:864] = face
    return [face, face[:, ::-1].copy(), canvas]


def test_finds_faces_in_portraits(analyzer):
    images = _portraits()
    assert images
    for image in images:
        crop = prepare_portrait(image, 256, analyzer)
        assert crop.image.shape == (256, 256, 3)
        x0, y0, x1, y1 = crop.face.box
        # the face sits inside the crop, roughly centred, and the landmarks lie in its box
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
        assert 0.25 < (x1 - x0) / 256 < 0.7
        cx, cy = crop.face.landmarks.mean(axis=0)
        assert x0 < cx < x1 and y0 < cy < y1


def test_no_face_is_a_clear_error(analyzer):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError, match="no face"):
        analyzer.analyze(noise)


def test_small_photos(analyzer):
    from PIL import Image

    # a 60 px photo of a face: found (upsampled once more); a 40 px one: "too small", not "use a frontal face"
    photo = Image.fromarray(_portraits()[0])
    small = np.asarray(photo.resize((60, 60), Image.LANCZOS))
    assert analyzer.detect(small) is not None
    with pytest.raises(NoFaceError, match="too small"):
        analyzer.analyze(np.full((40, 40, 3), 128, np.uint8))
    assert "too small" not in str(no_face_error(np.zeros((300, 300, 3), np.uint8)))


def test_face_region_mask_is_union_of_boxes():
    m = face_region_mask([[10, 10, 20, 20], [30, 30, 40, 40]], 64, margin=0.0)
    assert m[15, 15] == 1 and m[35, 35] == 1 and m[25, 25] == 0 and m.sum() == 200
