"""One decoder for every family in tinylora/models/architectures.py (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
SmolLM3, OLMo2, Granite), with Hugging Face module names so state-dict keys equal checkpoint keys. What differs between
families is data in the ModelConfig: norm placement and form, q/k norms, activation, scales and soft-caps, fused
projections, per-layer attention kind (full or sliding window) and RoPE.

Every projection is a plain `nn.Linear` attribute called through `base_forward(self.q_proj, x)`, which gives frozen
linears a faster backward (see tinylora/device_policy.py) and calls any other module as it is: LoRA injection and quantization
replace these attributes with other callables, so the forward reads no other projection attribute. The model knows
nothing of LoRA.
"""
from __future__ import annotations
import functools
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, UOp, dtypes, function, nn
from tinygrad.dtype import DType
from tinylora.engine import is_training, outside_capture
from tinylora.errors import LoraError
from tinylora.models.architectures import ARCHITECTURES, SLIDING, ModelConfig, Rope
from tinylora.precision import check_dtype
from tinylora.tree import FrozenMapping, named_modules, unique_state_dict
from tinylora.device_policy import base_forward

ROPE_TABLES = 8  # the (cos, sin) tables kept between calls: a few per model (training length, decode cache sizes, layer kinds)

@functools.lru_cache(maxsize=ROPE_TABLES)
def _rope_table(rope: Rope, length: int, device: str | tuple[str, ...]) -> tuple[Tensor, Tensor]:
  """cos and sin of shape (length, rope.dim) in HF's rotate_half layout, computed in float32 as transformers does, on
  the model's device (a tuple of devices: a copy on each). The least recently used table is dropped beyond ROPE_TABLES,
  so a long-lived process that sees many lengths or devices does not keep them all (a captured step keeps its own)."""
  freqs = np.outer(np.arange(length, dtype=np.float32), rope.inv_freq(length))
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = np.cos(emb) * np.float32(rope.attention_factor), np.sin(emb) * np.float32(rope.attention_factor)
  with outside_capture():  # made now even inside a TinyJit capture, which would otherwise redo it in every replay
    return Tensor(cos.astype(np.float32), device=device).realize(), Tensor(sin.astype(np.float32), device=device).realize()

def _rotate_half(x: Tensor) -> Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return (-x2).cat(x1, dim=-1)

def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  """RoPE on the first cos.shape[-1] dimensions of each head, the rest passed through (partial_rotary_factor)."""
  if (dim := cos.shape[-1]) == x.shape[-1]: return x * cos + _rotate_half(x) * sin
  rot, rest = x[..., :dim], x[..., dim:]
  return (rot * cos + _rotate_half(rot) * sin).cat(rest, dim=-1)

class RMSNorm(nn.RMSNorm):
  """nn.RMSNorm, or Gemma's form that scales by 1 + weight (computed in float32, its weight initialised to zero)."""
  def __init__(self, dim: int, eps: float, plus_one: bool = False):
    super().__init__(dim, eps)
    self.plus_one = plus_one
    if plus_one: self.weight = Tensor.zeros(dim)

  def __call__(self, x: Tensor) -> Tensor:
    if not self.plus_one: return super().__call__(x)
    return (self._norm(x.float()) * (1 + self.weight.float())).cast(x.dtype)

def _activation(name: str):
  return Tensor.silu if name in ("silu", "swish") else Tensor.gelu  # tinygrad's gelu is GELU's tanh approximation

@dataclass(frozen=True)
class RowPositions:
  """Where each row's one new token sits when the rows of a batch are at different positions (continuous batching):
  row b at `positions[b]`, attending to its cached keys [0, positions[b]]. `end` (a bound Variable, at least 1 + the
  largest position) is how much of the cache the step reads, so one captured step serves every length."""
  positions: Tensor  # (B,) int
  end: UOp | int

Start = int | UOp | RowPositions  # the position of a sequence's first new token, or each row's one new token

