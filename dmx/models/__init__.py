"""Frozen models that DiffMask can probe and mask."""

from dmx.models.base import MaskableModel
from dmx.models.toy import ToyModel, ToyModelConfig
