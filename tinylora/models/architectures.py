"""The decoder families tinylora runs, as data: one `Architecture` per HF `model_type` says how that family differs from
Llama, and `ModelConfig.from_hf` reads a `config.json` through it into the numbers the one decoder (decoder.py) uses.
Adding a family is one entry here and its tests; for GGUF, the tensor names llama.cpp gives it where they differ
(tinylora/formats/gguf.py) and the metadata llama.cpp reads for it (`_CARRIED` in tinylora/formats/gguf_model.py).
"""
from __future__ import annotations
import math
from dataclasses import dataclass, field
from typing import Callable
import numpy as np
from tinylora.errors import LoraError

FULL, SLIDING = "full_attention", "sliding_attention"

def _every(n: int) -> Callable[[dict], list[str]]:
  """Layer kinds with every n-th layer full attention and the others sliding (Gemma 2: n=2, Gemma 3: n=6 by default)."""
  return lambda cfg: [FULL if (i + 1) % cfg.get("sliding_window_pattern", n) == 0 else SLIDING for i in range(cfg["num_hidden_layers"])]

def _all_sliding(cfg: dict) -> list[str]:  # Mistral v0.1: every layer, when a window is set
  return [SLIDING if cfg.get("sliding_window") else FULL] * cfg["num_hidden_layers"]

def _qwen_window(cfg: dict) -> list[str]:  # Qwen2/3: layers from max_window_layers on, when use_sliding_window
  on = cfg.get("use_sliding_window") and cfg.get("sliding_window")
  return [SLIDING if on and i >= cfg.get("max_window_layers", 28) else FULL for i in range(cfg["num_hidden_layers"])]

def _rope_flags(cfg: dict) -> list[int]:  # SmolLM3's no_rope_layers: 1 where a layer applies RoPE
  return cfg.get("no_rope_layers") or [int((i + 1) % cfg.get("no_rope_layer_interval", 4) != 0) for i in range(cfg["num_hidden_layers"])]

def _smollm3_window(cfg: dict) -> list[str]:  # SmolLM3: its no-RoPE layers, when use_sliding_window
  on = cfg.get("use_sliding_window") and cfg.get("sliding_window")
  return [SLIDING if on and not has_rope else FULL for has_rope in _rope_flags(cfg)]

def _all_full(cfg: dict) -> list[str]: return [FULL] * cfg["num_hidden_layers"]

@dataclass(frozen=True)
class Architecture:
  hf_class: str                       # the `architectures` entry transformers writes
  gguf: str                           # llama.cpp's `general.architecture`
  norms: str = "pre"                  # "pre": before attention and MLP; "sandwich": before and after both; "post": after both
  norm_plus_one: bool = False         # RMSNorm scales by 1 + w (Gemma; llama.cpp's GGUF stores 1 + w)
  qk_norm: str | None = None          # "head": RMSNorm of each head's q and k; "projection": of the whole q and k projections
  activation: str = "silu"            # the default of config's hidden_act / hidden_activation
  qkv_bias: bool = False              # q/k/v always carry a bias (Qwen2)
  config_bias: bool = False           # attention_bias (q/k/v/o) and mlp_bias come from the config
  fused: bool = False                 # qkv_proj and gate_up_proj instead of q/k/v_proj and gate/up_proj (Phi-3)
  embed_scale_sqrt: bool = False      # embeddings times sqrt(hidden_size) (Gemma)
  reads: tuple[str, ...] = ()         # the config's scale and soft-cap fields the family applies (other families ignore them)
  layer_types: Callable[[dict], list[str]] = _all_full  # when the config does not list them
  rope_theta: float = 10000.0         # the default base
  local_rope_theta: float | None = None  # the base of sliding layers, when it differs (Gemma 3)
  no_rope: bool = False               # no_rope_layers (SmolLM3)
  permute_qk: bool = False            # llama.cpp's converter permutes Q/K rows for interleaved RoPE
  aliases: tuple[str, ...] = ()       # other `architectures` names that load as this family
  lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # LoraConfig's default target_modules (PEFT's for the family)
  defaults: tuple[tuple[str, object], ...] = ()  # transformers' config defaults for fields a config.json may leave out

