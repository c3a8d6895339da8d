"""One decoder (decoder.py) for the families described as data in architectures.py. Reading and writing their files is
tinylora.formats' (load_pretrained, save_pretrained)."""
from tinylora.models.architectures import ARCHITECTURES, Architecture, ModelConfig
from tinylora.models.decoder import KVCache, Model

SUPPORTED = tuple(ARCHITECTURES)

__all__ = ["ARCHITECTURES", "SUPPORTED", "Architecture", "KVCache", "Model", "ModelConfig"]
