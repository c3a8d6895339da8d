"""Llama, Mistral and Qwen2 decoders in one file, with Hugging Face module names so state-dict keys equal checkpoint keys.

Every projection is a plain `nn.Linear` attribute called through `base_forward(self.q_proj, x)`, which gives frozen
linears a faster backward (see tinylora/device_policy.py) and calls any other module as it is: LoRA injection and quantization
replace these attributes with other callables, so the forward reads no other projection attribute.

Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) is not implemented: it equals full causal
attention while a sequence fits the window, so longer sequences raise LoraError instead of silently differing.
"""
from __future__ import annotations
import functools, math
from dataclasses import dataclass, field
import numpy as np
from tinygrad import Tensor, UOp, dtypes, function, nn
from tinygrad.dtype import DType
from tinylora.engine import is_training, outside_capture
from tinylora.errors import LoraError
from tinylora.precision import check_dtype
from tinylora.tree import FrozenMapping, named_modules, unique_state_dict
from tinylora.device_policy import base_forward

SUPPORTED = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

@dataclass(frozen=True)
class ModelConfig:
  model_type: str
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  vocab_size: int
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  tie_word_embeddings: bool
  attention_bias: bool  # q/k/v (and for llama o_proj) carry a bias
  mlp_bias: bool = False
  rope_scaling: tuple[tuple[str, float], ...] = ()  # llama3 scaling parameters, empty for plain RoPE
  sliding_window: int | None = None
  hf: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json dict, written back on save

  @classmethod
  def from_hf(cls, cfg: dict) -> ModelConfig:
    """Builds the config from a Hugging Face `config.json` dict; raises LoraError for anything this model cannot run."""
    model_type = cfg.get("model_type") or next((_ARCHITECTURES.get(a, a) for a in cfg.get("architectures", [])), None)
    if model_type not in SUPPORTED:
      raise LoraError(f"unsupported model_type {model_type!r} (architectures {cfg.get('architectures')}); "
                      f"supported: {', '.join(SUPPORTED)}")
    try:
      heads = cfg["num_attention_heads"]
      if heads % (cfg.get("num_key_value_heads") or heads):
        raise LoraError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {cfg['num_key_value_heads']}")
      rope = cfg.get("rope_parameters") or {}
      # sliding_window is honoured by refusing longer sequences (see Model.__call__); qwen2 uses it only when asked to
      sliding = model_type == "mistral" or cfg.get("use_sliding_window") or "sliding_attention" in cfg.get("layer_types", [])
      llama = model_type == "llama"
      return cls(model_type=model_type, hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                 num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                 num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                 head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
                 rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                 max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                 tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                 attention_bias=model_type == "qwen2" or (llama and cfg.get("attention_bias", False)),
                 mlp_bias=llama and cfg.get("mlp_bias", False), rope_scaling=_rope_scaling(cfg),
                 sliding_window=cfg.get("sliding_window") if sliding else None, hf=dict(cfg))
    except KeyError as e: raise LoraError(f"config.json for {model_type} lacks required field {e.args[0]!r}") from e

  def to_hf(self) -> dict:
    """The `config.json` dict: the one this config was read from, with the fields the model uses written back."""
    out = dict(self.hf, model_type=self.model_type, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
               num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
               num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, vocab_size=self.vocab_size,
               rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
               tie_word_embeddings=self.tie_word_embeddings)
    if "rope_parameters" in out: out["rope_parameters"] = dict(out["rope_parameters"], rope_theta=self.rope_theta)
    else: out["rope_theta"] = self.rope_theta
    if self.model_type == "llama": out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
    out.setdefault("architectures", [next(a for a, t in _ARCHITECTURES.items() if t == self.model_type)])
    return out

def _rope_scaling(cfg: dict) -> tuple[tuple[str, float], ...]:
  scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type in (None, "default"): return ()
  if rope_type != "llama3": raise LoraError(f"unsupported rope type {rope_type!r}; supported: default, llama3")
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  if missing := [k for k in keys if k not in scaling]: raise LoraError(f"llama3 rope scaling lacks {missing}")
  return tuple((k, float(scaling[k])) for k in keys)

