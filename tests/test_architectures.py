"""Every family in tinylora/models/architectures.py, checked against an independent float64 numpy forward written from
transformers' modeling files (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, smollm3, olmo2, granite), on tiny HF
directories the tests write with random weights, norm weights away from 0 and 1, and sequences longer than the
sliding windows. The per-layer window and RoPE of each test model are written out here by hand, not derived."""
import json
import numpy as np, pytest
from safetensors.numpy import load_file, save_file
from tinygrad import Context, Tensor
import tinylora as tl
from tinylora import LoraConfig, LoraError, load_adapter, load_pretrained, save_adapter
from tinylora.generate import generate
from tinylora.models import Model, ModelConfig
from tinylora.train import lm_loss

B, T, W = 2, 12, 5  # batch, sequence length, sliding window (T > W: the windows cut in)
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)

def family(model_type: str, cls: str, **kw) -> dict: return {**BASE, "model_type": model_type, "architectures": [cls], **kw}

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
            "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]}  # 2 = rotary dims / 2: head_dim 8 * 0.5 / 2
FAMILIES = {
  "llama": family("llama", "LlamaForCausalLM", rope_theta=500.0),
  "mistral": family("mistral", "MistralForCausalLM", rope_theta=1000.0, sliding_window=W),
  "qwen2": family("qwen2", "Qwen2ForCausalLM", rope_theta=1000.0, use_sliding_window=True, sliding_window=W,
                  max_window_layers=1, tie_word_embeddings=True),
  "qwen3": family("qwen3", "Qwen3ForCausalLM", head_dim=16, rope_theta=2000.0),
  "gemma2": family("gemma2", "Gemma2ForCausalLM", head_dim=16, hidden_activation="gelu_pytorch_tanh", rope_theta=1000.0,
                   query_pre_attn_scalar=24, attn_logit_softcapping=1.5, final_logit_softcapping=2.5, sliding_window=W,
                   tie_word_embeddings=True),
  "gemma3_text": family("gemma3_text", "Gemma3ForCausalLM", head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=12,
                        hidden_activation="gelu_pytorch_tanh", sliding_window=W, final_logit_softcapping=3.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=True,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
  "phi3": family("phi3", "Phi3ForCausalLM", sliding_window=W, rope_parameters={**LONGROPE, "partial_rotary_factor": 0.5},
                 original_max_position_embeddings=8),  # transformers 5 writes it in both places and reads the top level
  "smollm3": family("smollm3", "SmolLM3ForCausalLM", rope_theta=3000.0, no_rope_layer_interval=2, use_sliding_window=True,
                    sliding_window=W),
  "olmo2": family("olmo2", "Olmo2ForCausalLM", rope_theta=700.0),
  "granite": family("granite", "GraniteForCausalLM", rope_theta=800.0, embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.2, logits_scaling=4.0),
}

def inv_freq(theta: float, dim: int) -> np.ndarray: return 1.0 / theta ** (np.arange(0, dim, 2) / dim)

# per layer: (sliding window or None, (inverse frequencies, cos/sin factor) or None for no RoPE), by hand from each
# family's configuration_*.py: mistral slides every layer, qwen2 from max_window_layers on, gemma2 every other layer
# (the 2nd full), smollm3 its no-RoPE layers; gemma3 local layers use the sliding_attention RoPE; phi3 LongRoPE beyond
# original_max_position_embeddings uses long_factor and scales cos/sin by sqrt(1 + ln(64/8) / ln(8))
def _plain(theta, dim=8): return inv_freq(theta, dim), 1.0
LAYERS = {
  "llama": [(None, _plain(500.0))] * 2,
  "mistral": [(W, _plain(1000.0))] * 2,
  "qwen2": [(None, _plain(1000.0)), (W, _plain(1000.0))],
  "qwen3": [(None, _plain(2000.0, 16))] * 2,
  "gemma2": [(W, _plain(1000.0, 16)), (None, _plain(1000.0, 16))],
  "gemma3_text": [(W, _plain(100.0, 16)), (None, (inv_freq(1e6, 16) / 2.0, 1.0)), (W, _plain(100.0, 16))],
  "phi3": [(W, (1.0 / (np.array([2.0, 3.0]) * 10000.0 ** (np.arange(0, 4, 2) / 4)), np.sqrt(1 + np.log(8) / np.log(8))))] * 2,
  "smollm3": [(None, _plain(3000.0)), (W, None)],
  "olmo2": [(None, _plain(700.0))] * 2,
  "granite": [(None, _plain(800.0))] * 2,
}

def head_dim(cfg: dict) -> int: return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """Tensor names and shapes as each family's transformers modules name them."""
  mt, D, F, V = cfg["model_type"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  hd = head_dim(cfg)
  q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg["tie_word_embeddings"]: shapes["lm_head.weight"] = (V, D)
  norms = {"gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
           "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")}
  norms["gemma3_text"] = norms["gemma2"]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    if mt == "phi3": shapes |= {p + "self_attn.qkv_proj.weight": (q + 2 * kv, D), p + "mlp.gate_up_proj.weight": (2 * F, D)}
    else:
      shapes |= {p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D), p + "self_attn.v_proj.weight": (kv, D),
                 p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D)}
    if mt == "qwen2": shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
    shapes |= {p + "self_attn.o_proj.weight": (D, q), p + "mlp.down_proj.weight": (D, F)}
    if mt in ("qwen3", "gemma3_text"): shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    if mt == "olmo2": shapes |= {p + "self_attn.q_norm.weight": (q,), p + "self_attn.k_norm.weight": (kv,)}
    shapes |= {p + n + ".weight": (D,) for n in norms.get(mt, ("input_layernorm", "post_attention_layernorm"))}
  return shapes

