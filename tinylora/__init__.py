"""tinylora: LoRA fine-tuning for tinygrad."""
from tinylora.errors import LoraError
from tinylora.config import LoraConfig
from tinylora.lora import (LoraLinear, inject, trainable_parameters, count_parameters, merge, unmerge, merge_and_unload,
                           unload, disabled, lora_layers)
from tinylora.adapter import save_adapter, load_adapter

__all__ = ["LoraError", "LoraConfig", "LoraLinear", "inject", "trainable_parameters", "count_parameters", "merge", "unmerge",
           "merge_and_unload", "unload", "disabled", "lora_layers", "save_adapter", "load_adapter"]