def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = ()) -> np.ndarray:
  """RoPE's (head_dim/2,) inverse frequencies, with llama3 scaling when `scaling` holds its parameters, in float32 as
  transformers computes them."""
  inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)
  if not scaling: return inv_freq
  s = dict(scaling)
  low_wavelen, high_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"], \
                              s["original_max_position_embeddings"] / s["high_freq_factor"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
  smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, (1 - smooth) * scaled / s["factor"] + smooth * scaled, scaled).astype(np.float32)

ROPE_TABLES = 8  # the (cos, sin) tables kept between calls: a few per model (training length, decode cache sizes)

@functools.lru_cache(maxsize=ROPE_TABLES)
def _rope_table(head_dim: int, theta: float, scaling: tuple, length: int, device: str | tuple[str, ...]) -> tuple[Tensor, Tensor]:
  """cos and sin of shape (length, head_dim) in HF's rotate_half layout, computed in float32 as transformers does, on
  the model's device (a tuple of devices: a copy on each). The least recently used table is dropped beyond ROPE_TABLES,
  so a long-lived process that sees many lengths or devices does not keep them all (a captured step keeps its own)."""
  freqs = np.outer(np.arange(length, dtype=np.float32), rope_inv_freq(head_dim, theta, scaling))
  emb = np.concatenate([freqs, freqs], axis=-1)
  with outside_capture():  # made now even inside a TinyJit capture, which would otherwise redo it in every replay
    return Tensor(np.cos(emb), device=device).realize(), Tensor(np.sin(emb), device=device).realize()

def _rotate_half(x: Tensor) -> Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return (-x2).cat(x1, dim=-1)

class KVCache:
  """Fixed-size key/value buffers of shape (batch, kv_heads, max_len, head_dim) per layer. Their size never changes, so
  a TinyJit'd decode step that writes position `start_pos` (a bound Variable) replays without recompiling."""
  def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: DType = dtypes.float32, device: str | None = None):
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    self.max_len = max_len
    self.k = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize() for _ in range(config.num_hidden_layers)]
    self.v = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize() for _ in range(config.num_hidden_layers)]

  def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int | UOp) -> tuple[Tensor, Tensor]:
    """Writes k and v at [start_pos, start_pos+T) and returns the keys and values of positions [0, start_pos+T)."""
    end = start_pos + k.shape[2]
    self.k[layer][:, :, start_pos:end].assign(k.cast(self.k[layer].dtype))
    self.v[layer][:, :, start_pos:end].assign(v.cast(self.v[layer].dtype))
    return self.k[layer][:, :, :end].cast(k.dtype), self.v[layer][:, :, :end].cast(v.dtype)

