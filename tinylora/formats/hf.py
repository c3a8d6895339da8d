"""Hugging Face model directories: config.json plus model.safetensors or a sharded index, and the tokenizer files
(tokenizer.json through the optional `tokenizers` package, tokenizer_config.json for special tokens and chat template).

dtype policy: with `dtype=None` a model whose file holds only float16 tensors loads as float16 and anything else
(float32, bfloat16, mixed) as float32, because bfloat16 kernels do not compile on every tinygrad CPU backend. Pass
`dtype` to force one (bfloat16 only where the backend compiles it: tinylora.precision.check_dtype says what to install
otherwise). Integer tensors (quantized weights) keep their dtype.
"""
from __future__ import annotations
import pathlib
import numpy as np
from tinygrad import dtypes
from tinygrad.dtype import DType
from tinylora.errors import LoraError
from tinylora.formats.common import assign_weights
from tinylora.io import atomic_path, read_json, read_safetensors, write_json, write_safetensors
from tinylora.models.decoder import Model, ModelConfig
from tinylora.quant import prepare_quantized, quantization_config
from tinylora.tokenizer import HFTokenizer, token_text, tokenizers_package
from tinylora.tree import unique_state_dict

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"

def detect(path: pathlib.Path) -> bool: return path.is_dir()

def read(path: pathlib.Path, dtype: DType | None = None, dequantize: bool = False) -> Model:
  """A Model from an HF directory; quantized layers (an mlx-lm `quantization` entry) load packed whatever `dequantize`."""
  if not path.is_dir(): raise FileNotFoundError(f"model directory not found: {path}")
  config = read_json(path / CONFIG)
  model = Model(ModelConfig.from_hf(config))  # its lazy random init is replaced before it is ever realized
  weights = read_weights(path)
  if "quantization" in config: prepare_quantized(model, config["quantization"], set(weights))
  assign_weights(model, weights, dtype)
  return model

def read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors`, or of the shards listed in `model.safetensors.index.json`."""
  index = path / INDEX
  if not index.exists():
    if not (single := path / WEIGHTS).exists(): raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in {path}")
    return read_safetensors(single)[0]
  weight_map = read_json(index).get("weight_map")
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
    raise LoraError(f"{index}: expected a weight_map object of tensor name -> shard file name, found {str(weight_map)[:80]}")
  weights: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    if not (shard_path := path / shard).exists(): raise FileNotFoundError(f"shard listed in {index} not found: {shard_path}")
    part = read_safetensors(shard_path)[0]
    if twice := sorted(set(part) & set(weights)): raise LoraError(f"{index}: tensor {twice[0]!r} is stored in {shard} and in another shard")
    weights.update(part)
  if missing := sorted(set(weight_map) - set(weights)):
    raise LoraError(f"{index}: key {missing[0]!r} is listed in weight_map but not found in shard {weight_map[missing[0]]}")
  return weights

def write(model: Model, path: pathlib.Path, dtype: DType | None, quantization: str, tokenizer: HFTokenizer | None) -> None:
  """Directory `path` with config.json and model.safetensors (no lm_head.weight when tied; quantized layers packed,
  described by an mlx-lm `quantization` entry), and the tokenizer's files when `tokenizer` is given; `dtype` casts the
  float tensors, None keeps them. `quantization` is GGUF's and unused here."""
  arrays = {}
  for key, t in unique_state_dict(model).items():
    if dtype is not None and dtypes.is_float(t.dtype): t = t.cast(dtype)
    arrays[key] = t.numpy()
  float_types = {str(a.dtype) for a in arrays.values() if np.issubdtype(a.dtype, np.floating)}
  config = model.config.to_hf()
  config.pop("quantization", None)
  if packed := quantization_config(model): config["quantization"] = packed
  if len(float_types) == 1: config["torch_dtype"] = float_types.pop()
  write_safetensors(path / WEIGHTS, arrays, {"format": "pt"})
  (path / INDEX).unlink(missing_ok=True)  # a stale index would win over the new file on load
  write_json(path / CONFIG, config)
  if tokenizer is not None: write_tokenizer(tokenizer, path)

# ---------------------------------------------------------------- tokenizer files

def read_tokenizer(path: pathlib.Path) -> HFTokenizer:
  """`tokenizer.json` (and `tokenizer_config.json` beside it, when present) of a model directory, or the file itself."""
  file = path / TOKENIZER if path.is_dir() else path
  if not file.exists(): raise FileNotFoundError(f"tokenizer file not found: {file}")
  config_file = file.parent / TOKENIZER_CONFIG
  config = read_json(config_file) if config_file.exists() else {}
  tokenizers = tokenizers_package()
  try: tokenizer = tokenizers.Tokenizer.from_file(str(file))
  except Exception as e: raise LoraError(f"{file}: not a valid tokenizer.json ({e})") from e
  return HFTokenizer(tokenizer, config)

def write_tokenizer(tokenizer: HFTokenizer, directory: pathlib.Path) -> None:
  """Writes tokenizer.json and tokenizer_config.json (special tokens, chat template) for transformers and tinylora."""
  with atomic_path(directory / TOKENIZER) as tmp: tokenizer.tokenizer.save(str(tmp))
  config = {k: v for k, v in tokenizer.config.items() if k not in ("bos_token", "eos_token", "pad_token", "chat_template")}
  config |= {"tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"), "bos_token": tokenizer.bos_token,
             "eos_token": tokenizer.eos_token, "pad_token": token_text(tokenizer.config.get("pad_token")),
             "chat_template": tokenizer.chat_template}
  write_json(directory / TOKENIZER_CONFIG, {k: v for k, v in config.items() if v is not None})
