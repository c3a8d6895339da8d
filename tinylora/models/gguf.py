"""Reading llama.cpp GGUF model files (llama, mistral and qwen2 architectures) into tinylora's Model.

The header is walked with tinygrad's own GGUF value readers (`tinygrad.llm.gguf`) and every tensor type tinygrad can
dequantize is dequantized by `ggml_data_to_tensor`. Q4_0, Q4_1 and Q8_0 are affine formats with 32 weights per block
and a float16 scale (and min), so they are repacked, without rounding, into `tinylora.quant`'s layout:
  Q4_1: w = d * q + m          -> scale d, bias m
  Q4_0: w = d * (q - 8)        -> scale d, bias -8d
  Q8_0: w = d * q (q: int8)    -> codes q + 128, scale d, bias -128d
(multiplying a float16 by a power of two is exact, and the dequantized values computed in float32 equal llama.cpp's).
"""
from __future__ import annotations
import io, json, os, pathlib, re, struct, types
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.llm.gguf import _GGML_QUANT, ggml_data_to_tensor, read_int32, read_int64, read_str, read_uint32, read_uint64, readers
from tinylora.errors import LoraError
from tinylora.io import atomic_path
from tinylora.models.llama import Model, ModelConfig, _rope_scaling, rope_inv_freq
from tinylora.models.pretrained import assign_weights
from tinylora.quant import QuantizedEmbedding, QuantizedLinear, dequantize_array, pack_array, prepare_quantized
from tinylora.tree import named_modules, unique_state_dict

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "BF16": 30}
# packed types kept as tinylora.quant layers: ggml type -> (bits, bytes per 32-weight block)
PACKED = {2: (4, 18), 3: (4, 20), 8: (8, 34)}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
_NATIVE = {0: np.float32, 1: np.float16}
# GGUF tensor name (after "blk.N.") -> HF module name (after "model.layers.N.")
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

@dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # numpy order (GGUF lists dimensions innermost first)
  ggml_type: int
  file: pathlib.Path
  offset: int  # absolute byte offset of the data in `file`

  @property
  def nbytes(self) -> int:
    n = int(np.prod(self.shape))
    if self.ggml_type in _GGML_QUANT:
      per_block, block_bytes = _GGML_QUANT[self.ggml_type]
      return n // per_block * block_bytes
    if self.ggml_type == 30: return 2 * n
    return n * np.dtype(_NATIVE[self.ggml_type]).itemsize

def _read_header(path: pathlib.Path) -> tuple[dict, list[TensorInfo]]:
  """The key/value metadata and the tensor directory of one GGUF file, with every offset checked against its size."""
  size = path.stat().st_size
  try:
    with open(path, "rb") as f:
      r = io.BufferedReader(f, 1 << 20)
      magic, version = r.read(4), read_int32(r)
      if magic != b"GGUF": raise LoraError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
      if version not in (2, 3): raise LoraError(f"{path}: GGUF version {version} is not supported (2 or 3)")
      n_tensors, n_kv = read_int64(r), read_int64(r)
      kv = {}
      for _ in range(n_kv):
        key, typ = read_str(r), read_int32(r)
        if typ not in readers: raise LoraError(f"{path}: metadata {key!r} has unknown value type {typ}")
        kv[key] = readers[typ](r)
      raw = [(read_str(r), tuple(read_uint64(r) for _ in range(read_uint32(r))), read_int32(r), read_uint64(r))
             for _ in range(n_tensors)]
      alignment = kv.get("general.alignment", 32)
      start = -(-r.tell() // alignment) * alignment
  except (EOFError, UnicodeDecodeError, ValueError, MemoryError, OverflowError, struct.error) as e:
    raise LoraError(f"{path}: truncated or corrupt GGUF header ({type(e).__name__}: {e})") from None
  infos = []
  for name, dims, typ, off in raw:
    if typ not in _NATIVE and typ != 30 and typ not in _GGML_QUANT:
      raise LoraError(f"{path}: tensor {name!r} has GGML type {typ}, which tinygrad cannot read")
    info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), typ, path, start + off)
    if info.offset + info.nbytes > size:
      raise LoraError(f"{path}: truncated: tensor {name!r} needs bytes up to {info.offset + info.nbytes}, the file has {size}")
    infos.append(info)
  return kv, infos