class KVCache:
  """Fixed-size key/value buffers of shape (batch, kv_heads, max_len, head_dim) per layer. Their size never changes, so
  a TinyJit'd decode step that writes position `start_pos` (a bound Variable) replays without recompiling."""
  def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: DType = dtypes.float32, device: str | None = None):
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    self.max_len = max_len
    self.k = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize() for _ in range(config.num_hidden_layers)]
    self.v = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize() for _ in range(config.num_hidden_layers)]

  def update(self, layer: int, k: Tensor, v: Tensor, start_pos: Start) -> tuple[Tensor, Tensor]:
    """Writes k and v (B, kv_heads, T, head_dim) at [start_pos, start_pos+T) (with RowPositions: row b's one token at
    its own position) and returns the keys and values of positions [0, end)."""
    if isinstance(start_pos, RowPositions):
      end, at = start_pos.end, Tensor.arange(start_pos.end).reshape(1, 1, -1, 1) == start_pos.positions.reshape(-1, 1, 1, 1)
      for cache, new in ((self.k[layer], k), (self.v[layer], v)): cache[:, :, :end].assign(at.where(new.cast(cache.dtype), cache[:, :, :end]))
    else:
      end = start_pos + k.shape[2]
      self.k[layer][:, :, start_pos:end].assign(k.cast(self.k[layer].dtype))
      self.v[layer][:, :, start_pos:end].assign(v.cast(self.v[layer].dtype))
    return self.k[layer][:, :, :end].cast(k.dtype), self.v[layer][:, :, :end].cast(v.dtype)

  def row(self, row: int | UOp) -> KVCache:
    """The cache of batch row `row` alone (a view: writes land in this cache), e.g. to prefill one row's prompt."""
    view = object.__new__(KVCache)
    view.max_len, view.k, view.v = self.max_len, [k[row:row + 1] for k in self.k], [v[row:row + 1] for v in self.v]
    return view

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
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    if c.arch.fused: self.qkv_proj = nn.Linear(c.hidden_size, q + 2 * kv, bias=bias)
    else:
      self.q_proj = nn.Linear(c.hidden_size, q, bias=bias)
      self.k_proj = nn.Linear(c.hidden_size, kv, bias=bias)
      self.v_proj = nn.Linear(c.hidden_size, kv, bias=bias)
    self.o_proj = nn.Linear(q, c.hidden_size, bias=c.output_bias)
    if c.arch.qk_norm:  # per head (size head_dim) or over the whole projection (OLMo2)
      per_head = c.arch.qk_norm == "head"
      self.q_norm = RMSNorm(c.head_dim if per_head else q, c.rms_norm_eps, c.arch.norm_plus_one)
      self.k_norm = RMSNorm(c.head_dim if per_head else kv, c.rms_norm_eps, c.arch.norm_plus_one)
    self.window = c.sliding_window if c.layer_types[layer] == SLIDING else None

  def __call__(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, start_pos: Start, cache: KVCache | None,
               saved: list[Tensor] | None = None, mask: Tensor | None = None) -> Tensor:
    c, (B, T, _) = self.config, x.shape
    heads, kv_heads, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    if c.arch.fused: q, k, v = base_forward(self.qkv_proj, x).split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    else: q, k, v = (base_forward(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
    # q and k materialised before RoPE, whose rotate_half reads each twice (the projection would be computed twice in
    # one kernel with RoPE in its epilogue, which gets no matmul shape), and the attention output before o_proj (whose
    # reduction would run over heads and head_dim as two axes, which get none either)
    q, k = q.contiguous(), k.contiguous()
    if c.arch.qk_norm == "projection": q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.reshape(B, T, heads, hd), k.reshape(B, T, kv_heads, hd), v.reshape(B, T, kv_heads, hd)
    if c.arch.qk_norm == "head": q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cos is not None: q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    q, k = q.contiguous(), k.contiguous()
    if cache is not None: k, v = cache.update(self.layer, k, v, start_pos)
    # GQA without copying k and v: query heads are grouped (kv_head, repeat) as in HF's repeat_kv
    q = q.reshape(B, kv_heads, heads // kv_heads, T, hd)
    k, v = k.unsqueeze(2), v.unsqueeze(2)
    # materialised before the mask: a (T, T) mask broadcast into the matmul's epilogue makes tinygrad upcast the wrong
    # axes, several times slower (see bench/RESULTS.md, "Figures behind code comments")
    scores = (q @ k.transpose(-1, -2)).float() * c.attention_scale
    if (cap := c.attn_logit_softcapping) is not None: scores = (scores / cap).tanh() * cap
    scores = scores.contiguous()
    if isinstance(start_pos, RowPositions): scores = scores + self._row_mask(start_pos).reshape(B, 1, 1, 1, -1)
    else:
      # query i sits at position start_pos + i: causal, and within the window on sliding layers (key j > start_pos + i - window)
      if T > 1: scores = scores + Tensor.full((T, start_pos + T), float("-inf"), device=x.device).triu(start_pos + 1)
      if self.window is not None and (start_pos.vmax if isinstance(start_pos, UOp) else start_pos) + T > self.window:
        scores = scores + Tensor.full((T, start_pos + T), float("-inf"), device=x.device).tril(start_pos - self.window)
    if mask is not None: scores = mask.where(scores, float("-inf"))  # packed rows: each example attends to itself only
    probs = scores.softmax(-1).cast(x.dtype).contiguous()
    if saved is not None: saved += [q, k, v, scores, probs]
    out = (probs @ v).reshape(B, heads, T, hd).transpose(1, 2).reshape(B, T, heads * hd)
    out = out.contiguous()
    return base_forward(self.o_proj, out)

  def _row_mask(self, rows: RowPositions) -> Tensor:
    """(B, end): 0 where row b's token at positions[b] may attend key j (j <= positions[b], and within the window on
    sliding layers), -inf elsewhere."""
    j, pos = Tensor.arange(rows.end).reshape(1, -1), rows.positions.reshape(-1, 1)
    visible = (j <= pos) if self.window is None else (j <= pos) & (j > pos - self.window)
    return visible.where(0.0, float("-inf"))

class MLP:
  def __init__(self, config: ModelConfig):
    c, bias = config, config.mlp_bias
    self.act = _activation(c.hidden_act)
    if c.arch.fused: self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=bias)  # gate rows, then up
    else:
      self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=bias)
      self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=bias)
    self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=bias)

  def __call__(self, x: Tensor, saved: list[Tensor] | None = None) -> Tensor:
    if hasattr(self, "gate_up_proj"):
      gate, up = (t.contiguous().contiguous_backward() for t in base_forward(self.gate_up_proj, x).chunk(2, dim=-1))
    else: gate, up = (base_forward(p, x).contiguous().contiguous_backward() for p in (self.gate_proj, self.up_proj))
    hidden = (self.act(gate) * up).contiguous()
    if saved is not None: saved += [gate, up, hidden]
    return base_forward(self.down_proj, hidden)

