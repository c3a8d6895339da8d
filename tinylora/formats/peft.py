"""Hugging Face PEFT adapter directories: adapter_config.json + adapter_model.safetensors, tensors keyed
`base_model.model.<path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r) and `.lora_magnitude_vector` (DoRA)."""
from __future__ import annotations
import pathlib
from typing import Any
from tinygrad import Tensor
from tinylora.config import ALL_LINEAR, LoraConfig
from tinylora.errors import LoraError
from tinylora.formats.common import (CONFIG_FILE, AdapterFile, adapter_tensors, config_has, finite_arrays, read_config,
                                     read_weights, write_directory)
from tinylora.lora import Adapter

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SIGNATURE = "HF PEFT ('peft_type')"  # how detect tells it, for the error when no format does
# PEFT options tinylora does not implement, with the value that means "not used"; any other value is refused.
_UNSUPPORTED = {"modules_to_save": None, "bias": "none", "fan_in_fan_out": False,
                "layer_replication": None, "exclude_modules": None, "lora_bias": False, "target_parameters": None,
                "use_qalora": False, "trainable_token_indices": None, "megatron_config": None}

def config_dict(config: LoraConfig, layers: dict[str, Adapter]) -> dict:
  targets = config.target_modules
  # PEFT saves "all-linear" as the full paths it resolved; None (the family default, resolved by inject before any
  # adapter is saved) likewise, so that a file never records no targets
  if targets in (ALL_LINEAR, None): targets = sorted(layers)
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.lora_alpha,
          "lora_dropout": config.lora_dropout, "target_modules": targets, "use_rslora": config.use_rslora,
          "layers_to_transform": config.layers_to_transform, "layers_pattern": None,
          "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
          "init_lora_weights": config.init_lora_weights, "bias": "none", "fan_in_fan_out": False, "use_dora": config.use_dora,
          "modules_to_save": None, "inference_mode": True, "base_model_name_or_path": None, "revision": None}

def config_from_dict(cfg: dict, where: str) -> LoraConfig:
  if cfg.get("peft_type", "LORA") != "LORA": raise LoraError(f"{where}: peft_type {cfg['peft_type']!r} is not supported (only 'LORA')")
  for key, neutral in _UNSUPPORTED.items():
    if cfg.get(key, neutral) not in (neutral, [], {}) or (key == "bias" and cfg.get(key, neutral) != neutral):
      raise LoraError(f"{where}: option {key}={cfg[key]!r} is not supported by tinylora yet (supported: {neutral!r})")
  if cfg.get("layers_pattern") not in (None, "layers", ["layers"]):
    raise LoraError(f"{where}: layers_pattern={cfg['layers_pattern']!r} is not supported (only 'layers')")
  if "r" not in cfg or "target_modules" not in cfg: raise LoraError(f"{where}: needs 'r' and 'target_modules'")
  fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "layers_to_transform",
            "rank_pattern", "alpha_pattern", "init_lora_weights", "use_dora")
  kwargs = {k: cfg[k] for k in fields if cfg.get(k) is not None}
  try: return LoraConfig(**kwargs)
  except LoraError as e: raise LoraError(f"{where}: {e}") from None

def key(path: str, name: str) -> str:
  """PEFT's file key of tensor `name` ("A", "B" or "magnitude") of the adapter at `path`."""
  return f"{PREFIX}{path}.lora_magnitude_vector" if name == "magnitude" else f"{PREFIX}{path}.lora_{name}.weight"

def state(layers: dict[str, Adapter]) -> dict[str, Tensor]:
  """The adapters' tensors under PEFT's keys, in PEFT's orientation."""
  return {key(p, n): t for p, a in layers.items() for n, t in adapter_tensors(a).items()}

def detect(path: pathlib.Path) -> bool: return config_has(path, ("peft_type",))

def read(model: Any, path: pathlib.Path) -> AdapterFile:
  cfg = read_config(path)
  if not (path / WEIGHTS).exists() and (path / "adapter_model.bin").exists():
    raise LoraError(f"{path / 'adapter_model.bin'}: pickled PyTorch adapters are not supported; save with safetensors")
  config = config_from_dict(cfg, str(path / CONFIG_FILE))
  tensors, verify = read_weights(path, WEIGHTS, cfg)
  return AdapterFile(config, tensors, key, str(path / CONFIG_FILE), str(path / WEIGHTS), verify=verify)

def write(model: Any, layers: dict[str, Adapter], config: LoraConfig, path: pathlib.Path) -> None:
  write_directory(path, WEIGHTS, config_dict(config, layers), finite_arrays(state(layers)), "pt")