def split_paths(path: pathlib.Path, kv: dict) -> list[pathlib.Path]:
  """All files of a split set (`name-00001-of-0000N.gguf`), given its first file and that file's metadata."""
  if (count := kv.get("split.count", 1)) <= 1: return [path]
  if kv.get("split.no", 0) != 0: raise LoraError(f"{path}: part {kv['split.no'] + 1} of a split GGUF; open the first part")
  if not (m := re.match(r"^(.*)-00001-of-\d{5}\.gguf$", path.name)):
    raise LoraError(f"{path}: the first part of a split GGUF must be named NAME-00001-of-{count:05d}.gguf")
  paths = [path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
  if missing := [p for p in paths if not p.exists()]:
    raise LoraError(f"{path}: split GGUF of {count} parts: part {missing[0].name} is missing")
  return paths

def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, TensorInfo]]:
  """Metadata and tensor directory of a GGUF file, or of a whole split set given its first part."""
  path = pathlib.Path(path)
  if not path.is_file(): raise FileNotFoundError(f"GGUF file not found: {path}")
  kv, infos = _read_header(path)
  for part in split_paths(path, kv)[1:]: infos += _read_header(part)[1]
  return kv, {i.name: i for i in infos}

def _bytes(info: TensorInfo) -> np.ndarray:
  return np.fromfile(info.file, np.uint8, count=info.nbytes, offset=info.offset)

def read_array(info: TensorInfo) -> np.ndarray:
  """The tensor as float32/float16 numpy data: native floats as stored, the packed types dequantized in float32 as
  llama.cpp does, everything else dequantized by tinygrad."""
  if info.ggml_type in _NATIVE: return _bytes(info).view(_NATIVE[info.ggml_type]).reshape(info.shape)
  if info.ggml_type in PACKED:
    codes, scales, biases = read_packed(info)
    return dequantize_array(codes, scales.astype(np.float32), biases.astype(np.float32), PACKED[info.ggml_type][0], 32)
  n = int(np.prod(info.shape))
  return ggml_data_to_tensor(Tensor(_bytes(info)), n, info.ggml_type).reshape(info.shape).float().numpy()