def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Norm weights 1 + noise (for Gemma's 1 + w norms, w = noise): away from 0 and 1 whichever form a family uses."""
  rng, one = np.random.default_rng(seed), 0.0 if cfg["model_type"].startswith("gemma") else 1.0
  def draw(k, s): return (one if "norm" in k else 0.0) + 0.3 * rng.standard_normal(s)
  return {k: draw(k, s).astype(np.float32) for k, s in weight_shapes(cfg).items()}

def write_model(path, cfg: dict, weights: dict[str, np.ndarray]):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(weights, str(path / "model.safetensors"))
  return path

def reference_logits(cfg: dict, w: dict[str, np.ndarray], tokens: np.ndarray, layers=None) -> np.ndarray:
  """float64 forward following transformers' modeling_<family>.py."""
  mt, D, H, KV, eps = cfg["model_type"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
  gemma, hd, (Bn, Tn) = mt.startswith("gemma"), head_dim(cfg), tokens.shape
  w = {k: v.astype(np.float64) for k, v in w.items()}
  def norm(x, name):  # RMSNorm; Gemma scales by (1 + weight)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y * (1 + w[name]) if gemma else y * w[name]
  def linear(name, x): return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)
  def act(x): return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))) if gemma else x / (1 + np.exp(-x))
  def rope(x, freqs):  # rotate_half on the first 2 * len(inv_freq) dims (partial rotary), the rest passed through
    f, factor = freqs
    ang = np.arange(Tn)[:, None] * f[None]
    cos, sin = (np.concatenate([g(ang)] * 2, -1) * factor for g in (np.cos, np.sin))
    n = 2 * len(f)
    rot, rest = x[..., :n], x[..., n:]
    rotated = np.concatenate([-rot[..., n // 2:], rot[..., :n // 2]], -1)
    return np.concatenate([rot * cos + rotated * sin, rest], -1)
  r = cfg.get("residual_multiplier", 1.0)
  x = w["model.embed_tokens.weight"][tokens] * (np.sqrt(D) if gemma else cfg.get("embedding_multiplier", 1.0))
  for i, (window, freqs) in enumerate(layers or LAYERS[mt]):
    p = f"model.layers.{i}."
    h = x if mt == "olmo2" else norm(x, p + "input_layernorm.weight")
    if mt == "phi3": q, k, v = np.split(linear(p + "self_attn.qkv_proj", h), [H * hd, (H + KV) * hd], -1)
    else: q, k, v = (linear(p + f"self_attn.{n}_proj", h) for n in "qkv")
    if mt == "olmo2": q, k = norm(q, p + "self_attn.q_norm.weight"), norm(k, p + "self_attn.k_norm.weight")
    q, k, v = q.reshape(Bn, Tn, H, hd), k.reshape(Bn, Tn, KV, hd), v.reshape(Bn, Tn, KV, hd)
    if mt in ("qwen3", "gemma3_text"): q, k = norm(q, p + "self_attn.q_norm.weight"), norm(k, p + "self_attn.k_norm.weight")
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    if freqs is not None: q, k = rope(q, freqs), rope(k, freqs)
    k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
    scale = cfg["query_pre_attn_scalar"] ** -0.5 if gemma else cfg.get("attention_multiplier", hd ** -0.5)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    if mt == "gemma2": s = np.tanh(s / cfg["attn_logit_softcapping"]) * cfg["attn_logit_softcapping"]
    qi, kj = np.arange(Tn)[:, None], np.arange(Tn)[None]
    allowed = (kj <= qi) & ((kj > qi - window) if window else True)  # masking_utils: kv_idx > q_idx - sliding_window
    s = np.where(allowed, s, -np.inf)
    probs = np.exp(s - s.max(-1, keepdims=True))
    attn = linear(p + "self_attn.o_proj", (probs / probs.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(Bn, Tn, H * hd))
    if gemma or mt == "olmo2": attn = norm(attn, p + "post_attention_layernorm.weight")
    x = x + attn * r
    h = x if mt == "olmo2" else norm(x, p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight"))
    if mt == "phi3": gate, up = np.split(linear(p + "mlp.gate_up_proj", h), 2, -1)
    else: gate, up = linear(p + "mlp.gate_proj", h), linear(p + "mlp.up_proj", h)
    mlp = linear(p + "mlp.down_proj", act(gate) * up)
    if gemma or mt == "olmo2": mlp = norm(mlp, p + "post_feedforward_layernorm.weight")
    x = x + mlp * r
  logits = norm(x, "model.norm.weight") @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T / cfg.get("logits_scaling", 1.0)
  if (cap := cfg.get("final_logit_softcapping")) is not None: logits = np.tanh(logits / cap) * cap
  return logits

TOKENS = np.random.default_rng(1).integers(0, 64, (B, T)).astype(np.int32)

@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_reference(tmp_path, name):
  cfg, weights = FAMILIES[name], random_weights(FAMILIES[name])
  model = load_pretrained(write_model(tmp_path, cfg, weights))
  assert [layer.self_attn.window for layer in model.model.layers] == [win for win, _ in LAYERS[name]]
  expected = reference_logits(cfg, weights, TOKENS)
  np.testing.assert_allclose(model(Tensor(TOKENS)).numpy(), expected, atol=1e-4, rtol=1e-4)
  if any(win for win, _ in LAYERS[name]):  # the windows cut in at this length: the check above sees the mask
    unmasked = [(None, freqs) for _, freqs in LAYERS[name]]
    assert np.abs(reference_logits(cfg, weights, TOKENS, unmasked) - expected).max() > 1e-2

@pytest.mark.parametrize("name", ["gemma3_text", pytest.param("phi3", marks=pytest.mark.slow)])
def test_kv_cache_generation_past_the_window(tmp_path, name):
  """Greedy decoding with the KV cache beyond the window equals greedy decoding by full forwards (each new token the
  argmax of a full forward over everything before it: all checked by one causal forward over the generated sequences,
  the shorter padded at its end); a batch of prompts of different lengths gives each prompt's own result."""
  cfg = FAMILIES[name]
  model = load_pretrained(write_model(tmp_path, cfg, random_weights(cfg, seed=2)))
  prompts, n = [[3, 14, 15, 9], [2, 6, 5, 35, 8, 9, 7]], 8
  singles = [generate(model, p, n) for p in prompts]
  seqs = [p + out[:-1] for p, out in zip(prompts, singles)]
  assert all(len(out) == n for out in singles) and min(map(len, seqs)) > 2 * W
  padded = np.array([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs], np.int32)
  greedy = model(Tensor(padded)).numpy().argmax(-1)
  for row, (prompt, out) in enumerate(zip(prompts, singles)):
    np.testing.assert_array_equal(greedy[row, len(prompt) - 1:len(prompt) - 1 + n], out)
  assert generate(model, prompts, n) == singles

def merged_weights(model, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The file's weights with each adapter's scale * B @ A added (numpy)."""
  out = dict(weights)
  for path, layer in tl.lora_layers(model).items():
    out[path + ".weight"] = weights[path + ".weight"] + layer.scale * layer.lora_B.numpy() @ layer.lora_A.numpy()
  return out

def test_training_loss_and_gradient_under_the_window(tmp_path):
  """A training step's loss on a one-layer gemma2 (a sliding layer, T past the window) and its LoRA gradient are
  the same with the layers inlined and run as tinygrad functions, and equal the reference loss of the merged weights
  and a central finite difference of it."""
  cfg = {**FAMILIES["gemma2"], "num_hidden_layers": 1}
  weights = random_weights(cfg, seed=3)
  model = load_pretrained(write_model(tmp_path, cfg, weights))
  Tensor.manual_seed(0)
  tl.inject(model, LoraConfig(r=2, init_lora_weights=False))
  targets, mask = np.roll(TOKENS, -1, axis=1), np.ones((B, T), np.float32)
  path = "model.layers.0.self_attn.v_proj"
  layer = tl.lora_layers(model)[path]
  def step(functions: bool) -> tuple[float, np.ndarray]:
    model.layers_as_functions = functions
    with Context(TRAINING=1):
      loss = lm_loss(model(Tensor(TOKENS)), Tensor(targets), Tensor(mask))
      grad, = loss.gradient(layer.lora_A)
      Tensor.realize(loss, grad)
    return loss.item(), grad.numpy()
  (loss, grad), (f_loss, f_grad) = step(False), step(True)
  assert f_loss == pytest.approx(loss, abs=1e-6)
  np.testing.assert_allclose(f_grad, grad, atol=1e-6, rtol=1e-5)
  merged, B_np = merged_weights(model, weights), layer.lora_B.numpy().astype(np.float64)
  def ref_loss(A: np.ndarray) -> float:
    logits = reference_logits(cfg, {**merged, path + ".weight": weights[path + ".weight"] + layer.scale * B_np @ A}, TOKENS,
                              LAYERS["gemma2"][:1])
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1).mean()
  A = layer.lora_A.numpy().astype(np.float64)
  assert loss == pytest.approx(ref_loss(A), abs=1e-5)
  eps = 1e-4
  for idx in [(0, 0), (1, 7), (0, 31), (1, 20)]:
    d = np.zeros_like(A)
    d[idx] = eps
    assert grad[idx] == pytest.approx((ref_loss(A + d) - ref_loss(A - d)) / (2 * eps), abs=1e-5, rel=1e-3), idx

# ---- bad input: LoraError naming the field or key, nothing built

@pytest.mark.parametrize("edit, message", [
  (dict(layer_types=["full_attention"]), r"layer_types must list 3 entries"),
  (dict(layer_types=["full_attention", "chunked_attention", "full_attention"]),
   r"layer_types must list 3 entries of 'full_attention' / 'sliding_attention'"),
  (dict(head_dim=None, hidden_size=30), r"hidden_size 30 does not divide into num_attention_heads 4; give head_dim"),
  (dict(sliding_window=None), r"sliding_attention layers need a positive sliding_window, found None"),
  (dict(hidden_activation="relu"), r"unsupported activation 'relu'"),
  (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}), r"unsupported rope type 'yarn'"),
], ids=["layer_types length", "layer kind", "head_dim", "window", "activation", "rope type"])
def test_bad_config_is_refused_naming_the_field(edit, message):
  with pytest.raises(LoraError, match=r"config\.json \(gemma3_text\): " + message): ModelConfig.from_hf({**FAMILIES["gemma3_text"], **edit})

@pytest.mark.parametrize("model_type, missing", [
  ("qwen3_moe", "mixture-of-experts"), ("mixtral", "mixture-of-experts"), ("gpt_oss", "mixture-of-experts"),
  ("qwen2_moe", "mixture-of-experts"), ("qwen3_next", "hybrid linear attention"), ("qwen3_5", "hybrid linear attention"),
  ("lfm2", "hybrid linear attention"), ("gemma3n", "per-layer embeddings"), ("gemma4", "per-layer embeddings"),
  ("gemma3", "a vision tower")])
def test_families_not_supported_say_what_they_need(model_type, missing):
  with pytest.raises(LoraError, match=rf"model_type '{model_type}' is not supported: tinylora's decoder has no {missing}"):
    ModelConfig.from_hf({**BASE, "model_type": model_type})

@pytest.mark.parametrize("name, edit, message", [
  ("qwen3", lambda w: w.pop("model.layers.1.self_attn.q_norm.weight"), r"tensor 'model.layers.1.self_attn.q_norm.weight' of shape \(16,\) is missing"),
  ("gemma2", lambda w: w.pop("model.layers.0.post_feedforward_layernorm.weight"),
   r"tensor 'model.layers.0.post_feedforward_layernorm.weight' of shape \(32,\) is missing"),
  ("phi3", lambda w: w.update({"model.layers.0.self_attn.q_proj.weight": w.pop("model.layers.0.self_attn.qkv_proj.weight")[:32]}),
   r"tensor 'model.layers.0.self_attn.qkv_proj.weight' of shape \(64, 32\) is missing"),
  ("olmo2", lambda w: w.update({"model.layers.1.input_layernorm.weight": np.ones(32, np.float32)}),
   r"unexpected tensor 'model.layers.1.input_layernorm.weight'"),
  ("llama", lambda w: w.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}),
   r"unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"),
  ("olmo2", lambda w: w.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}),
   r"tensor 'model.layers.0.self_attn.q_norm.weight' has shape \(8,\), expected \(32,\)"),
], ids=["qwen3 q_norm", "gemma2 post_feedforward_layernorm", "phi3 unfused", "olmo2 input norm", "llama q_norm", "olmo2 per-head norm"])
def test_checkpoint_without_the_family_tensors_is_refused(tmp_path, name, edit, message):
  weights = random_weights(FAMILIES[name])
  edit(weights)
  with pytest.raises(LoraError, match=r"checkpoint: " + message): load_pretrained(write_model(tmp_path, FAMILIES[name], weights))

# ---- LoRA: the family's default targets

def lazy(name: str) -> Model: return Model(ModelConfig.from_hf(FAMILIES[name]))  # random init never realized

def test_default_lora_targets_are_the_family_defaults():
  """LoraConfig() with no target_modules adapts PEFT's default modules of each family, and records them."""
  for name, cfg in FAMILIES.items():  # one layer each: every adapter made is realized
    model = tl.inject(Model(ModelConfig.from_hf({**cfg, "num_hidden_layers": 1, "layer_types": None})), LoraConfig())
    names = ["qkv_proj"] if name == "phi3" else ["q_proj", "v_proj"]
    assert sorted(tl.lora_layers(model)) == [f"model.layers.0.self_attn.{n}" for n in names], name
    assert all(l.config.target_modules == names for l in tl.lora_layers(model).values()), name

def test_phi3_fused_adapters_merge_and_round_trip(tmp_path):
  cfg = FAMILIES["phi3"]
  base = write_model(tmp_path / "base", cfg, random_weights(cfg))
  model = load_pretrained(base)
  Tensor.manual_seed(1)
  tl.inject(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
  tokens = Tensor(TOKENS)
  unmerged = model(tokens).numpy()
  tl.merge(model)
  np.testing.assert_allclose(model(tokens).numpy(), unmerged, atol=1e-5, rtol=1e-5)
  tl.unmerge(model)
  for fmt, recorded in [("peft", lambda c: c["target_modules"] == ["qkv_proj"]),
                        ("mlx", lambda c: c["lora_parameters"]["keys"] == ["self_attn.qkv_proj"])]:
    save_adapter(model, tmp_path / fmt, format=fmt)
    assert recorded(json.loads((tmp_path / fmt / "adapter_config.json").read_text()))
    np.testing.assert_allclose(load_adapter(load_pretrained(base), tmp_path / fmt)(tokens).numpy(), unmerged, atol=1e-5, rtol=1e-5)

def test_peft_file_without_targets_loads_with_the_family_default(tmp_path):
  """PEFT writes target_modules null when they were left to the model type's default: read the same way."""
  model = tl.inject(lazy("phi3"), LoraConfig(r=2, init_lora_weights=False))
  save_adapter(model, tmp_path)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": None}))
  save_file(load_file(str(tmp_path / "adapter_model.safetensors")), str(tmp_path / "adapter_model.safetensors"))  # as PEFT writes it
  loaded = load_adapter(lazy("phi3"), tmp_path, format="peft")
  assert sorted(tl.lora_layers(loaded)) == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]
  for path, layer in tl.lora_layers(loaded).items():
    np.testing.assert_array_equal(layer.lora_B.numpy(), tl.lora_layers(model)[path].lora_B.numpy())

def test_config_fields_read_as_transformers_reads_them():
  """Hub-style configs: Phi-3's top-level original_max_position_embeddings wins over the rope dict's (and a transformers-4
  `rope_scaling` of type longrope without it is read); a config.json that leaves out Gemma's fields gets transformers'
  defaults, an explicit null wins over them; Gemma 3 ignores attn_logit_softcapping, as its attention does."""
  old_style = {k: v for k, v in FAMILIES["phi3"].items() if k != "rope_parameters"}
  old_style |= {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
                "original_max_position_embeddings": 8, "partial_rotary_factor": 1.0}
  rope = ModelConfig.from_hf(old_style).rope
  assert rope.kind == "longrope" and dict(rope.scaling)["original_max_position_embeddings"] == 8
  both = dict(FAMILIES["phi3"], original_max_position_embeddings=5)
  assert dict(ModelConfig.from_hf(both).rope.scaling)["original_max_position_embeddings"] == 5
  bare = {k: v for k, v in FAMILIES["gemma2"].items() if k not in ("head_dim", "query_pre_attn_scalar", "sliding_window",
                                                                   "attn_logit_softcapping", "final_logit_softcapping")}
  c = ModelConfig.from_hf(bare)
  assert (c.head_dim, c.attention_scale, c.sliding_window, c.attn_logit_softcapping, c.final_logit_softcapping) == \
         (256, 256 ** -0.5, 4096, 50.0, 30.0)
  assert ModelConfig.from_hf(dict(bare, final_logit_softcapping=None)).final_logit_softcapping is None
  assert ModelConfig.from_hf(dict(FAMILIES["gemma3_text"], attn_logit_softcapping=0.5)).attn_logit_softcapping is None
  assert ModelConfig.from_hf(dict(FAMILIES["mistral"], sliding_window=None)).sliding_window is None
  # scales and caps of other families are ignored where the family does not apply them, as transformers' classes do
  llama = ModelConfig.from_hf(dict(FAMILIES["llama"], logits_scaling=4.0, attn_logit_softcapping=5.0, query_pre_attn_scalar=3))
  assert (llama.logits_scaling, llama.attn_logit_softcapping, llama.attention_scale) == (1.0, None, 8 ** -0.5)