class DecoderLayer:
  """Attention and MLP, each a residual branch with its norms where the family puts them: "pre" (input_layernorm before
  attention, post_attention_layernorm before the MLP), "sandwich" (Gemma: also a norm on each branch's output, and
  pre_feedforward_layernorm before the MLP), or "post" (OLMo2: norms on the branch outputs only)."""
  def __init__(self, config: ModelConfig, layer: int):
    c = config
    self.config, self.rope = c, c.layer_rope(layer)
    self.self_attn = Attention(c, layer)
    self.mlp = MLP(c)
    names = {"pre": ("input_layernorm", "post_attention_layernorm"),
             "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
             "post": ("post_attention_layernorm", "post_feedforward_layernorm")}[c.arch.norms]
    for name in names: setattr(self, name, RMSNorm(c.hidden_size, c.rms_norm_eps, c.arch.norm_plus_one))

  def __call__(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, start_pos: Start, cache: KVCache | None,
               saved: list[Tensor] | None = None, mask: Tensor | None = None) -> Tensor:
    norms, r = self.config.arch.norms, self.config.residual_multiplier
    attn_in = self.input_layernorm(x).contiguous() if norms != "post" else x
    attn = self.self_attn(attn_in, cos, sin, start_pos, cache, saved, mask)
    if norms != "pre": attn = self.post_attention_layernorm(attn)
    h = x + (attn * r if r != 1 else attn)
    mlp_in = {"pre": lambda: self.post_attention_layernorm(h), "sandwich": lambda: self.pre_feedforward_layernorm(h),
              "post": lambda: h}[norms]().contiguous()
    if saved is not None: saved += [attn_in, h, mlp_in]
    mlp = self.mlp(mlp_in, saved)
    if norms != "pre": mlp = self.post_feedforward_layernorm(mlp)
    return h + (mlp * r if r != 1 else mlp)

# A full-sequence decoder layer can run as a tinygrad `function` with the layer object as an argument, so its weights and
# adapters are explicit inputs: every layer calls one body, whose forward and backward kernels are scheduled and
# compiled once instead of once per layer. Its materialised intermediates are returned as extra outputs, which the
# backward reuses instead of recomputing the forward; the checkpointed variant returns only the output, so the
# backward recomputes the layer from its input and nothing else of the layer stays alive between forward and backward.
def _layer_with_intermediates(layer: DecoderLayer, x: Tensor, cos: Tensor | None, sin: Tensor | None,
                              mask: Tensor | None) -> tuple[Tensor, ...]:
  saved: list[Tensor] = []
  return (layer(x, cos, sin, 0, None, saved, mask), *saved)

_layer = function(_layer_with_intermediates, precompile=True, precompile_backward=True)
_checkpointed_layer = function(lambda layer, x, cos, sin, mask: layer(x, cos, sin, 0, None, mask=mask), precompile=True,
                               precompile_backward=True)