# The .contiguous() calls below materialise tensors that feed matmuls (normed inputs, q and k after RoPE, attention
# probabilities, the MLP hidden); without them tinygrad fuses the elementwise work into the matmul and recomputes it per
# multiply-accumulate. The gate/up outputs also need .contiguous_backward(): their gradients are elementwise products
# that otherwise get recomputed inside the backward matmuls; and their own .contiguous() keeps a checkpointed layer's
# recompute from fusing both matmuls into one two-reduction kernel. Together they save much of a train step's FLOPs,
# and each one alone some: see bench/RESULTS.md, "Figures behind code comments".
class Attention:
  def __init__(self, config: ModelConfig, layer: int):
    self.config, self.layer = config, layer
    c, bias = config, config.attention_bias
    self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=bias)
    self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
    self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
    self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.model_type == "llama" and bias)

  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int | UOp, cache: KVCache | None,
               saved: list[Tensor] | None = None) -> Tensor:
    c, (B, T, _) = self.config, x.shape
    heads, kv_heads, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = base_forward(self.q_proj, x).reshape(B, T, heads, hd).transpose(1, 2)
    k = base_forward(self.k_proj, x).reshape(B, T, kv_heads, hd).transpose(1, 2)
    v = base_forward(self.v_proj, x).reshape(B, T, kv_heads, hd).transpose(1, 2)
    q = (q * cos + _rotate_half(q) * sin).contiguous()
    k = (k * cos + _rotate_half(k) * sin).contiguous()
    if cache is not None: k, v = cache.update(self.layer, k, v, start_pos)
    # GQA without copying k and v: query heads are grouped (kv_head, repeat) as in HF's repeat_kv
    q = q.reshape(B, kv_heads, heads // kv_heads, T, hd)
    k, v = k.unsqueeze(2), v.unsqueeze(2)
    # materialised before the mask: a (T, T) mask broadcast into the matmul's epilogue makes tinygrad upcast the wrong
    # axes, several times slower (see bench/RESULTS.md, "Figures behind code comments")
    scores = ((q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(hd))).contiguous()
    if T > 1:  # causal, aligned to the end: query i sits at position start_pos + i
      scores = scores + Tensor.full((T, start_pos + T), float("-inf"), device=x.device).triu(start_pos + 1)
    probs = scores.softmax(-1).cast(x.dtype).contiguous()
    if saved is not None: saved += [q, k, v, scores, probs]
    out = (probs @ v).reshape(B, heads, T, hd).transpose(1, 2).reshape(B, T, heads * hd)
    return base_forward(self.o_proj, out)

class MLP:
  def __init__(self, config: ModelConfig):
    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

  def __call__(self, x: Tensor, saved: list[Tensor] | None = None) -> Tensor:
    gate, up = (base_forward(p, x).contiguous().contiguous_backward() for p in (self.gate_proj, self.up_proj))
    hidden = (gate.silu() * up).contiguous()
    if saved is not None: saved += [gate, up, hidden]
    return base_forward(self.down_proj, hidden)

class DecoderLayer:
  def __init__(self, config: ModelConfig, layer: int):
    self.self_attn = Attention(config, layer)
    self.mlp = MLP(config)
    self.input_layernorm = nn.RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, config.rms_norm_eps)

  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int | UOp, cache: KVCache | None,
               saved: list[Tensor] | None = None) -> Tensor:
    normed = self.input_layernorm(x).contiguous()
    h = x + self.self_attn(normed, cos, sin, start_pos, cache, saved)
    post = self.post_attention_layernorm(h).contiguous()
    if saved is not None: saved += [normed, h, post]
    return h + self.mlp(post, saved)

