"""Adapter files: HF PEFT's (adapter_config.json + adapter_model.safetensors) and mlx-lm's
(adapter_config.json + adapters.safetensors). Loading validates everything before the model is touched."""
from __future__ import annotations
import hashlib, json, os, pathlib
from typing import Any
import numpy as np
from tinygrad import Tensor
from tinylora.config import ALL_LINEAR, LoraConfig, layer_index
from tinylora.errors import LoraError
from tinylora.io import check_arrays, read_json, read_safetensors, write_json, write_safetensors
from tinylora.lora import DEFAULT, Adapter, adaptable_linears, inject, list_adapters, lora_layers

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS, MLX_WEIGHTS = "adapter_model.safetensors", "adapters.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT options tinylora does not implement, with the value that means "not used"; any other value is refused.
_PEFT_UNSUPPORTED = {"modules_to_save": None, "bias": "none", "fan_in_fan_out": False,
                     "layer_replication": None, "exclude_modules": None, "lora_bias": False, "target_parameters": None,
                     "use_qalora": False, "trainable_token_indices": None, "megatron_config": None}

def _adapter_of(model: Any, adapter_name: str | None) -> tuple[dict[str, Adapter], LoraConfig]:
  """The named (default: active) adapter of every linear holding it, by path, and its config."""
  if adapter_name is not None and adapter_name not in list_adapters(model):
    raise LoraError(f"no adapter named {adapter_name!r} to save; the model has {list_adapters(model) or 'none'}")
  layers = lora_layers(model, adapter_name)
  if not layers: raise LoraError("model has no LoRA adapters to save")
  adapters = {p: l.adapters[adapter_name or l.active] for p, l in layers.items()}
  if bare := [p for p, a in adapters.items() if a.config is None]:
    raise LoraError(f"{bare[0]} holds a LoraLinear built by hand, without the LoraConfig an adapter file records; add "
                    f"adapters with inject(model, config) to save them")
  return adapters, next(iter(adapters.values())).config

def _numpy(t: Tensor) -> np.ndarray: return t.float().numpy()

# The weights file carries a digest of the config saved with it: the two files are renamed into place one after the
# other, so a save killed in between (over an older adapter) would otherwise pair new weights with an old scale.
CONFIG_TAG = "tinylora.config_sha256"
def _config_digest(cfg: dict) -> str: return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()

# ---- HF PEFT ----

def peft_config_dict(config: LoraConfig, layers: dict[str, Adapter]) -> dict:
  targets = config.target_modules
  if targets == ALL_LINEAR: targets = sorted(layers)  # PEFT saves "all-linear" as the full paths it resolved
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.lora_alpha,
          "lora_dropout": config.lora_dropout, "target_modules": targets, "use_rslora": config.use_rslora,
          "layers_to_transform": config.layers_to_transform, "layers_pattern": None,
          "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
          "init_lora_weights": config.init_lora_weights, "bias": "none", "fan_in_fan_out": False, "use_dora": config.use_dora,
          "modules_to_save": None, "inference_mode": True, "base_model_name_or_path": None, "revision": None}

def config_from_peft(cfg: dict, where: str) -> LoraConfig:
  if cfg.get("peft_type", "LORA") != "LORA": raise LoraError(f"{where}: peft_type {cfg['peft_type']!r} is not supported (only 'LORA')")
  for key, neutral in _PEFT_UNSUPPORTED.items():
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

def peft_key(path: str, name: str) -> str:
  """PEFT's file key of tensor `name` ("A", "B" or "magnitude") of the adapter at `path`."""
  return f"{PEFT_PREFIX}{path}.lora_magnitude_vector" if name == "magnitude" else f"{PEFT_PREFIX}{path}.lora_{name}.weight"

def peft_state(layers: dict[str, Adapter]) -> dict[str, Tensor]:
  return {peft_key(p, n): t for p, a in layers.items() for n, t in _tensors(a).items()}

