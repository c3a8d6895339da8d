"""llama.cpp GGUF model files (llama, mistral and qwen2 architectures), one file or a split set: read into tinylora's
Model with Q4_0 / Q4_1 / Q8_0 weights kept packed as tinylora.quant layers, and written from a merged model (2-D weights
in f32 / f16 / q8_0 / q4_0 / q4_1) with its tokenizer and chat template."""
from __future__ import annotations
import pathlib
import numpy as np
from tinygrad import dtypes
from tinygrad.dtype import DType
from tinylora.errors import LoraError
from tinylora.formats.common import assign_weights
from tinylora.formats.gguf import detect  # noqa: F401  this format's detect: a .gguf file
from tinylora.formats.gguf import (PACKED, TensorInfo, add_value, gguf_name, gguf_package, hf_name, llama3_scaling,
                                   permute_qk, qk_heads, read_array, read_gguf, read_packed,
                                   read_tokenizer as tokenizer_from_metadata, rope_freqs, tokenizer_keys, tokenizer_metadata,
                                   unpermute_qk, writer)
from tinylora.models.decoder import Model, ModelConfig
from tinylora.quant import QuantizedEmbedding, QuantizedLinear, prepare_quantized
from tinylora.tokenizer import HFTokenizer
from tinylora.tree import FrozenMapping, named_modules, unique_state_dict

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
QUANTIZATIONS = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3)}


# ---------------------------------------------------------------- reading

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

def read_weights(tensors: dict[str, TensorInfo], config: ModelConfig, where: str, dequantize: bool
                 ) -> tuple[dict[str, np.ndarray], dict]:
  """HF-named arrays (packed layers as `.weight` codes plus `.scales` / `.biases`) and the mlx-style `quantization`
  dict that describes the packed ones (empty when none are kept packed)."""
  weights, quantization = {}, {}
  for name, info in tensors.items():
    if name == "rope_freqs.weight": continue  # in the config (config_from_gguf)
    if (key := hf_name(name)) is None: raise LoraError(f"{where}: tensor {name!r} has no place in a {config.model_type} model")
    module, heads = key.rsplit(".", 1)[0], qk_heads(config, key)
    fix = (lambda a: unpermute_qk(a, heads)) if heads else (lambda a: a)
    if info.ggml_type in PACKED and not dequantize and key.endswith(".weight"):
      codes, scales, biases = read_packed(info)
      weights |= {key: fix(codes), f"{module}.scales": fix(scales), f"{module}.biases": fix(biases)}
      quantization[module] = {"bits": PACKED[info.ggml_type][0], "group_size": 32, "mode": "affine"}
    else: weights[key] = fix(read_array(info))
  return weights, quantization

def read(path: pathlib.Path, dtype: DType | None = None, dequantize: bool = False) -> Model:
  """A Model from a GGUF file (or the first file of a split set). Q4_0 / Q4_1 / Q8_0 weights stay packed as
  tinylora.quant layers unless `dequantize`; every other tensor is dequantized to `dtype` (default float16). The file's
  tokenizer metadata goes to `model.file_metadata`, to be carried into GGUF files saved from this model."""
  kv, tensors = read_gguf(path)
  if kv.get("general.type") == "adapter": raise LoraError(f"{path}: a LoRA adapter, not a model: load it with load_adapter")
  config = ModelConfig.from_hf(config_from_gguf(kv, tensors, str(path)))
  weights, quantization = read_weights(tensors, config, str(path), dequantize)
  model = Model(config)
  if quantization: prepare_quantized(model, quantization, set(weights))
  assign_weights(model, weights, dtype or dtypes.float16)
  model.file_metadata = FrozenMapping(tokenizer_keys(kv))
  return model

def read_tokenizer(path: pathlib.Path) -> HFTokenizer:
  """The tokenizer and chat template in a GGUF file's metadata."""
  return tokenizer_from_metadata(read_gguf(path)[0], str(path))

# ---------------------------------------------------------------- writing

def write(model: Model, path: pathlib.Path, dtype: DType | None, quantization: str, tokenizer: HFTokenizer | None) -> None:
  """Writes a merged model as one GGUF file, atomically: 2-D weights in `quantization` (rows that do not divide into
  32-weight blocks stay float16), norms and biases float32, as llama.cpp's converter writes them, with the tokenizer
  and chat template of `tokenizer`, or of the GGUF the model was loaded from. `dtype` is HF's and unused here."""
  gguf_package()  # a missing optional package is reported before any weight is dequantized
  metadata = tokenizer_metadata(tokenizer) if tokenizer is not None else dict(model.file_metadata)
  if not metadata: raise LoraError("a GGUF file carries its tokenizer: pass tokenizer=load_tokenizer(model_dir)")
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
  with writer(path, c, "model") as (w, gguf):
    w.add_block_count(c.num_hidden_layers); w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim); w.add_value_length(c.head_dim); w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta); w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_vocab_size(c.vocab_size)
    w.add_file_type(file_type); w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in metadata.items(): add_value(w, key, value)
    if c.rope.kind == "llama3": w.add_tensor("rope_freqs.weight", rope_freqs(c.rope))
    for key, a in weights.items():
      if (heads := qk_heads(c, key)) is not None: a = permute_qk(a, heads)
      kind = getattr(gguf.GGMLQuantizationType, type_name)
      if a.ndim < 2 or not key.endswith(".weight"): kind = gguf.GGMLQuantizationType.F32
      elif type_name.startswith("Q") and a.shape[-1] % 32: kind = gguf.GGMLQuantizationType.F16
      data = gguf.quants.quantize(a.astype(np.float32), kind)
      w.add_tensor(gguf_name(key), data, raw_dtype=kind if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None)
