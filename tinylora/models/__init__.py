"""Decoder models (Llama, Mistral, Qwen2) with Hugging Face names. Reading and writing their files is tinylora.formats'
(load_pretrained, save_pretrained)."""
from tinylora.models.llama import SUPPORTED, KVCache, Model, ModelConfig

__all__ = ["SUPPORTED", "KVCache", "Model", "ModelConfig"]