ARCHITECTURES: dict[str, Architecture] = {
  "llama": Architecture("LlamaForCausalLM", "llama", config_bias=True, permute_qk=True),
  "mistral": Architecture("MistralForCausalLM", "llama", layer_types=_all_sliding, permute_qk=True,
                          defaults=(("sliding_window", 4096),)),
  "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True, layer_types=_qwen_window),
  "qwen3": Architecture("Qwen3ForCausalLM", "qwen3", qk_norm="head", config_bias=True, layer_types=_qwen_window,
                        rope_theta=1e6),
  "gemma2": Architecture("Gemma2ForCausalLM", "gemma2", norms="sandwich", norm_plus_one=True, activation="gelu_pytorch_tanh",
                         embed_scale_sqrt=True, config_bias=True, layer_types=_every(2),
                         reads=("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
                         defaults=(("head_dim", 256), ("query_pre_attn_scalar", 256), ("sliding_window", 4096),
                                   ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0))),
  "gemma3_text": Architecture("Gemma3ForCausalLM", "gemma3", norms="sandwich", norm_plus_one=True, qk_norm="head",
                              activation="gelu_pytorch_tanh", embed_scale_sqrt=True, config_bias=True, layer_types=_every(6),
                              rope_theta=1e6, local_rope_theta=1e4, reads=("query_pre_attn_scalar", "final_logit_softcapping"),
                              defaults=(("head_dim", 256), ("query_pre_attn_scalar", 256), ("sliding_window", 4096))),
  "phi3": Architecture("Phi3ForCausalLM", "phi3", fused=True, layer_types=_all_sliding, lora_targets=("qkv_proj",),
                       defaults=(("original_max_position_embeddings", 4096),)),
  "smollm3": Architecture("SmolLM3ForCausalLM", "smollm3", config_bias=True, no_rope=True, layer_types=_smollm3_window,
                           rope_theta=2e6, permute_qk=True),
  "olmo2": Architecture("Olmo2ForCausalLM", "olmo2", norms="post", qk_norm="projection", config_bias=True, rope_theta=5e5),
  "granite": Architecture("GraniteForCausalLM", "granite", config_bias=True, permute_qk=True,
                          reads=("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")),
}
# families refused with what they need, rather than "unsupported"
NOT_SUPPORTED = {"qwen3_moe": "mixture-of-experts layers", "mixtral": "mixture-of-experts layers", "gpt_oss": "mixture-of-experts layers",
                 "qwen2_moe": "mixture-of-experts layers", "qwen3_next": "hybrid linear attention (gated DeltaNet)",
                 "qwen3_5": "hybrid linear attention (gated DeltaNet)", "lfm2": "hybrid linear attention (short convolutions)",
                 "gemma3n": "per-layer embeddings and KV sharing", "gemma4": "per-layer embeddings and KV sharing",
                 "gemma3": "a vision tower (load the text model, Gemma3ForCausalLM / model_type gemma3_text)"}
ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # SiLU, or GELU's tanh approximation
ROPE_TYPES = ("default", "linear", "llama3", "longrope")

def model_type_of(cfg: dict) -> str:
  """The config's model_type, or the family of its `architectures` entry."""
  by_class = {name: t for t, a in ARCHITECTURES.items() for name in (a.hf_class, *a.aliases)}
  model_type = cfg.get("model_type") or next((by_class.get(a, a) for a in cfg.get("architectures") or []), None)
  if model_type in NOT_SUPPORTED:
    raise LoraError(f"model_type {model_type!r} is not supported: tinylora's decoder has no {NOT_SUPPORTED[model_type]}")
  if model_type not in ARCHITECTURES:
    raise LoraError(f"unsupported model_type {model_type!r} (architectures {cfg.get('architectures')}); "
                    f"supported: {', '.join(ARCHITECTURES)}")
  return model_type

@dataclass(frozen=True)
class Rope:
  """Rotary embedding of the first `dim` dimensions of each head (all of them unless partial_rotary_factor < 1)."""
  theta: float
  dim: int
  scaling: tuple[tuple[str, object], ...] = ()  # rope_type and its parameters (lists as tuples), empty for plain RoPE

  @property
  def kind(self) -> str: return dict(self.scaling).get("rope_type", "default")

  def inv_freq(self, length: int) -> np.ndarray:
    """(dim/2,) inverse frequencies for sequences of up to `length` positions, in float32 as transformers computes them."""
    inv_freq = (1.0 / self.theta ** (np.arange(0, self.dim, 2, dtype=np.float32) / self.dim)).astype(np.float32)
    s = dict(self.scaling)
    if self.kind == "linear": return (inv_freq / np.float32(s["factor"])).astype(np.float32)
    if self.kind == "longrope":  # Phi-3: long factors once the sequence passes the pretraining length
      ext = np.asarray(s["long_factor"] if length > s["original_max_position_embeddings"] else s["short_factor"], np.float32)
      return (1.0 / (ext * self.theta ** (np.arange(0, self.dim, 2, dtype=np.float32) / self.dim))).astype(np.float32)
    if self.kind != "llama3": return inv_freq
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, (1 - smooth) * scaled / s["factor"] + smooth * scaled, scaled).astype(np.float32)

  @property
  def attention_factor(self) -> float:
    """The factor cos and sin are multiplied by (LongRoPE's, 1 for the others)."""
    if self.kind != "longrope": return 1.0
    s = dict(self.scaling)
    if s.get("attention_factor") is not None: return float(s["attention_factor"])
    factor = s.get("factor") or s["max_position_embeddings"] / s["original_max_position_embeddings"]
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(s["original_max_position_embeddings"]))