def _tensors(a: Adapter) -> dict[str, Tensor]:
  return {"A": a.lora_A, "B": a.lora_B} | ({"magnitude": a.magnitude} if a.use_dora else {})

# ---- mlx-lm ----

def _block_layout(paths: list[str], where: str) -> tuple[list[int], list[str]]:
  """The block indices and the in-block keys ("self_attn.q_proj") of adapted paths such as model.layers.3.self_attn.q_proj."""
  blocks, keys = set(), set()
  for p in paths:
    i = layer_index(p)
    if i is None: raise LoraError(f"{where}: mlx-lm adapts linears inside blocks only, but {p} is outside any block")
    blocks.add(i); keys.add(p.split(f"layers.{i}.", 1)[1])
  return sorted(blocks), sorted(keys)

def mlx_config_dict(config: LoraConfig, layers: dict[str, Adapter], model: Any) -> dict:
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

def config_from_mlx(cfg: dict, model: Any, where: str) -> LoraConfig:
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

def mlx_key(path: str, name: str) -> str:
  """mlx-lm's file key of tensor `name` ("A", "B" or "magnitude") of the adapter at `path`."""
  return f"{path}.m" if name == "magnitude" else f"{path}.lora_{name.lower()}"

def mlx_state(layers: dict[str, Adapter]) -> dict[str, Tensor]:
  return {mlx_key(p, n): t.T if t.ndim == 2 else t for p, a in layers.items() for n, t in _tensors(a).items()}

# ---- save / load ----

def detect_format(path: str | os.PathLike) -> str:
  path = pathlib.Path(path)
  cfg = read_json(path / CONFIG_FILE)
  if "peft_type" in cfg: return "peft"
  if "lora_parameters" in cfg or "fine_tune_type" in cfg: return "mlx"
  raise LoraError(f"{path / CONFIG_FILE}: unknown adapter format: neither HF PEFT ('peft_type') nor mlx-lm "
                  f"('lora_parameters'); found keys {sorted(cfg)}")

def save_adapter(model: Any, path: str | os.PathLike, format: str = "peft", adapter_name: str | None = None) -> None:
  """Writes the model's adapter `adapter_name` (default: the active one) as HF PEFT (`format="peft"`) or mlx-lm
  (`"mlx"`) files in directory `path`, or as one llama.cpp LoRA file `path` (`"gguf"`, needs the `gguf` package).
  Each file is written atomically; the weights go first, so a crash never pairs a new config with old weights."""
  layers, config = _adapter_of(model, adapter_name)
  path = pathlib.Path(path)
  if format == "peft":
    cfg, tensors, weights = peft_config_dict(config, layers), peft_state(layers), PEFT_WEIGHTS
  elif format == "mlx":
    cfg, tensors, weights = mlx_config_dict(config, layers, model), mlx_state(layers), MLX_WEIGHTS
  elif format == "gguf":  # one llama.cpp file `path`
    if getattr(config, "use_dora", False): raise LoraError("llama.cpp adapters are LoRA only; save a DoRA adapter as peft or mlx")
    if not hasattr(model, "config"): raise LoraError("a GGUF adapter needs a tinylora.models model (its architecture and heads)")
    cfg, tensors, weights = None, peft_state(layers), None
  else: raise LoraError(f"unknown adapter format {format!r}: expected 'peft', 'mlx' or 'gguf'")
  arrays = {k: _numpy(t) for k, t in tensors.items()}
  if bad := [k for k, a in arrays.items() if not np.isfinite(a).all()]:
    raise LoraError(f"refusing to save non-finite adapter tensors: {', '.join(bad[:5])}")
  if format == "gguf":
    from tinylora.models.gguf import write_adapter
    return write_adapter(layers, model.config, path)
  metadata = {"format": "pt" if format == "peft" else "mlx", CONFIG_TAG: _config_digest(cfg)}
  write_safetensors(path / weights, arrays, metadata)
  write_json(path / CONFIG_FILE, cfg)

