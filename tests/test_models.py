"""Model files (HF directories: shards, dtypes, saving, bad files), config reading and the forward of the Llama-shaped
families (llama, mistral, qwen2), checked against an independent numpy reference forward on tiny HF-layout checkpoints
that the tests write themselves. What sets the other families apart is checked in test_architectures.py."""
import json, struct
import numpy as np, pytest
from safetensors.numpy import load_file, save_file
from tinygrad import Device, Tensor, dtypes, nn
from tinylora.errors import LoraError
from tinylora import load_pretrained, save_pretrained
from tinylora.formats import hf
from tinylora.models import Model, ModelConfig

B, T = 2, 8

def tiny_config(**overrides) -> dict:
  cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5,
             rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False)
  return {**cfg, **overrides}

def hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights named and shaped as transformers names and shapes them."""
  rng = np.random.default_rng(seed)
  D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
  q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
  llama_bias = cfg["model_type"] == "llama" and cfg.get("attention_bias", False)
  biased = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} if cfg["model_type"] == "qwen2" or llama_bias else set()
  if llama_bias: biased.add("self_attn.o_proj")
  if cfg["model_type"] == "llama" and cfg.get("mlp_bias", False): biased |= {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg["tie_word_embeddings"]: shapes["lm_head.weight"] = (V, D)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    for name, shape in [("self_attn.q_proj", (q, D)), ("self_attn.k_proj", (kv, D)), ("self_attn.v_proj", (kv, D)),
                        ("self_attn.o_proj", (D, q)), ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)), ("mlp.down_proj", (D, F))]:
      shapes[p + name + ".weight"] = shape
      if name in biased: shapes[p + name + ".bias"] = shape[:1]
    shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (D,)
  return {k: (1 + 0.1 * rng.standard_normal(s) if k.endswith("norm.weight") else 0.3 * rng.standard_normal(s)).astype(np.float32)
          for k, s in shapes.items()}

def reference_logits(w: dict[str, np.ndarray], cfg: dict, tokens: np.ndarray, theta: float) -> np.ndarray:
  """float64 numpy forward: RMSNorm, rotate_half RoPE, GQA by repeating kv heads, causal softmax, SwiGLU."""
  H, KV, D, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"], cfg["rms_norm_eps"]
  hd = cfg.get("head_dim") or D // H
  w = {k: v.astype(np.float64) for k, v in w.items()}
  Bn, Tn = tokens.shape
  angles = np.arange(Tn)[:, None] * (1.0 / theta ** (np.arange(0, hd, 2) / hd))[None]
  cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
  def rope(x): return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin
  def rmsnorm(x, weight): return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight
  def heads(x, n): return x.reshape(Bn, Tn, n, hd).transpose(0, 2, 1, 3)
  x = w["model.embed_tokens.weight"][tokens]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    def linear(name, h): return h @ w[p + name + ".weight"].T + w.get(p + name + ".bias", 0.0)
    h = rmsnorm(x, w[p + "input_layernorm.weight"])
    q = rope(heads(linear("self_attn.q_proj", h), H))
    k = np.repeat(rope(heads(linear("self_attn.k_proj", h), KV)), H // KV, axis=1)
    v = np.repeat(heads(linear("self_attn.v_proj", h), KV), H // KV, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + np.triu(np.full((Tn, Tn), -np.inf), 1)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + linear("self_attn.o_proj", (probs @ v).transpose(0, 2, 1, 3).reshape(Bn, Tn, H * hd))
    h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
    gate = linear("mlp.gate_proj", h)
    x = x + linear("mlp.down_proj", gate / (1 + np.exp(-gate)) * linear("mlp.up_proj", h))
  return rmsnorm(x, w["model.norm.weight"]) @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T

def write_checkpoint(path, cfg: dict, weights: dict[str, np.ndarray], shards: int = 1):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  if shards == 1: return save_file(weights, str(path / "model.safetensors"))
  keys, weight_map = sorted(weights), {}
  for s in range(shards):
    name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: weights[k] for k in keys[s::shards]}
    save_file(part, str(path / name))
    weight_map.update(dict.fromkeys(part, name))
  (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

def to_bf16(a: np.ndarray) -> np.ndarray:
  """bfloat16 bits (as uint16) of float32 values, truncated."""
  return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)

def save_bf16(weights: dict[str, np.ndarray], file):
  """safetensors.numpy cannot write BF16, so the file is laid out by hand."""
  header, offset, blobs = {}, 0, []
  for k in sorted(weights):
    blob = to_bf16(weights[k]).tobytes()
    header[k] = {"dtype": "BF16", "shape": list(weights[k].shape), "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  hb = json.dumps(header).encode()
  file.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))

def tokens_np(vocab: int = 64) -> np.ndarray: return np.random.default_rng(1).integers(0, vocab, (B, T)).astype(np.int32)

def lazy_model(cfg: dict) -> Model: return Model(ModelConfig.from_hf(cfg))  # random init never realized: no kernels

def logits_of(model: Model, tokens: np.ndarray) -> np.ndarray: return model(Tensor(tokens)).numpy()

VARIANTS = {
  "llama_gqa": tiny_config(),
  "mistral_mha": tiny_config(model_type="mistral", architectures=["MistralForCausalLM"], num_key_value_heads=4, sliding_window=4096),
  "qwen2_bias_tied": tiny_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
  "head_dim_given": tiny_config(head_dim=16, num_key_value_heads=1),
  "llama_biases": tiny_config(attention_bias=True, mlp_bias=True),
}

@pytest.mark.parametrize("name", VARIANTS)
def test_load_matches_numpy_reference(tmp_path, name):
  cfg = VARIANTS[name]
  weights = hf_weights(cfg)
  write_checkpoint(tmp_path, cfg, weights)
  model = load_pretrained(tmp_path)
  assert model.dtype == dtypes.float32
  out = logits_of(model, tokens_np())
  assert out.dtype == np.float32 and out.shape == (B, T, cfg["vocab_size"])
  np.testing.assert_allclose(out, reference_logits(weights, cfg, tokens_np(), cfg["rope_theta"]), atol=1e-4, rtol=1e-4)

def test_state_dict_keys_are_hf_checkpoint_keys():
  cfg = VARIANTS["qwen2_bias_tied"]
  state = nn.state.get_state_dict(lazy_model(cfg))
  assert set(state) == set(hf_weights(cfg)) | {"lm_head.weight"}
  assert "model.layers.0.self_attn.q_proj.bias" in state and "model.layers.0.self_attn.o_proj.bias" not in state
  assert set(nn.state.get_state_dict(lazy_model(tiny_config()))) == set(hf_weights(tiny_config()))

def test_projections_are_plain_linears_and_tied_head_shares_the_embedding():
  model = lazy_model(VARIANTS["qwen2_bias_tied"])
  attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
  for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj, model.lm_head):
    assert type(linear) is nn.Linear
  assert model.lm_head.weight is model.model.embed_tokens.weight

def test_random_init_model_runs():
  out = logits_of(Model.from_config(tiny_config()), tokens_np())
  assert out.shape == (B, T, 64) and np.isfinite(out).all()

@pytest.mark.parametrize("where", ["top_level", "rope_parameters"])
def test_rope_theta_is_read_from_either_place(tmp_path, where):
  cfg = tiny_config()
  del cfg["rope_theta"]
  if where == "top_level": cfg["rope_theta"] = 50.0
  else: cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 50.0}
  weights = hf_weights(cfg)
  write_checkpoint(tmp_path, cfg, weights)
  out = logits_of(load_pretrained(tmp_path), tokens_np())
  np.testing.assert_allclose(out, reference_logits(weights, cfg, tokens_np(), 50.0), atol=1e-4, rtol=1e-4)
  assert not np.allclose(out, reference_logits(weights, cfg, tokens_np(), 10000.0), atol=1e-2)

def test_sharded_checkpoint(tmp_path):
  cfg = tiny_config()
  weights = hf_weights(cfg)
  write_checkpoint(tmp_path, cfg, weights, shards=3)
  assert not (tmp_path / "model.safetensors").exists()
  np.testing.assert_allclose(logits_of(load_pretrained(tmp_path), tokens_np()),
                             reference_logits(weights, cfg, tokens_np(), 10000.0), atol=1e-4, rtol=1e-4)

def test_fp16_file_loads_as_fp16(tmp_path):
  cfg = tiny_config()
  weights = {k: v.astype(np.float16) for k, v in hf_weights(cfg).items()}
  write_checkpoint(tmp_path, cfg, weights)
  model = load_pretrained(tmp_path)
  assert model.dtype == dtypes.float16 and model.model.layers[0].self_attn.q_proj.weight.dtype == dtypes.float16
  out = logits_of(model, tokens_np())
  assert out.dtype == np.float32
  err = np.abs(out - reference_logits(weights, cfg, tokens_np(), 10000.0))  # float16 arithmetic: ~1e-3 relative per op
  assert err.mean() < 1e-2 and err.max() < 0.1, (err.mean(), err.max())
  assert load_pretrained(tmp_path, dtype=dtypes.float32).dtype == dtypes.float32

def test_bf16_file_loads_as_fp32(tmp_path):
  cfg = tiny_config()
  weights = hf_weights(cfg)
  write_checkpoint(tmp_path, cfg, {})
  save_bf16(weights, tmp_path / "model.safetensors")
  model = load_pretrained(tmp_path)
  assert model.dtype == dtypes.float32
  widened = {k: (to_bf16(v).astype(np.uint32) << 16).view(np.float32) for k, v in weights.items()}
  np.testing.assert_allclose(logits_of(model, tokens_np()), reference_logits(widened, cfg, tokens_np(), 10000.0), atol=1e-4, rtol=1e-4)

def test_save_load_round_trip_is_bit_exact(tmp_path):
  cfg = VARIANTS["qwen2_bias_tied"]
  model = Model.from_config(cfg)
  save_pretrained(model, tmp_path / "out")
  assert "lm_head.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert saved["model_type"] == "qwen2" and saved["tie_word_embeddings"] is True and saved["rope_theta"] == 10000.0
  loaded = load_pretrained(tmp_path / "out")
  assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
  before, after = nn.state.get_state_dict(model), nn.state.get_state_dict(loaded)
  assert set(before) == set(after)
  for k in before: np.testing.assert_array_equal(before[k].numpy(), after[k].numpy(), err_msg=k)
  np.testing.assert_array_equal(logits_of(model, tokens_np()), logits_of(loaded, tokens_np()))

def test_save_keeps_rope_parameters_layout_and_casts(tmp_path):
  cfg = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 500.0})
  del cfg["rope_theta"]
  save_pretrained(Model.from_config(cfg), tmp_path, dtype=dtypes.float16)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["rope_parameters"]["rope_theta"] == 500.0 and "rope_theta" not in saved and saved["torch_dtype"] == "float16"
  assert load_pretrained(tmp_path).dtype == dtypes.float16

def test_save_refuses_lora_wrappers(tmp_path):
  model = lazy_model(tiny_config())
  class Wrapper:
    def __init__(self, base): self.base, self.lora_A = base, Tensor.zeros(2, 32)
  model.model.layers[0].self_attn.q_proj = Wrapper(model.model.layers[0].self_attn.q_proj)
  with pytest.raises(LoraError, match="merge"): save_pretrained(model, tmp_path)

@pytest.mark.parametrize("model_type", ["gpt2", "bloom"])
def test_unknown_model_type(model_type):
  with pytest.raises(LoraError, match=f"unsupported model_type '{model_type}'"): ModelConfig.from_hf(tiny_config(model_type=model_type))

def test_model_type_from_architectures():
  cfg = tiny_config(architectures=["MistralForCausalLM"])
  del cfg["model_type"]
  assert ModelConfig.from_hf(cfg).model_type == "mistral"
  with pytest.raises(LoraError, match="GPT2LMHeadModel"): ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})

@pytest.mark.parametrize("cfg", [tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                                 tiny_config(rope_scaling={"type": "yarn", "factor": 4.0}),
                                 tiny_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})])
def test_unsupported_rope_type(cfg):
  with pytest.raises(LoraError, match="unsupported rope type 'yarn'"): ModelConfig.from_hf(cfg)

def test_llama3_rope_scaling_changes_long_wavelengths():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 16}
  assert ModelConfig.from_hf(tiny_config(rope_scaling=scaling)).rope.kind == "llama3"
  model, scaled = Model.from_config(tiny_config()), Model.from_config(tiny_config(rope_scaling=scaling))
  nn.state.load_state_dict(scaled, nn.state.get_state_dict(model), verbose=False)
  assert not np.allclose(logits_of(model, tokens_np()), logits_of(scaled, tokens_np()))
  with pytest.raises(LoraError, match="low_freq_factor"): ModelConfig.from_hf(tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}))

def test_missing_config_field():
  cfg = tiny_config()
  del cfg["intermediate_size"]
  with pytest.raises(LoraError, match="intermediate_size"): ModelConfig.from_hf(cfg)

def test_missing_tensor(tmp_path):
  cfg = tiny_config()
  weights = hf_weights(cfg)
  del weights["model.layers.1.mlp.up_proj.weight"]
  write_checkpoint(tmp_path, cfg, weights)
  with pytest.raises(LoraError, match=r"checkpoint: tensor 'model.layers.1.mlp.up_proj.weight' of shape \(64, 32\) is missing"):
    load_pretrained(tmp_path)

def test_wrong_shape(tmp_path):
  cfg = tiny_config()
  weights = hf_weights(cfg)
  weights["model.layers.0.self_attn.k_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"]
  write_checkpoint(tmp_path, cfg, weights)
  with pytest.raises(LoraError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(32, 32\), expected \(16, 32\)"):
    load_pretrained(tmp_path)

def test_unexpected_tensor(tmp_path):
  cfg = tiny_config()
  weights = {**hf_weights(cfg), "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
             "model.layers.9.mlp.up_proj.weight": np.ones((2, 2), np.float32)}
  write_checkpoint(tmp_path, cfg, weights)
  with pytest.raises(LoraError, match="unexpected tensor 'model.layers.9.mlp.up_proj.weight'"): load_pretrained(tmp_path)

@pytest.mark.parametrize("edit, error, message", [
  (lambda i: i.pop("weight_map"), LoraError, "expected a weight_map object"),
  (lambda i: i["weight_map"].update({"model.norm.weight": 3}), LoraError, "expected a weight_map object"),
  (lambda i: i["weight_map"].update({"model.norm.weight": "model-00009-of-00009.safetensors"}), FileNotFoundError,
   "shard listed in .* not found: .*model-00009-of-00009"),
  (lambda i: i["weight_map"].update({"model.extra.weight": "model-00001-of-00003.safetensors"}), LoraError,
   "key 'model.extra.weight' is listed in weight_map but not found in shard model-00001-of-00003"),
], ids=["no weight_map", "shard not a name", "missing shard", "key in no shard"])
def test_shard_index_errors(tmp_path, edit, error, message):
  cfg = tiny_config()
  write_checkpoint(tmp_path, cfg, hf_weights(cfg), shards=3)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  edit(index)
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(error, match=message): load_pretrained(tmp_path)

def test_a_tensor_in_two_shards_is_refused(tmp_path):
  cfg = tiny_config()
  write_checkpoint(tmp_path, cfg, hf_weights(cfg), shards=2)
  first = load_file(str(tmp_path / "model-00001-of-00002.safetensors"))
  second = load_file(str(tmp_path / "model-00002-of-00002.safetensors"))
  key = next(iter(first))
  save_file({**second, key: first[key] + 1}, str(tmp_path / "model-00002-of-00002.safetensors"))  # which one would win?
  with pytest.raises(LoraError, match=rf"tensor '{key}' is stored in model-00002-of-00002.safetensors and in another shard"):
    load_pretrained(tmp_path)

@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.int8, dtypes.float64])
def test_save_refuses_unsupported_dtypes(tmp_path, dtype):
  with pytest.raises(LoraError, match=f"save_pretrained writes float32 or float16, not {dtype}"):
    save_pretrained(lazy_model(tiny_config()), tmp_path, dtype=dtype)
  assert not any(tmp_path.iterdir())

def test_start_pos_needs_a_cache():
  with pytest.raises(LoraError, match="start_pos > 0 needs a KV cache"): lazy_model(tiny_config())(Tensor(tokens_np()), 3)

def test_rope_tables_kept_are_bounded():
  """The RoPE tables kept between calls are the ROPE_TABLES most recently used: a process that sees many sequence
  lengths does not keep a table for each."""
  from tinylora.models.architectures import Rope
  from tinylora.models.decoder import ROPE_TABLES, _rope_table
  for length in range(1, 3 * ROPE_TABLES): _rope_table(Rope(10000.0, 8), length, Device.DEFAULT)
  assert _rope_table.cache_info().currsize == ROPE_TABLES

def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"): load_pretrained(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.json"): load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
  with pytest.raises(FileNotFoundError, match="model.safetensors"): load_pretrained(tmp_path)

def test_quantization_key_calls_prepare_quantized(tmp_path, monkeypatch):
  cfg = tiny_config(quantization={"group_size": 32, "bits": 4})
  weights = hf_weights(cfg)
  write_checkpoint(tmp_path, cfg, weights)
  calls = []
  monkeypatch.setattr(hf, "prepare_quantized", lambda model, qcfg, keys: calls.append((type(model), qcfg, keys)))
  load_pretrained(tmp_path)
  assert calls == [(Model, {"group_size": 32, "bits": 4}, set(weights))]

def test_quantized_save_load_round_trip(tmp_path):
  from tinylora.quant import QuantizedLinear, quantize
  model = quantize(Model.from_config(VARIANTS["qwen2_bias_tied"]), bits=4, group_size=32)
  expected = logits_of(model, tokens_np())
  save_pretrained(model, tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["quantization"]["bits"] == 4 and not any(k.startswith("lm_head") for k in load_file(str(tmp_path / "model.safetensors")))
  loaded = load_pretrained(tmp_path)
  assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantizedLinear)
  np.testing.assert_array_equal(logits_of(loaded, tokens_np()), expected)

def test_float_tokens_are_refused():
  with pytest.raises(LoraError, match="integer"): lazy_model(tiny_config())(Tensor.zeros(1, 3))
