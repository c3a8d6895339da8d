"""llama.cpp GGUF model files of every family in tinylora.models.architectures (GGUF architectures llama (Llama and
Mistral), qwen2, qwen3, gemma2, gemma3, phi3, smollm3, olmo2, granite), one file or a split set: read into tinylora's
Model with Q4_0 / Q4_1 / Q8_0 weights kept packed as tinylora.quant layers, and written from a merged model (2-D weights
in f32 / f16 / q8_0 / q4_0 / q4_1) with its tokenizer and chat template, with llama.cpp's tensor names, metadata keys and
RoPE tensors (rope_freqs for llama3 scaling, rope_factors_long / _short for Phi-3's LongRoPE).

What a file means is what its metadata gives through `config_from_gguf`, including what llama.cpp fixes per architecture
(Gemma's attention scale and sliding-window pattern, SmolLM3's RoPE-less layers). A model the file could not describe
(a sliding window on an architecture without one, a soft-cap or scale llama.cpp would not apply) is refused on save."""
from __future__ import annotations
import dataclasses, math, pathlib, re
from typing import Any, Callable
import numpy as np
from tinygrad import dtypes
from tinygrad.dtype import DType
from tinylora.errors import LoraError
from tinylora.formats.common import assign_weights
from tinylora.formats.gguf import detect  # noqa: F401  this format's detect: a .gguf file
from tinylora.formats.gguf import (PACKED, ROPE_TENSORS, TensorInfo, add_value, defined_tensors, family, gguf_name,
                                   gguf_package, hf_name, llama3_scaling, norm_shift, permute_qk, qk_heads, read_array,
                                   read_gguf, read_packed, read_tokenizer as tokenizer_from_metadata, rope_freqs,
                                   tokenizer_keys, tokenizer_metadata, unpermute_qk, writer)
from tinylora.io import check_arrays
from tinylora.models.architectures import ARCHITECTURES, FULL, SLIDING, Rope
from tinylora.models.decoder import Model, ModelConfig
from tinylora.quant import QuantizedEmbedding, QuantizedLinear, prepare_quantized
from tinylora.tokenizer import HFTokenizer
from tinylora.tree import FrozenMapping, named_modules, unique_state_dict

QUANTIZATIONS = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3)}

# Metadata an architecture carries beyond the hyperparameters of every file, as llama.cpp reads it: (key after
# "<arch>.", the HF config field it fills, its value in a ModelConfig (None: not written), llama.cpp's value when the key
# is absent). A value of 0 means none (Phi-3's converter writes sliding_window 0 for no window).
Carried = tuple[str, str, Callable[[ModelConfig], Any], Any]
_CARRIED: dict[str, tuple[Carried, ...]] = {
  "gemma2": (("attention.sliding_window", "sliding_window", lambda c: c.sliding_window, 4096),
             ("attn_logit_softcapping", "attn_logit_softcapping", lambda c: c.attn_logit_softcapping, 50.0),
             ("final_logit_softcapping", "final_logit_softcapping", lambda c: c.final_logit_softcapping, 30.0)),
  "gemma3": (("attention.sliding_window", "sliding_window", lambda c: c.sliding_window, None),
             ("final_logit_softcapping", "final_logit_softcapping", lambda c: c.final_logit_softcapping, None),
             ("rope.freq_base_swa", "rope_local_base_freq", lambda c: c.local_rope.theta, 10000.0)),
  "phi3": (("attention.sliding_window", "sliding_window", lambda c: c.sliding_window or 0, None),),
  "granite": (("attention.scale", "attention_multiplier", lambda c: c.attention_scale, None),
              ("embedding_scale", "embedding_multiplier", lambda c: c.embedding_multiplier, None),
              ("residual_scale", "residual_multiplier", lambda c: c.residual_multiplier, None),
              ("logit_scale", "logits_scaling", lambda c: c.logits_scaling, None)),
}
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}  # llama.cpp's set_swa_pattern: layer i slides unless i % n == n - 1
_LARGEST = {"gemma2": 46, "gemma3": 62}  # layer counts of the 27B models, whose queries llama.cpp scales by (hidden / heads) ** -0.5
_NO_ROPE_INTERVAL = {"smollm3": 4}  # llama.cpp's n_no_rope_layer_step: every 4th layer without RoPE


# ---------------------------------------------------------------- reading