def read_packed(info: TensorInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A Q4_0 / Q4_1 / Q8_0 matrix (out, in) as tinylora.quant's (uint32 codes, float16 scales, float16 biases)."""
  bits, block_bytes = PACKED[info.ggml_type]
  blocks = _bytes(info).reshape(*info.shape[:-1], info.shape[-1] // 32, block_bytes)
  d = blocks[..., :2].copy().view(np.float16)[..., 0]
  if info.ggml_type == 8:
    q, bias = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d * np.float16(-128)
  else:
    qs = blocks[..., 4:] if info.ggml_type == 3 else blocks[..., 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # byte j holds weight j (low nibble) and weight j+16 (high)
    bias = blocks[..., 2:4].copy().view(np.float16)[..., 0] if info.ggml_type == 3 else d * np.float16(-8)
  return pack_array(q.reshape(info.shape), bits), d, bias

def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's convert_hf_to_gguf row permutation of llama Q/K projections (rotate_half -> interleaved RoPE);
  works on any array whose first axis is the output rows (weights, packed codes, scales)."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf's permutation: the inverse of `unpermute_qk`."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def hf_name(name: str) -> str | None:
  """The HF state-dict key of a GGUF tensor name (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
  if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}" if m.group(2) in LAYER_NAMES else None
  stem, _, kind = name.rpartition(".")
  return f"{TOP_NAMES[stem]}.{kind}" if stem in TOP_NAMES else None

def config_from_gguf(kv: dict, tensors: dict[str, TensorInfo], where: str) -> dict:
  """An HF config.json dict from GGUF metadata."""
  arch = kv.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise LoraError(f"{where}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
  def get(key: str, default=None):
    if (value := kv.get(f"{arch}.{key}", default)) is None: raise LoraError(f"{where}: GGUF metadata lacks {arch}.{key}")
    return value
  heads = get("attention.head_count")
  hidden = get("embedding_length")
  head_dim, theta = get("attention.key_length", hidden // heads), get("rope.freq_base", 10000.0)
  vocab = kv.get(f"{arch}.vocab_size") or len(kv.get("tokenizer.ggml.tokens", [])) or tensors["token_embd.weight"].shape[0]
  config = {"model_type": arch, "architectures": [ARCHITECTURES[arch]], "hidden_size": hidden,
            "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
            "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv", heads),
            "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
            "rope_theta": theta, "max_position_embeddings": get("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in tensors,
            "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"), "eos_token_id": kv.get("tokenizer.ggml.eos_token_id")}
  if "rope_freqs.weight" in tensors:
    factors = read_array(tensors["rope_freqs.weight"]).astype(np.float32)
    if factors.shape != (head_dim // 2,):
      raise LoraError(f"{where}: rope_freqs has shape {factors.shape}, expected ({head_dim // 2},) for head_dim {head_dim}")
    if (factors != 1).any(): config["rope_scaling"] = llama3_scaling(factors, head_dim, theta, where)
  return config

def rope_freqs(head_dim: int, theta: float, scaling: tuple) -> np.ndarray:
  """llama.cpp's `rope_freqs` tensor for llama3 RoPE scaling: the factor each inverse frequency is divided by."""
  return (rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, scaling)).astype(np.float32)

def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, where: str) -> dict:
  """HF's llama3 `rope_scaling` that gives llama.cpp's `rope_freqs` factors. Long wavelengths are divided by `factor`,
  short ones kept, and in between 1/f = (1 - smooth) / factor + smooth with smooth = (L / wavelen - low) / (high - low)
  linear in 1/wavelen: with two or more such entries the line gives low and high for L = 8192 (any L with the same
  line gives the same frequencies); else Llama 3.x's own low 1, high 4, L 8192. Checked by recomputing the factors."""
  factor, wavelen = float(factors.max()), 2 * np.pi / rope_inv_freq(head_dim, theta).astype(np.float64)
  candidates, L = [(1.0, 4.0)], 8192.0
  if (medium := (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))).sum() >= 2:
    smooth = (1 / factors[medium].astype(np.float64) - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)  # slope = L / (high - low), intercept = -low / (high - low)
    candidates.insert(0, (-intercept * L / slope, (1 - intercept) * L / slope))
  for low, high in candidates:
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low), "high_freq_factor": float(high),
               "original_max_position_embeddings": int(L)}
    if np.allclose(rope_freqs(head_dim, theta, _rope_scaling({"rope_scaling": scaling})), factors, rtol=1e-5):
      return scaling
  raise LoraError(f"{where}: rope_freqs factors ({factors.min():.4g}..{factor:.4g}) do not follow llama3's RoPE scaling, "
                  "the only pattern supported")

def read_weights(kv: dict, tensors: dict[str, TensorInfo], config: dict, where: str, dequantize: bool
                 ) -> tuple[dict[str, np.ndarray], dict]:
  """HF-named arrays (packed layers as `.weight` codes plus `.scales` / `.biases`) and the mlx-style `quantization`
  dict that describes the packed ones (empty when none are kept packed)."""
  weights, quantization = {}, {}
  for name, info in tensors.items():
    if name == "rope_freqs.weight": continue  # in the config (config_from_gguf)
    if (key := hf_name(name)) is None: raise LoraError(f"{where}: tensor {name!r} has no place in a {config['model_type']} model")
    module = key.rsplit(".", 1)[0]
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}.get(
      module.split(".", 3)[-1]) if config["model_type"] != "qwen2" else None
    fix = (lambda a: unpermute_qk(a, heads)) if heads else (lambda a: a)
    if info.ggml_type in PACKED and not dequantize and key.endswith(".weight"):
      codes, scales, biases = read_packed(info)
      weights |= {key: fix(codes), f"{module}.scales": fix(scales), f"{module}.biases": fix(biases)}
      quantization[module] = {"bits": PACKED[info.ggml_type][0], "group_size": 32, "mode": "affine"}
    else: weights[key] = fix(read_array(info))
  if quantization:  # the most common format at the top level, as mlx-lm writes it; the others per layer
    formats = [tuple(q.items()) for q in quantization.values()]
    top = dict(max(set(formats), key=formats.count))
    quantization = {**top, **{m: q for m, q in quantization.items() if q != top}}
  return weights, quantization