# A full-sequence decoder layer can run as a tinygrad `function` with the layer object as an argument, so its weights and
# adapters are explicit inputs: every layer calls one body, whose forward and backward kernels are scheduled and
# compiled once instead of once per layer. Its materialised intermediates are returned as extra outputs, which the
# backward reuses instead of recomputing the forward; the checkpointed variant returns only the output, so the
# backward recomputes the layer from its input and nothing else of the layer stays alive between forward and backward.
def _layer_with_intermediates(layer: DecoderLayer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
  saved: list[Tensor] = []
  return (layer(x, cos, sin, 0, None, saved), *saved)

_layer = function(_layer_with_intermediates, precompile=True, precompile_backward=True)
_checkpointed_layer = function(lambda layer, x, cos, sin: layer(x, cos, sin, 0, None), precompile=True, precompile_backward=True)

def _callable_as_function(layer: DecoderLayer) -> bool:
  """Whether the layer can run as a function: tinygrad cannot differentiate through packed integer weights (their
  unpacking), and random dropout masks inside would need the RNG state as an input."""
  tensors = nn.state.get_state_dict(layer).values()
  return all(dtypes.is_float(t.dtype) and isinstance(t.device, str) for t in tensors) and \
    not (is_training() and any(getattr(m, "dropout", 0) for _, m, _, _ in named_modules(layer)))

class Backbone:
  """HF's `model.` prefix: embeddings, decoder layers and final norm."""
  def __init__(self, config: ModelConfig):
    # tinygrad rewrites nn.Embedding's arange-compare-sum forward into an indexed load: one kernel and the same FLOPs
    # and memory traffic as `weight[tokens]` (bench/RESULTS.md, "Figures behind code comments"), so the module is kept
    # and quantization can swap it
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
    self.norm = nn.RMSNorm(config.hidden_size, config.rms_norm_eps)

class Model:
  """A causal decoder LM. `model(tokens)` maps int tokens (B, T) to float32 logits (B, T, vocab).

  With a `KVCache` (see `make_cache`), `model(tokens, start_pos, cache)` treats `tokens` as positions
  [start_pos, start_pos+T), stores their keys and values and attends to everything cached before them."""
  def __init__(self, config: ModelConfig):
    self.config = config
    self.file_metadata = FrozenMapping()  # metadata of the file it was read from, carried into files saved from it
    # run each full-sequence decoder layer as one tinygrad function, whose kernels are scheduled and compiled once for
    # all layers (a faster first step on deep models; its backward recomputes what the layer does not return, such as
    # LoRA's rank-r products: slightly more FLOPs, see bench/RESULTS.md, "Figures behind code comments"); grad_checkpoint
    # also recomputes the layer's activations in the backward. A Trainer with TrainConfig(grad_checkpoint=True) sets it
    # for its own steps only.
    self.layers_as_functions, self.grad_checkpoint = False, False
    self.model = Backbone(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    if config.tie_word_embeddings: self.lm_head.weight = self.model.embed_tokens.weight

  @classmethod
  def from_config(cls, config: dict | ModelConfig, dtype: DType = dtypes.float32) -> Model:
    """A randomly initialised model from an HF `config.json` dict (or a ModelConfig) with its weights in `dtype`
    (float32, float16 or bfloat16; see tinylora.precision), realized so that every forward reads the same values
    instead of recomputing the lazy random init."""
    model = cls(config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config))
    if check_dtype(dtype) != dtypes.float32:
      for t in unique_state_dict(model).values(): t.replace(t.cast(dtype))  # in place: a tied lm_head stays tied
    Tensor.realize(*nn.state.get_parameters(model))
    return model

  @property
  def dtype(self) -> DType: return self.model.norm.weight.dtype

  def make_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
    return KVCache(self.config, batch, max_len or self.config.max_position_embeddings, self.dtype, self.model.norm.weight.device)

  def __call__(self, tokens: Tensor, start_pos: int | UOp = 0, cache: KVCache | None = None) -> Tensor:
    if tokens.ndim != 2 or not dtypes.is_int(tokens.dtype):
      raise LoraError(f"tokens must be an integer tensor of shape (batch, time), found {tokens.dtype} {tokens.shape}")
    if cache is None and not (isinstance(start_pos, int) and start_pos == 0): raise LoraError("start_pos > 0 needs a KV cache")
    c, T = self.config, tokens.shape[1]
    max_len = cache.max_len if cache is not None else T
    end = (start_pos.vmax if isinstance(start_pos, UOp) else start_pos) + T
    if end > max_len: raise LoraError(f"positions up to {end} do not fit the KV cache of {max_len}")
    if c.sliding_window is not None and end > c.sliding_window:
      raise LoraError(f"sequence of {end} tokens exceeds sliding_window {c.sliding_window}, which is not implemented")
    cos, sin = _rope_table(c.head_dim, c.rope_theta, c.rope_scaling, max_len, self.model.norm.weight.device)
    cos, sin = cos[start_pos:start_pos + T].cast(self.dtype), sin[start_pos:start_pos + T].cast(self.dtype)
    x = self.model.embed_tokens(tokens)
    for layer in self.model.layers:
      if cache is None and (self.layers_as_functions or self.grad_checkpoint) and _callable_as_function(layer):
        x = _checkpointed_layer(layer, x, cos, sin) if self.grad_checkpoint else _layer(layer, x, cos, sin)[0]
      else: x = layer(x, cos, sin, start_pos, cache)
    return base_forward(self.lm_head, self.model.norm(x).contiguous()).float()
