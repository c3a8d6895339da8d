"""Decoder models (Llama, Mistral, Qwen2) with Hugging Face names, and loading/saving of HF model directories."""
from tinylora.models.llama import SUPPORTED, KVCache, Model, ModelConfig
from tinylora.models.pretrained import load_pretrained, save_pretrained

__all__ = ["SUPPORTED", "KVCache", "Model", "ModelConfig", "load_pretrained", "save_pretrained"]