def load_adapter(model: Any, path: str | os.PathLike, format: str | None = None, adapter_name: str = DEFAULT) -> Any:
  """Reads a PEFT or mlx-lm adapter directory (format detected unless given) and adds it to `model` as adapter
  `adapter_name`, beside any already there (the model's first adapter is the active one; see set_adapter).
  Every tensor is checked against the model first: on any error the model is left exactly as it was."""
  if adapter_name in (names := list_adapters(model)):
    raise LoraError(f"the model already has an adapter named {adapter_name!r} (adapters: {names}); load it under another adapter_name")
  path = pathlib.Path(path)
  if not path.is_dir(): raise FileNotFoundError(f"adapter directory not found: {path}")
  format = format or detect_format(path)
  cfg_path = path / CONFIG_FILE
  cfg = read_json(cfg_path)
  if format == "peft":
    if not (path / PEFT_WEIGHTS).exists() and (path / "adapter_model.bin").exists():
      raise LoraError(f"{path / 'adapter_model.bin'}: pickled PyTorch adapters are not supported; save with safetensors")
    config, weights = config_from_peft(cfg, str(cfg_path)), path / PEFT_WEIGHTS
    key_of, transposed = peft_key, False
  elif format == "mlx":
    config, weights = config_from_mlx(cfg, model, str(cfg_path)), path / MLX_WEIGHTS
    key_of, transposed = mlx_key, True
    mlx_scale = float(cfg["lora_parameters"]["scale"])  # used as is, not recomputed through lora_alpha / r
  else: raise LoraError(f"unknown adapter format {format!r}: expected 'peft' or 'mlx'")
  if not weights.exists(): raise FileNotFoundError(f"adapter weights not found: {weights}")
  tensors, metadata = read_safetensors(weights)

  # Check every key and shape against what this config would build on this model before touching it.
  linears = {p: s for p, s in adaptable_linears(model).items() if config.matches(p)}
  if not linears:
    raise LoraError(f"{cfg_path}: target_modules={config.target_modules!r} matches no linear in the model; "
                    f"linears are: {', '.join(sorted(adaptable_linears(model)))}")
  expected = {}  # shapes as stored in the file
  for p, (out_f, in_f) in linears.items():
    r = config.rank(p)
    expected[key_of(p, "A")], expected[key_of(p, "B")] = ((in_f, r), (r, out_f)) if transposed else ((r, in_f), (out_f, r))
    if config.use_dora: expected[key_of(p, "magnitude")] = (out_f,)
  def rank_note(k: str, found: tuple[int, ...]) -> str:  # one side of a matrix agrees, so the other is the rank
    shape = expected[k]
    if len(found) != 2 or len(shape) != 2 or (found[0] != shape[0]) == (found[1] != shape[1]): return ""
    return f"; the config's rank is {shape[k.endswith(('A.weight', 'lora_a')) == transposed]}"
  check_arrays(str(weights), tensors, expected, floats=True, note=rank_note)

  if CONFIG_TAG in metadata and metadata[CONFIG_TAG] != _config_digest(cfg):
    raise LoraError(f"{weights} was saved with a different {CONFIG_FILE} than the one beside it (an interrupted save?)")

  def make(p: str, base: Any) -> dict:
    A, B = (tensors[key_of(p, n)].astype(np.float32) for n in "AB")
    if transposed: A, B = A.T, B.T
    m = Tensor(tensors[key_of(p, "magnitude")].astype(np.float32)) if config.use_dora else None
    return dict(r=config.rank(p), scale=mlx_scale if format == "mlx" else config.scale(p), dropout=config.lora_dropout,
                weights=(Tensor(np.ascontiguousarray(A)), Tensor(np.ascontiguousarray(B))), magnitude=m)
  return inject(model, config, make, adapter_name)
