"""tinylora: LoRA fine-tuning for tinygrad."""
from tinylora.errors import LoraError
from tinylora.config import LoraConfig
from tinylora.lora import (LoraLinear, inject, trainable_parameters, count_parameters, merge, unmerge, merge_and_unload,
                           unload, disabled, lora_layers, set_adapter, delete_adapter, list_adapters, active_adapter,
                           mixed_batch)
from tinylora.formats import load_pretrained, save_pretrained, load_tokenizer, load_adapter, save_adapter

__all__ = ["LoraError", "LoraConfig", "LoraLinear", "inject", "trainable_parameters", "count_parameters", "merge", "unmerge",
           "merge_and_unload", "unload", "disabled", "lora_layers", "set_adapter", "delete_adapter", "list_adapters",
           "active_adapter", "mixed_batch", "load_pretrained", "save_pretrained", "load_tokenizer", "save_adapter",
           "load_adapter"]