def load_gguf(path: str | os.PathLike, dtype: DType | None = None, dequantize: bool = False):
  """A Model from a GGUF file (or the first file of a split set). Q4_0 / Q4_1 / Q8_0 weights stay packed as
  tinylora.quant layers unless `dequantize`; every other tensor is dequantized to `dtype` (default float16)."""
  kv, tensors = read_gguf(path)
  config = config_from_gguf(kv, tensors, str(path))
  weights, quantization = read_weights(kv, tensors, config, str(path), dequantize)
  model = Model(ModelConfig.from_hf(config))
  if quantization: prepare_quantized(model, quantization, set(weights))
  assign_weights(model, weights, dtype or dtypes.float16)
  # carried into GGUF files saved from this model; a read-only mapping, which tinygrad's state-dict walk skips
  model.gguf_tokenizer = types.MappingProxyType({k: v for k, v in kv.items() if k.startswith("tokenizer.")})
  return model

# ---------------------------------------------------------------- writing (llama.cpp's `gguf` package, optional extra)

QUANTIZATIONS = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3)}
_GGUF_NAMES = {hf: gg for gg, hf in LAYER_NAMES.items()} | {hf: gg for gg, hf in TOP_NAMES.items()}

def _gguf():
  try: import gguf
  except ImportError as e: raise ImportError("writing GGUF files needs llama.cpp's 'gguf' package: pip install tinylora[gguf]") from e
  return gguf

def gguf_name(key: str) -> str:
  """The GGUF tensor name of an HF state-dict key (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
  module, kind = key.rsplit(".", 1)
  if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module): return f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}.{kind}"
  return f"{_GGUF_NAMES[module]}.{kind}"

def _qk_heads(config, key: str) -> int | None:
  """The head count llama.cpp permutes a llama Q or K projection's rows with (None for anything else)."""
  if config.model_type == "qwen2": return None
  return {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}.get(
    key.rsplit(".", 1)[0].split(".", 3)[-1])

