"""The EMO model: ReferenceNet, video backbone, attention processors, audio encoder, face locator, speed layers.

    from emo_stream.models import EmoModel, load_config
    model = EmoModel.build("tiny")                 # random weights from a preset
    model = EmoModel.from_pretrained("ckpt/")      # our own checkpoint
    model = init_from_folders("sd15", sd15=..., wav2vec2=..., motion_adapter=..., taesd=...)

Other public models of the family live in subpackages (echomimic/, hallo/); `families.load_model(folder)` loads
any checkpoint or download folder by its architecture (see emo_stream.models.families).
"""

from emo_stream.models.config import EmoConfig, load_config
from emo_stream.models.emo_model import Conditioning, EmoModel
from emo_stream.models.from_folders import init_from_folders
from emo_stream.models.reference_net import ReferenceFeatures

__all__ = ["EmoConfig", "EmoModel", "Conditioning", "ReferenceFeatures", "init_from_folders", "load_config"]
