"""Frozen models that DiffMask can probe and mask."""

from dmx.models.base import MaskableModel
from dmx.models.bert import BertConfig, BertModel
from dmx.models.hf_import import ModelLoadError, bundled_minilm_folder, load_pretrained, tokenize
from dmx.models.toy import ToyModel, ToyModelConfig