def config_from_gguf(kv: dict, tensors: dict[str, Any], where: str) -> dict:
  """An HF config.json dict from GGUF metadata and the file's tensors (TensorInfo, or arrays: anything with a shape)."""
  arch = kv.get("general.architecture")
  model_type = family(arch, where)
  def get(key: str, default=None):
    if (value := kv.get(f"{arch}.{key}", default)) is None: raise LoraError(f"{where}: GGUF metadata lacks {arch}.{key}")
    return value
  heads, hidden, layers = get("attention.head_count"), get("embedding_length"), get("block_count")
  head_dim = get("attention.key_length", hidden // heads)
  rope_dim, theta = get("rope.dimension_count", head_dim), get("rope.freq_base", 10000.0)
  vocab = kv.get(f"{arch}.vocab_size") or len(kv.get("tokenizer.ggml.tokens", [])) or tensors["token_embd.weight"].shape[0]
  config = {"model_type": model_type, "architectures": [ARCHITECTURES[model_type].hf_class], "hidden_size": hidden,
            "intermediate_size": get("feed_forward_length"), "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": get("attention.head_count_kv", heads), "head_dim": head_dim, "vocab_size": vocab,
            "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "rope_theta": theta,
            "max_position_embeddings": get("context_length", 2048), "tie_word_embeddings": "output.weight" not in tensors,
            "attention_bias": "blk.0.attn_output.bias" in tensors, "mlp_bias": "blk.0.ffn_down.bias" in tensors,
            "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"), "eos_token_id": kv.get("tokenizer.ggml.eos_token_id")}
  if rope_dim != head_dim: config["partial_rotary_factor"] = rope_dim / head_dim
  if scaling := _rope_scaling(kv, tensors, arch, rope_dim, theta, where):
    config["rope_scaling"] = scaling
    if "original_max_position_embeddings" in scaling:  # where transformers reads it first (Phi-3)
      config["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
  for key, field, _, default in _CARRIED.get(arch, ()):
    if (value := kv.get(f"{arch}.{key}", default)) not in (None, 0): config[field] = value
  return config | _fixed(arch, config)

def _fixed(arch: str, config: dict) -> dict:
  """The HF config fields llama.cpp fixes for architecture `arch` instead of reading them."""
  out: dict[str, Any] = {}
  if arch in _SWA_PERIOD:
    large = config["num_hidden_layers"] == _LARGEST[arch]
    out["query_pre_attn_scalar"] = config["hidden_size"] / config["num_attention_heads"] if large else config["head_dim"]
    n = _SWA_PERIOD[arch]
    out["layer_types"] = [SLIDING if config.get("sliding_window") and i % n < n - 1 else FULL for i in range(config["num_hidden_layers"])]
  if arch in _NO_ROPE_INTERVAL: out["no_rope_layer_interval"] = _NO_ROPE_INTERVAL[arch]
  return out

def _array(t: Any) -> np.ndarray: return read_array(t) if isinstance(t, TensorInfo) else np.asarray(t)

def _rope_scaling(kv: dict, tensors: dict[str, Any], arch: str, dim: int, theta: float, where: str) -> dict | None:
  """HF's rope_scaling of a file: llama3 from `rope_freqs`, LongRoPE from `rope_factors_long` / `_short`, linear from
  rope.scaling.type; None for plain RoPE."""
  if "rope_freqs.weight" in tensors:
    factors = _array(tensors["rope_freqs.weight"]).astype(np.float32)
    if factors.shape != (dim // 2,):
      raise LoraError(f"{where}: rope_freqs has shape {factors.shape}, expected ({dim // 2},) for {dim} rotary dimensions")
    return llama3_scaling(factors, dim, theta, where) if (factors != 1).any() else None
  if "rope_factors_long.weight" in tensors:
    if (original := kv.get(f"{arch}.rope.scaling.original_context_length")) is None:
      raise LoraError(f"{where}: rope_factors_long needs GGUF metadata {arch}.rope.scaling.original_context_length")
    factors = {k: _array(tensors[f"rope_factors_{k}.weight"]).astype(np.float32).tolist() if f"rope_factors_{k}.weight" in tensors
               else None for k in ("long", "short")}
    if factors["short"] is None: raise LoraError(f"{where}: tensor 'rope_factors_short.weight' is missing beside rope_factors_long")
    attention = kv.get(f"{arch}.rope.scaling.attn_factor")
    return {"rope_type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
            "original_max_position_embeddings": original, **({"attention_factor": attention} if attention is not None else {})}
  if (kind := kv.get(f"{arch}.rope.scaling.type", "none")) == "linear":
    return {"rope_type": "linear", "factor": kv.get(f"{arch}.rope.scaling.factor", 1.0)}
  if kind != "none": raise LoraError(f"{where}: GGUF rope scaling type {kind!r} is not supported (linear, or llama3 / LongRoPE tensors)")
  return None

def read_weights(tensors: dict[str, TensorInfo], model: Model, where: str, dequantize: bool) -> tuple[dict[str, np.ndarray], dict]:
  """HF-named arrays for `model` (packed layers as `.weight` codes plus `.scales` / `.biases`) and the mlx-style
  `quantization` dict that describes the packed ones (empty when none are kept packed). Every tensor name and shape is
  checked against the model first, named as the file names it."""
  config, arch = model.config, model.config.arch
  check_arrays(where, tensors, {gguf_name(k, arch): tuple(t.shape) for k, t in unique_state_dict(model).items()}, ROPE_TENSORS)
  weights, quantization = {}, {}
  for name, info in tensors.items():
    if name in ROPE_TENSORS: continue  # in the config (config_from_gguf)
    key = hf_name(name, arch)
    module, heads = key.rsplit(".", 1)[0], qk_heads(config, key)
    fix = (lambda a: unpermute_qk(a, heads)) if heads else (lambda a: a)
    if info.ggml_type in PACKED and not dequantize and key.endswith(".weight"):
      codes, scales, biases = read_packed(info)
      weights |= {key: fix(codes), f"{module}.scales": fix(scales), f"{module}.biases": fix(biases)}
      quantization[module] = {"bits": PACKED[info.ggml_type][0], "group_size": 32, "mode": "affine"}
    else:
      a = fix(read_array(info))
      weights[key] = a - a.dtype.type(shift) if (shift := norm_shift(key, arch)) else a
  return weights, quantization

def read(path: pathlib.Path, dtype: DType | None = None, dequantize: bool = False) -> Model:
  """A Model from a GGUF file (or the first file of a split set). Q4_0 / Q4_1 / Q8_0 weights stay packed as
  tinylora.quant layers unless `dequantize`; every other tensor, and the packed layers' scales, load as `dtype`,
  float32 by default whatever the file stores (as llama.cpp computes on the CPU). The file's tokenizer metadata goes to
  `model.file_metadata`, to be carried into GGUF files saved from this model."""
  kv, tensors = read_gguf(path)
  if kv.get("general.type") == "adapter": raise LoraError(f"{path}: a LoRA adapter, not a model: load it with load_adapter")
  model = Model(ModelConfig.from_hf(config_from_gguf(kv, tensors, str(path))))  # lazy init, replaced before it is realized
  weights, quantization = read_weights(tensors, model, str(path), dequantize)
  if quantization: prepare_quantized(model, quantization, set(weights))
  assign_weights(model, weights, dtype or dtypes.float32)
  model.file_metadata = FrozenMapping(tokenizer_keys(kv))
  return model

def read_tokenizer(path: pathlib.Path) -> HFTokenizer:
  """The tokenizer and chat template in a GGUF file's metadata."""
  return tokenizer_from_metadata(read_gguf(path)[0], str(path))

# ---------------------------------------------------------------- writing

def metadata(c: ModelConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The architecture's metadata (keys after "<arch>.", ints written as uint32 and floats as float32) and the RoPE
  tensors llama.cpp reads for a model with config `c`."""
  kv: dict[str, Any] = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
                        "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
                        "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                        "rope.dimension_count": c.rope.dim, "rope.freq_base": float(c.rope.theta),
                        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "vocab_size": c.vocab_size}
  tensors, scaling = {}, dict(c.rope.scaling)
  if c.rope.kind == "llama3": tensors["rope_freqs.weight"] = rope_freqs(c.rope)
  if c.rope.kind == "linear": kv |= {"rope.scaling.type": "linear", "rope.scaling.factor": float(scaling["factor"])}
  if c.rope.kind == "longrope":
    tensors |= {f"rope_factors_{k}.weight": np.array(scaling[f"{k}_factor"], np.float32) for k in ("long", "short")}
    kv |= {"rope.scaling.original_context_length": int(scaling["original_max_position_embeddings"]),
           "rope.scaling.attn_factor": float(c.rope.attention_factor)}
  for key, _, value, _ in _CARRIED.get(c.arch.gguf, ()):
    if (v := value(c)) is not None: kv[key] = v if isinstance(v, int) else float(v)
  return kv, tensors

def _same(a: Any, b: Any) -> bool:
  """Whether two config values behave alike: RoPEs by their frequencies, numbers to float32 precision."""
  if isinstance(a, Rope) and isinstance(b, Rope):
    return a.dim == b.dim and math.isclose(a.attention_factor, b.attention_factor, rel_tol=1e-6) and \
      all(np.allclose(a.inv_freq(n), b.inv_freq(n), rtol=1e-5, atol=0) for n in (1, 1 << 30))
  if isinstance(a, tuple) and isinstance(b, tuple): return len(a) == len(b) and all(map(_same, a, b))
  if isinstance(a, float) or isinstance(b, float):
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
  return a == b

def check_carried(c: ModelConfig, kv: dict[str, Any], tensors: dict[str, np.ndarray], where: str) -> None:
  """Refuses a model whose file would not read back as it: every tensor must be one llama.cpp defines for the
  architecture, and the config `config_from_gguf` gives for the file must equal the model's in every number (the
  model_type aside: Mistral reads back as Llama)."""
  gguf, arch = gguf_package(), c.arch.gguf
  defined = defined_tensors(gguf, c)
  if bad := [n for n in tensors if re.sub(r"^blk\.\d+\.", "blk.{bid}.", n.rsplit(".", 1)[0]) not in defined]:
    raise LoraError(f"{where}: llama.cpp's {arch!r} architecture has no tensor {bad[0]!r} (this {c.model_type} model's "
                    f"{'untied output head' if bad[0].startswith('output.') else 'tensor'} has no place in its GGUF file)")
  back = ModelConfig.from_hf(config_from_gguf({"general.architecture": arch, **{f"{arch}.{k}": v for k, v in kv.items()}},
                                              tensors, where))
  if differ := [f.name for f in dataclasses.fields(ModelConfig) if f.compare and f.name != "model_type"
                and not _same(getattr(c, f.name), getattr(back, f.name))]:
    raise LoraError(f"{where}: llama.cpp's {arch!r} GGUF cannot carry this {c.model_type} model: it would read back with other "
                    + "; ".join(f"{n} ({getattr(back, n)!r}, not {getattr(c, n)!r})" for n in differ))

def write(model: Model, path: pathlib.Path, dtype: DType | None, quantization: str, tokenizer: HFTokenizer | None) -> None:
  """Writes a merged model as one GGUF file, atomically: 2-D weights in `quantization` (rows that do not divide into
  32-weight blocks stay float16), norms and biases float32, as llama.cpp's converter writes them (Gemma's norms as 1 + w,
  Q/K rows permuted where the family's converter permutes them), with the tokenizer and chat template of `tokenizer`, or
  of the GGUF the model was loaded from. A model the file cannot describe is refused before anything is written.
  `dtype` is HF's and unused here."""
  gguf_package()  # a missing optional package is reported before any weight is dequantized
  tokenizer_kv = tokenizer_metadata(tokenizer) if tokenizer is not None else dict(model.file_metadata)
  if not tokenizer_kv: raise LoraError("a GGUF file carries its tokenizer: pass tokenizer=load_tokenizer(model_dir)")
  if quantization not in QUANTIZATIONS:
    raise LoraError(f"unknown GGUF quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
  c, arch = model.config, model.config.arch
  kv, tensors = metadata(c)
  packed = {p: m for p, m, _, _ in named_modules(model) if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
  for key, t in unique_state_dict(model).items():
    module, kind = key.rsplit(".", 1)
    if module in packed:
      if kind in ("scales", "biases"): continue
      if kind == "weight": t = packed[module].dequantize(dtypes.float32)
    if key == "lm_head.weight" and c.tie_word_embeddings: continue
    a = t.float().numpy()
    if shift := norm_shift(key, arch): a = a + np.float32(shift)
    tensors[gguf_name(key, arch)] = permute_qk(a, heads) if (heads := qk_heads(c, key)) is not None else a
  check_carried(c, kv, tensors, str(path))
  type_name, file_type = QUANTIZATIONS[quantization]
  with writer(path, c, "model") as (w, gguf):
    for key, value in kv.items(): add_value(w, f"{arch.gguf}.{key}", value)
    w.add_file_type(file_type); w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in tokenizer_kv.items(): add_value(w, key, value)
    for name, a in tensors.items():
      kind = getattr(gguf.GGMLQuantizationType, type_name)
      if a.ndim < 2 or not name.endswith(".weight"): kind = gguf.GGMLQuantizationType.F32
      elif type_name.startswith("Q") and a.shape[-1] % 32: kind = gguf.GGMLQuantizationType.F16
      data = gguf.quants.quantize(a.astype(np.float32), kind)
      w.add_tensor(name, data, raw_dtype=kind if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None)