def write_model(model, path: str | os.PathLike, quantization: str, tokenizer_metadata: dict) -> None:
  """Writes a merged model as one GGUF file, atomically: 2-D weights in `quantization` (rows that do not divide into
  32-weight blocks stay float16), norms and biases float32, as llama.cpp's converter writes them."""
  gguf = _gguf()
  if quantization not in QUANTIZATIONS:
    raise LoraError(f"unknown GGUF quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
  c = model.config
  weights = {}
  packed = {p: m for p, m, _, _ in named_modules(model) if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
  for key, t in unique_state_dict(model).items():
    module, kind = key.rsplit(".", 1)
    if module in packed:
      if kind in ("scales", "biases"): continue
      if kind == "weight": t = packed[module].dequantize(dtypes.float32)
    weights[key] = t.float().numpy()
  if c.tie_word_embeddings: weights.pop("lm_head.weight", None)
  type_name, file_type = QUANTIZATIONS[quantization]
  arch = "llama" if c.model_type == "mistral" else c.model_type  # llama.cpp runs Mistral as llama
  with atomic_path(path) as tmp:
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(c.num_hidden_layers); w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim); w.add_value_length(c.head_dim); w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta); w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_vocab_size(c.vocab_size)
    w.add_file_type(file_type); w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in tokenizer_metadata.items(): _add_value(w, gguf, key, value)
    if c.rope_scaling: w.add_tensor("rope_freqs.weight", rope_freqs(c.head_dim, c.rope_theta, c.rope_scaling))
    for key, a in weights.items():
      if (heads := _qk_heads(c, key)) is not None: a = permute_qk(a, heads)
      kind = getattr(gguf.GGMLQuantizationType, type_name)
      if a.ndim < 2 or not key.endswith(".weight"): kind = gguf.GGMLQuantizationType.F32
      elif type_name.startswith("Q") and a.shape[-1] % 32: kind = gguf.GGMLQuantizationType.F16
      data = gguf.quants.quantize(a.astype(np.float32), kind)
      w.add_tensor(gguf_name(key), data, raw_dtype=kind if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

def write_adapter(layers: dict, config, path: str | os.PathLike) -> None:
  """Writes LoRA adapters (dotted path -> Adapter with lora_A (r, in), lora_B (out, r), scale, r) as a llama.cpp
  LoRA adapter (convert_lora_to_gguf.py's format, loaded with `--lora`): tensors `<gguf name>.lora_a` (r, in) and
  `.lora_b` (out, r) in float32, llama's Q/K rows permuted on B, and adapter.lora.alpha such that llama.cpp's scale
  alpha / r equals each layer's scale (folded into B where layers differ in rank or scale)."""
  gguf = _gguf()
  scales, ranks = {l.scale for l in layers.values()}, {l.r for l in layers.values()}
  alpha = scales.pop() * ranks.pop() if len(scales) == 1 and len(ranks) == 1 else 1.0
  with atomic_path(path) as tmp:
    w = gguf.GGUFWriter(str(tmp), "llama" if config.model_type == "mistral" else config.model_type)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for path_, layer in layers.items():
      if path_ == "lm_head" and config.tie_word_embeddings:
        raise LoraError("llama.cpp ignores an adapter on a tied lm_head; save this adapter as PEFT or mlx instead")
      A, B = layer.lora_A.float().numpy(), layer.lora_B.float().numpy() * (layer.scale * layer.r / alpha)
      if (heads := _qk_heads(config, f"{path_}.weight")) is not None: B = permute_qk(B, heads)
      name = gguf_name(f"{path_}.weight")
      w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(A, np.float32))
      w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(B, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

def _add_value(w, gguf, key: str, value) -> None:
  """One metadata value with the GGUF type llama.cpp expects for it (token ids uint32, flags bool, lists typed by item)."""
  if isinstance(value, bool): w.add_bool(key, value)
  elif isinstance(value, int): w.add_uint32(key, value)
  elif isinstance(value, float): w.add_float32(key, value)
  elif isinstance(value, str): w.add_string(key, value)
  elif isinstance(value, list) and value:
    w.add_array(key, value)

def tokenizer_metadata(tokenizer) -> dict:
  """GGUF `tokenizer.*` metadata for an HFTokenizer: the metadata it was read from, or, for a byte-level BPE
  tokenizer.json, its vocabulary, merges, token types (special added tokens are control tokens), special token ids,
  whether bos is added, and the chat template."""
  if (metadata := getattr(tokenizer, "gguf_metadata", None)) is not None: return dict(metadata)
  spec = json.loads(tokenizer.tokenizer.to_str())
  kinds = {spec.get("decoder", {}).get("type"), *(p.get("type") for p in spec.get("pre_tokenizer", {}).get("pretokenizers", []))}
  if spec["model"]["type"] != "BPE" or not ({"ByteLevel"} & (kinds | {spec.get("pre_tokenizer", {}).get("type")})):
    raise LoraError("only byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2 style) can be written to GGUF")
  vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
  tokens = [f"[PAD{i}]" for i in range(max(vocab.values()) + 1)]
  for token, i in vocab.items(): tokens[i] = token
  added = {t["id"]: t["special"] for t in spec.get("added_tokens", [])}
  types_ = [(CONTROL if added[i] else USER_DEFINED) if i in added else 1 for i in range(len(tokens))]
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
  probe = tokenizer.encode("a", add_special_tokens=True)
  out = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
         "tokenizer.ggml.token_type": types_, "tokenizer.ggml.merges": merges,
         "tokenizer.ggml.add_bos_token": tokenizer.bos_id is not None and probe[:1] == [tokenizer.bos_id]}
  for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)):
    if i is not None: out[f"tokenizer.ggml.{key}_token_id"] = i
  if tokenizer.chat_template: out["tokenizer.chat_template"] = tokenizer.chat_template
  return out