def _rope(params: dict, theta: float, dim: int, max_positions: int, where: str) -> Rope:
  """A Rope from one HF rope dict (`rope_parameters`, or the old `rope_scaling`) with `theta` already resolved."""
  rope_type = params.get("rope_type", params.get("type")) or "default"
  if rope_type not in ROPE_TYPES: raise LoraError(f"{where}: unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
  needs = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
           "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}[rope_type]
  if missing := [k for k in needs if params.get(k) is None]: raise LoraError(f"{where}: {rope_type} rope scaling lacks {missing}")
  if rope_type == "default": return Rope(theta, dim)
  keys = needs + (("factor", "attention_factor") if rope_type == "longrope" else ())
  scaling = {k: tuple(float(x) for x in params[k]) if isinstance(params[k], list) else float(params[k]) for k in keys if params.get(k) is not None}
  if rope_type == "longrope":
    for k in ("short_factor", "long_factor"):
      if len(scaling[k]) != dim // 2: raise LoraError(f"{where}: longrope {k} has {len(scaling[k])} entries, expected {dim // 2}")
    scaling["max_position_embeddings"] = float(max_positions)
  return Rope(theta, dim, (("rope_type", rope_type), *sorted(scaling.items())))

@dataclass(frozen=True)
class ModelConfig:
  """The numbers one decoder runs by, read from an HF `config.json` through the family's Architecture."""
  model_type: str
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  vocab_size: int
  rms_norm_eps: float
  max_position_embeddings: int
  tie_word_embeddings: bool
  rope: Rope                                    # of full-attention layers
  local_rope: Rope | None = None                # of sliding layers, when it differs
  layer_types: tuple[str, ...] = ()             # FULL or SLIDING per layer
  rope_layers: tuple[bool, ...] = ()            # per layer: whether it applies RoPE
  sliding_window: int | None = None
  attention_bias: bool = False                  # q/k/v carry a bias
  output_bias: bool = False                     # o_proj carries a bias
  mlp_bias: bool = False
  hidden_act: str = "silu"
  attention_scale: float = 0.0                  # scores = q.k * attention_scale (head_dim ** -0.5 unless the config says)
  embedding_multiplier: float = 1.0
  residual_multiplier: float = 1.0
  logits_scaling: float = 1.0                   # logits are divided by it (Granite)
  attn_logit_softcapping: float | None = None   # scores -> cap * tanh(scores / cap) (Gemma 2)
  final_logit_softcapping: float | None = None
  hf: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json dict, written back on save

  @property
  def arch(self) -> Architecture: return ARCHITECTURES[self.model_type]
  @property
  def rope_theta(self) -> float: return self.rope.theta

  def layer_rope(self, layer: int) -> Rope | None:
    """The RoPE layer `layer` applies, None for none."""
    if not self.rope_layers[layer]: return None
    return self.local_rope if self.layer_types[layer] == SLIDING and self.local_rope is not None else self.rope

  @classmethod
  def from_hf(cls, cfg: dict) -> ModelConfig:
    """Builds the config from a Hugging Face `config.json` dict; raises LoraError for anything this decoder cannot run."""
    model_type = model_type_of(cfg)
    arch = ARCHITECTURES[model_type]
    hf, cfg = dict(cfg), {**dict(arch.defaults), **cfg}  # an explicit null in the file wins (e.g. no sliding_window)
    where = f"config.json ({model_type})"
    try:
      heads, hidden, layers = cfg["num_attention_heads"], cfg["hidden_size"], cfg["num_hidden_layers"]
      kv_heads = cfg.get("num_key_value_heads") or heads
      if heads % kv_heads: raise LoraError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
      head_dim = cfg.get("head_dim") or hidden // heads
      if not cfg.get("head_dim") and hidden % heads:
        raise LoraError(f"{where}: hidden_size {hidden} does not divide into num_attention_heads {heads}; give head_dim")
      layer_types = tuple(cfg.get("layer_types") or arch.layer_types(cfg))
      if len(layer_types) != layers or not set(layer_types) <= {FULL, SLIDING}:
        raise LoraError(f"{where}: layer_types must list {layers} entries of {FULL!r} / {SLIDING!r}, found {list(layer_types)[:4]}...")
      window = cfg.get("sliding_window")
      if SLIDING in layer_types and not (isinstance(window, int) and window > 0):
        raise LoraError(f"{where}: sliding_attention layers need a positive sliding_window, found {window!r}")
      rope_layers = tuple(bool(x) for x in _rope_flags(cfg)) if arch.no_rope else (True,) * layers
      if len(rope_layers) != layers: raise LoraError(f"{where}: no_rope_layers must have {layers} entries, found {len(rope_layers)}")
      rope, local_rope = _ropes(cfg, arch, head_dim, where)
      act = cfg.get("hidden_activation") or cfg.get("hidden_act") or arch.activation
      if act not in ACTIVATIONS: raise LoraError(f"{where}: unsupported activation {act!r}; supported: {', '.join(ACTIVATIONS)}")
      def read(key: str, default=None):  # a scale or soft-cap field, where the family applies it
        return cfg.get(key, default) if key in arch.reads else default
      scale = read("query_pre_attn_scalar", head_dim) ** -0.5 if "attention_multiplier" not in arch.reads else \
        float(read("attention_multiplier", 1.0))
      bias = arch.config_bias and bool(cfg.get("attention_bias", False))
      return cls(model_type=model_type, hidden_size=hidden, intermediate_size=cfg["intermediate_size"], num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=cfg["vocab_size"],
                 rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                 tie_word_embeddings=cfg.get("tie_word_embeddings", arch.embed_scale_sqrt), rope=rope, local_rope=local_rope,
                 layer_types=layer_types, rope_layers=rope_layers, sliding_window=window if SLIDING in layer_types else None,
                 attention_bias=arch.qkv_bias or bias, output_bias=bias,
                 mlp_bias=arch.config_bias and bool(cfg.get("mlp_bias", False)), hidden_act=act, attention_scale=float(scale),
                 embedding_multiplier=math.sqrt(hidden) if arch.embed_scale_sqrt else float(read("embedding_multiplier", 1.0)),
                 residual_multiplier=float(read("residual_multiplier", 1.0)), logits_scaling=float(read("logits_scaling", 1.0)),
                 attn_logit_softcapping=read("attn_logit_softcapping"), final_logit_softcapping=read("final_logit_softcapping"),
                 hf=hf)
    except KeyError as e: raise LoraError(f"{where} lacks required field {e.args[0]!r}") from e

  def to_hf(self) -> dict:
    """The `config.json` dict: the one this config was read from, with model_type and architectures filled in."""
    out = dict(self.hf, model_type=self.model_type)
    out.setdefault("architectures", [self.arch.hf_class])
    return out

def _ropes(cfg: dict, arch: Architecture, head_dim: int, where: str) -> tuple[Rope, Rope | None]:
  """The RoPE of full-attention layers and, when it differs, of sliding ones, from either spelling transformers has
  written: a top-level rope_theta / rope_scaling (/ rope_local_base_freq), or `rope_parameters` (per layer type for Gemma 3)."""
  params = cfg.get("rope_parameters") or {}
  per_type = FULL in params or SLIDING in params
  full = dict(params.get(FULL) or {}) if per_type else dict(params)
  if not per_type and cfg.get("rope_scaling"): full = {**cfg["rope_scaling"], **full}
  if full.get("rope_type", full.get("type")) in ("llama3", "longrope"):  # as transformers: a top-level value wins
    if "original_max_position_embeddings" in cfg: full["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    full.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
  partial = full.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
  dim = int(head_dim * partial)
  if dim % 2 or dim <= 0: raise LoraError(f"{where}: partial_rotary_factor {partial} gives {dim} rotary dimensions, not a positive even number")
  max_positions = cfg.get("max_position_embeddings", 2048)
  rope = _rope(full, full.get("rope_theta", cfg.get("rope_theta", arch.rope_theta)), dim, max_positions, where)
  if arch.local_rope_theta is None: return rope, None
  local = dict(params.get(SLIDING) or {}) if per_type else {}
  return rope, _rope(local, local.get("rope_theta", cfg.get("rope_local_base_freq", arch.local_rope_theta)), dim, max_positions, where)