def callable_as_function(layer: DecoderLayer) -> bool:
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
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.arch.norm_plus_one)

class Model:
  """A causal decoder LM. `model(tokens)` maps int tokens (B, T) to float32 logits (B, T, vocab).

  With a `KVCache` (see `make_cache`), `model(tokens, start_pos, cache)` treats `tokens` as positions
  [start_pos, start_pos+T), stores their keys and values and attends to everything cached before them; with
  `RowPositions`, each row's one token sits at that row's own position."""
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

  def __call__(self, tokens: Tensor, start_pos: Start = 0, cache: KVCache | None = None,
               positions: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
    return self.logits(self.hidden(tokens, start_pos, cache, positions, segments))

  def hidden(self, tokens: Tensor, start_pos: Start = 0, cache: KVCache | None = None,
             positions: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
    """The final norm's output (B, T, hidden): what the output head reads (a loss may apply the head in chunks).

    Packed rows (several examples one after another, tinylora.data.make_packed_batch) pass `positions` and `segments`,
    integer (B, T): each token's position within its example (0, 1, ... from the example's first token), which RoPE
    reads, and which example it belongs to; attention stays causal and inside each example. As an example's positions
    are consecutive, the causal and sliding-window masks by index within it are those by position."""
    if tokens.ndim != 2 or not dtypes.is_int(tokens.dtype):
      raise LoraError(f"tokens must be an integer tensor of shape (batch, time), found {tokens.dtype} {tokens.shape}")
    if cache is None and not (isinstance(start_pos, int) and start_pos == 0): raise LoraError("start_pos > 0 needs a KV cache")
    if (positions is None) != (segments is None) or cache is not None and positions is not None:
      raise LoraError("packed rows need both positions and segments, and no KV cache")
    for name, t in (("positions", positions), ("segments", segments)):
      if t is not None and (t.shape != tokens.shape or not dtypes.is_int(t.dtype)):
        raise LoraError(f"{name} must be an integer tensor of the tokens' shape {tokens.shape}, found {t.dtype} {t.shape}")
    c, (B, T) = self.config, tokens.shape
    if isinstance(start_pos, RowPositions):
      if T != 1 or start_pos.positions.shape != (B,):
        raise LoraError(f"rows at their own positions take one token each and one position per row: tokens {tokens.shape}, "
                        f"positions {start_pos.positions.shape}")
      positions = start_pos.positions.reshape(B, 1)
    max_len = cache.max_len if cache is not None else T
    last = start_pos.end if isinstance(start_pos, RowPositions) else start_pos + T
    if (end := last.vmax if isinstance(last, UOp) else last) > max_len: raise LoraError(f"positions up to {end} do not fit the KV cache of {max_len}")
    tables = {}  # cos and sin of the new tokens' positions per RoPE: layer kinds may differ in base, or have none
    for rope in {layer.rope for layer in self.model.layers} - {None}:
      cos, sin = _rope_table(rope, max_len, self.model.norm.weight.device)
      # rows at their own positions, packed rows: each token's row of the table, (B, 1, T, dim) broadcast over the heads
      if positions is not None: cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
      else: cos, sin = cos[start_pos:start_pos + T], sin[start_pos:start_pos + T]
      tables[rope] = cos.cast(self.dtype), sin.cast(self.dtype)
    # (B, 1, 1, T, T) over the attention scores (B, kv_heads, group, T, T): query i sees key j of its own example
    mask = None if segments is None else (segments.unsqueeze(-1) == segments.unsqueeze(-2)).reshape(B, 1, 1, T, T)
    x = self.model.embed_tokens(tokens)
    if c.embedding_multiplier != 1: x = x * Tensor(c.embedding_multiplier, dtype=x.dtype, device=x.device)
    for layer in self.model.layers:
      cos, sin = tables.get(layer.rope, (None, None))
      if cache is None and (self.layers_as_functions or self.grad_checkpoint) and callable_as_function(layer):
        x = _checkpointed_layer(layer, x, cos, sin, mask) if self.grad_checkpoint else _layer(layer, x, cos, sin, mask)[0]
      else: x = layer(x, cos, sin, start_pos, cache, mask=mask)
    return self.model.norm(x).contiguous()

  def logits(self, hidden: Tensor) -> Tensor:
    """float32 logits (..., vocab) of final hidden states: the output head, with the family's scaling and soft-cap."""
    c = self.config
    logits = base_forward(self.lm_head, hidden).float()
    if c.logits_scaling != 1: logits = logits / c.logits_scaling
    if (cap := c.final_logit_softcapping) is not None: logits = (logits / cap).tanh() * cap
    return logits
