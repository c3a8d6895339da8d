"""mlx-lm adapter directories: adapter_config.json (fine_tune_type, num_layers, lora_parameters {rank, scale, dropout,
keys}) + adapters.safetensors, tensors keyed `<path>.lora_a` (in, r), `.lora_b` (r, out) and `.m` (DoRA). mlx-lm adapts
the same keys in the last num_layers blocks with one rank and one scale, used as is (not lora_alpha / r)."""
from __future__ import annotations
import pathlib
from typing import Any
from tinygrad import Tensor
from tinylora.config import LoraConfig, layer_index
from tinylora.errors import LoraError
from tinylora.formats.common import (CONFIG_FILE, AdapterFile, adapter_tensors, config_has, finite_arrays, read_config,
                                     read_weights, write_directory)
from tinylora.lora import Adapter, adaptable_linears

WEIGHTS = "adapters.safetensors"
SIGNATURE = "mlx-lm ('lora_parameters')"  # how detect tells it, for the error when no format does

def _block_layout(paths: list[str], where: str) -> tuple[list[int], list[str]]:
  """The block indices and the in-block keys ("self_attn.q_proj") of adapted paths such as model.layers.3.self_attn.q_proj."""
  blocks, keys = set(), set()
  for p in paths:
    i = layer_index(p)
    if i is None: raise LoraError(f"{where}: mlx-lm adapts linears inside blocks only, but {p} is outside any block")
    blocks.add(i); keys.add(p.split(f"layers.{i}.", 1)[1])
  return sorted(blocks), sorted(keys)

def config_dict(config: LoraConfig, layers: dict[str, Adapter], model: Any) -> dict:
  where = "saving in mlx-lm format"
  ranks, scales = {l.r for l in layers.values()}, {l.scale for l in layers.values()}
  if len(ranks) > 1 or len(scales) > 1:
    raise LoraError(f"{where}: mlx-lm has one rank and scale per adapter; this one has ranks {sorted(ranks)}, scales {sorted(scales)}")
  blocks, keys = _block_layout(list(layers), where)
  n_blocks = max(layer_index(p) for p in adaptable_linears(model) if layer_index(p) is not None) + 1
  if blocks != list(range(n_blocks - len(blocks), n_blocks)) or len(layers) != len(blocks) * len(keys):
    raise LoraError(f"{where}: mlx-lm adapts the same keys in the last num_layers blocks; this adapter has blocks "
                    f"{blocks} of {n_blocks} and keys {keys}")
  return {"fine_tune_type": "dora" if config.use_dora else "lora", "num_layers": len(blocks),
          "lora_parameters": {"rank": ranks.pop(), "scale": scales.pop(), "dropout": config.lora_dropout, "keys": keys}}

def config_from_dict(cfg: dict, model: Any, where: str) -> LoraConfig:
  kind = cfg.get("fine_tune_type", "lora")
  if kind not in ("lora", "dora"): raise LoraError(f"{where}: fine_tune_type={kind!r} is not supported (only 'lora' and 'dora')")
  params = cfg.get("lora_parameters")
  if not isinstance(params, dict) or "rank" not in params or "scale" not in params:
    raise LoraError(f"{where}: lora_parameters must be an object with 'rank' and 'scale', found {params!r}")
  linears = adaptable_linears(model)
  n_blocks = max((i for p in linears if (i := layer_index(p)) is not None), default=-1) + 1
  num_layers = cfg.get("num_layers", 16)
  if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers > n_blocks:
    raise LoraError(f"{where}: num_layers={num_layers!r} but the model has {n_blocks} blocks (<= 0 means all)")
  first = 0 if num_layers <= 0 else n_blocks - num_layers
  keys = params.get("keys") or sorted({p.split(f"layers.{layer_index(p)}.", 1)[1] for p in linears if layer_index(p) is not None})
  if not isinstance(keys, list): raise LoraError(f"{where}: lora_parameters.keys={keys!r}: expected a list of module keys")
  rank, scale = params["rank"], params["scale"]
  if not isinstance(scale, (int, float)) or isinstance(scale, bool):
    raise LoraError(f"{where}: lora_parameters.scale={scale!r}: expected a number")
  try:
    # LoraConfig's scale is lora_alpha / r; mlx-lm uses its scale as is, so lora_alpha = scale * r
    return LoraConfig(r=rank, lora_alpha=scale * rank if isinstance(rank, int) else rank, lora_dropout=params.get("dropout", 0.0),
                      target_modules=list(keys), layers_to_transform=list(range(first, n_blocks)), use_dora=kind == "dora")
  except LoraError as e: raise LoraError(f"{where}: {e}") from None

def key(path: str, name: str) -> str:
  """mlx-lm's file key of tensor `name` ("A", "B" or "magnitude") of the adapter at `path`."""
  return f"{path}.m" if name == "magnitude" else f"{path}.lora_{name.lower()}"

def state(layers: dict[str, Adapter]) -> dict[str, Tensor]:
  """The adapters' tensors under mlx-lm's keys, A and B transposed to mlx-lm's (in, r) and (r, out)."""
  return {key(p, n): t.T if t.ndim == 2 else t for p, a in layers.items() for n, t in adapter_tensors(a).items()}

def detect(path: pathlib.Path) -> bool: return config_has(path, ("lora_parameters", "fine_tune_type"))

def read(model: Any, path: pathlib.Path) -> AdapterFile:
  cfg = read_config(path)
  config = config_from_dict(cfg, model, str(path / CONFIG_FILE))
  tensors, verify = read_weights(path, WEIGHTS, cfg)
  return AdapterFile(config, tensors, key, str(path / CONFIG_FILE), str(path / WEIGHTS), transposed=True,
                     scale=float(cfg["lora_parameters"]["scale"]), verify=verify)

def write(model: Any, layers: dict[str, Adapter], config: LoraConfig, path: pathlib.Path) -> None:
  write_directory(path, WEIGHTS, config_dict(config, layers, model), finite_arrays(state(layers)), "mlx")
