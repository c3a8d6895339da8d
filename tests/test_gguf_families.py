"""GGUF for every family: tiny random models (norms perturbed, sliding windows shorter than the sequence) round-trip
through tinylora's GGUF writer; files written independently with the `gguf` package as llama.cpp's convert_hf_to_gguf.py
writes them (tensor names from gguf's own name map, 1 + w norms, Q/K permutation, its metadata keys) load with the logits
of the HF-layout model; bad files and models a GGUF cannot describe are refused; adapters of fused and q/k-norm families
round-trip."""
import pathlib
import numpy as np, pytest
from tinygrad import Tensor, dtypes
import tinylora as tl
from tinylora.errors import LoraError
from tinylora.models import Model
from tinylora.models.architectures import SLIDING
from tinylora.tree import FrozenMapping, unique_state_dict

gguf = pytest.importorskip("gguf")
TOKENS = Tensor([[1, 5, 60, 7, 33, 2, 9, 14]])
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False)
# model_type -> the HF config fields beyond BASE; windows of 4 positions act within TOKENS' 8 (Gemma 3's two layers both
# slide, by llama.cpp's fixed 5:1 pattern; tests/interop runs six)
FAMILIES = {
  "llama": dict(rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
  "qwen3": dict(head_dim=16, rope_theta=1e4),
  "gemma2": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, attn_logit_softcapping=5.0,
                 final_logit_softcapping=3.0, tie_word_embeddings=True, rope_theta=1e4),
  "gemma3_text": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, final_logit_softcapping=4.0,
                      rope_theta=1e5, rope_local_base_freq=100.0),
  "phi3": dict(sliding_window=4, partial_rotary_factor=0.5, rope_theta=1e4, original_max_position_embeddings=4,
               rope_scaling={"rope_type": "longrope", "long_factor": [1.5, 3.0], "short_factor": [1.1, 1.3],
                             "original_max_position_embeddings": 4}),
  "smollm3": dict(num_hidden_layers=4, rope_theta=1e4),
  "olmo2": dict(rope_theta=1e4),
  "granite": dict(attention_multiplier=0.2, embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0, rope_theta=1e4),
}
VOCAB = FrozenMapping({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": [f"t{i}" for i in range(64)],
                       "tokenizer.ggml.token_type": [1] * 64, "tokenizer.ggml.merges": ["t 0"], "tokenizer.ggml.bos_token_id": 1,
                       "tokenizer.ggml.eos_token_id": 2})

def make(model_type: str, **changes) -> Model:
  """A random model of the family (its FAMILIES config with `changes`) with every norm perturbed (Gemma's stored 1 + w
  would hide behind zeros); the same weights whatever the changes that keep the shapes."""
  Tensor.manual_seed(sorted(FAMILIES).index(model_type))
  m = Model.from_config({**BASE, "model_type": model_type, **FAMILIES[model_type], **changes})
  rng = np.random.default_rng(0)
  for key, t in unique_state_dict(m).items():
    if key.endswith("norm.weight"): t.replace(Tensor(t.numpy() + rng.normal(0, 0.2, t.shape).astype(np.float32)).realize())
  m.file_metadata = VOCAB
  return m

@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> tuple[str, Model, np.ndarray]:
  m = make(request.param)
  return request.param, m, m(TOKENS).numpy()

def quantized_reference(model: Model, kind) -> Model:
  """The model with every 2-D weight replaced by gguf's own quantize -> dequantize (rows and blocks are the same in
  HF's and llama.cpp's layout: the Q/K permutation moves whole rows)."""
  ref = Model(model.config)
  for key, t in unique_state_dict(model).items():
    a = t.numpy()
    if a.ndim == 2 and a.shape[-1] % 32 == 0: a = gguf.quants.dequantize(gguf.quants.quantize(a, kind), kind)
    unique_state_dict(ref)[key].replace(Tensor(a.astype(np.float32)).realize())
  return ref

def test_round_trip_f32_and_q8_0(family, tmp_path):
  _, model, ref = family
  tl.save_pretrained(model, tmp_path / "f32.gguf", format="gguf", quantization="f32")
  back = tl.load_pretrained(tmp_path / "f32.gguf")
  for field in ("model_type", "layer_types", "rope_layers", "sliding_window", "head_dim", "tie_word_embeddings", "hidden_act",
                "attn_logit_softcapping", "final_logit_softcapping"):
    assert getattr(back.config, field) == getattr(model.config, field), field
  assert back.dtype == dtypes.float32
  np.testing.assert_allclose(back(TOKENS).numpy(), ref, atol=1e-5, rtol=1e-5)
  tl.save_pretrained(model, tmp_path / "q8.gguf", format="gguf", quantization="q8_0")
  q8 = tl.load_pretrained(tmp_path / "q8.gguf", dequantize=True)  # the same kernels as the float model
  np.testing.assert_allclose(q8(TOKENS).numpy(), quantized_reference(model, gguf.GGMLQuantizationType.Q8_0)(TOKENS).numpy(),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(q8(TOKENS).numpy(), ref, atol=5e-2)  # and q8_0 rounding itself stays small

# ---- files written as llama.cpp's converter writes them, independently of tinylora's writer

PERMUTED = {"llama", "smollm3", "granite"}  # LlamaModel subclasses in convert_hf_to_gguf.py (undo_permute)
GGUF_ARCH = {"llama": "LLAMA", "qwen3": "QWEN3", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3", "phi3": "PHI3",
             "smollm3": "SMOLLM3", "olmo2": "OLMO2", "granite": "GRANITE"}

def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """LlamaModel.permute of convert_hf_to_gguf.py."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def converter_metadata(w, model_type: str, cfg: dict) -> None:
  """The hyperparameters each converter class writes (TextModel.set_gguf_parameters and the family's overrides)."""
  head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
  w.add_block_count(cfg["num_hidden_layers"]); w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"]); w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"]); w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  if model_type != "gemma2": w.add_rope_freq_base(cfg["rope_theta"])
  if "head_dim" in cfg and model_type != "granite": w.add_key_length(head_dim); w.add_value_length(head_dim)
  if model_type in PERMUTED: w.add_vocab_size(cfg["vocab_size"]); w.add_rope_dimension_count(head_dim)
  if model_type == "llama":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR); w.add_rope_scaling_factor(cfg["rope_scaling"]["factor"])
  if model_type == "gemma2":
    w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"]); w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
  if model_type in ("gemma2", "gemma3_text", "phi3"): w.add_sliding_window(cfg["sliding_window"] or 0)  # phi3: 0 for none
  if model_type == "gemma3_text":
    w.add_rope_freq_base_swa(cfg["rope_local_base_freq"]); w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
  if model_type == "phi3":
    scale = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
    w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
    w.add_rope_dimension_count(int(cfg["partial_rotary_factor"] * cfg["hidden_size"]) // cfg["num_attention_heads"])
    w.add_rope_scaling_attn_factors(np.sqrt(1 + np.log(scale) / np.log(cfg["original_max_position_embeddings"])))
    for k in ("long", "short"): w.add_tensor(f"rope_factors_{k}.weight", np.array(cfg["rope_scaling"][f"{k}_factor"], np.float32))
  if model_type == "granite":
    w.add_attention_scale(cfg["attention_multiplier"]); w.add_embedding_scale(cfg["embedding_multiplier"])
    w.add_residual_scale(cfg["residual_multiplier"]); w.add_logit_scale(cfg["logits_scaling"])

def write_like_converter(path, model: Model, model_type: str) -> None:
  cfg, arch = model.config.hf, getattr(gguf.MODEL_ARCH, GGUF_ARCH[model_type])  # the config.json it was made from
  names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
  w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
  converter_metadata(w, model_type, cfg)
  w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default"); w.add_token_list(VOCAB["tokenizer.ggml.tokens"])
  w.add_token_types(VOCAB["tokenizer.ggml.token_type"]); w.add_token_merges(VOCAB["tokenizer.ggml.merges"])
  w.add_bos_token_id(1); w.add_eos_token_id(2)
  for key, t in unique_state_dict(model).items():
    a = t.numpy().astype(np.float32)
    if key.endswith("norm.weight") and model_type.startswith("gemma"): a = a + 1  # "data_torch + 1"
    if model_type in PERMUTED and key.endswith("q_proj.weight"): a = converter_permute(a, cfg["num_attention_heads"])
    if model_type in PERMUTED and key.endswith("k_proj.weight"): a = converter_permute(a, cfg["num_key_value_heads"])
    w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), a)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

def test_loads_a_file_written_as_llama_cpps_converter_writes_it(family, tmp_path):
  model_type, model, ref = family
  write_like_converter(tmp_path / "m.gguf", model, model_type)
  back = tl.load_pretrained(tmp_path / "m.gguf")
  assert back.config.layer_types == model.config.layer_types and back.config.rope_layers == model.config.rope_layers
  np.testing.assert_allclose(back(TOKENS).numpy(), ref, atol=1e-5, rtol=1e-5)

# ---- bad files and models a GGUF cannot describe

def rewrite(source: pathlib.Path, target: pathlib.Path, drop: str | None = None, extra: str | None = None,
            dtype: type | None = None) -> pathlib.Path:
  """A copy of qwen3 GGUF `source` at `target` with its architecture's metadata and its tensors (cast to `dtype`), less
  tensor `drop`, plus a tensor named `extra`."""
  r, w = gguf.GGUFReader(source), gguf.GGUFWriter(str(target), "qwen3")
  for field in r.fields.values():
    if field.name.startswith("qwen3.") and not isinstance(field.contents(), list):
      value = field.contents()
      (w.add_uint32 if isinstance(value, int) else w.add_float32)(field.name, value)
  for t in r.tensors:
    a = np.array(t.data).reshape(tuple(reversed(t.shape.tolist())))
    if t.name != drop: w.add_tensor(t.name, a if dtype is None else a.astype(dtype))
  if extra: w.add_tensor(extra, np.ones(32, np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return target

def test_a_missing_or_unknown_family_tensor_is_named(tmp_path):
  model = make("qwen3")
  tl.save_pretrained(model, tmp_path / "m.gguf", format="gguf", quantization="f32")
  np.testing.assert_allclose(tl.load_pretrained(rewrite(tmp_path / "m.gguf", tmp_path / "same.gguf"))(TOKENS).numpy(),
                             model(TOKENS).numpy(), atol=1e-5)
  with pytest.raises(LoraError, match=r"tensor 'blk.0.attn_q_norm.weight' of shape \(16,\) is missing"):
    tl.load_pretrained(rewrite(tmp_path / "m.gguf", tmp_path / "missing.gguf", drop="blk.0.attn_q_norm.weight"))
  with pytest.raises(LoraError, match="unexpected tensor 'blk.1.attn_z_norm.weight'"):
    tl.load_pretrained(rewrite(tmp_path / "m.gguf", tmp_path / "extra.gguf", extra="blk.1.attn_z_norm.weight"))

def test_a_gguf_of_float16_tensors_computes_in_float32_unless_asked(tmp_path):
  model = make("qwen3")
  tl.save_pretrained(model, tmp_path / "m.gguf", format="gguf", quantization="f32")
  rewrite(tmp_path / "m.gguf", tmp_path / "f16.gguf", dtype=np.float16)  # every tensor F16, the norms too
  default, half = tl.load_pretrained(tmp_path / "f16.gguf"), tl.load_pretrained(tmp_path / "f16.gguf", dtype=dtypes.float16)
  assert (default.dtype, half.dtype) == (dtypes.float32, dtypes.float16)  # HF's policy would give float16 for this file
  np.testing.assert_allclose(default(TOKENS).numpy(), model(TOKENS).numpy(), atol=5e-3)  # float16 weights, float32 sums

@pytest.mark.parametrize("model_type,extra,words", [
  ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0), "layer_types"),
  ("mistral", dict(sliding_window=4), "layer_types"),
  ("gemma2", dict(query_pre_attn_scalar=16, head_dim=8, sliding_window=4, tie_word_embeddings=True), "attention_scale"),
  ("gemma2", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, tie_word_embeddings=False), "no tensor 'output.weight'"),
  ("smollm3", dict(num_hidden_layers=4, no_rope_layers=[1, 0, 1, 1]), "rope_layers")])
def test_a_model_its_gguf_cannot_describe_is_refused_before_writing(tmp_path, model_type, extra, words):
  m = Model.from_config({**BASE, "model_type": model_type, **extra})
  m.file_metadata = VOCAB
  with pytest.raises(LoraError, match=words): tl.save_pretrained(m, tmp_path / "m.gguf", format="gguf", quantization="f32")
  assert list(tmp_path.iterdir()) == []

def test_an_unsupported_gguf_architecture_is_named(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen3moe")
  w.add_block_count(1); w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(LoraError, match="GGUF architecture 'qwen3moe' is not supported; supported: llama, qwen2, qwen3"):
    tl.load_pretrained(tmp_path / "m.gguf")

# ---- adapters

ADAPTED = {"qwen3": ["q_proj", "k_proj", "o_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
           "phi3": ["qkv_proj", "gate_up_proj", "down_proj"]}
GGUF_LINEARS = {"qwen3": {"attn_q", "attn_k", "attn_output"}, "gemma3_text": {"attn_q", "attn_v", "ffn_down"},
                "phi3": {"attn_qkv", "ffn_up", "ffn_down"}}

@pytest.mark.parametrize("model_type", list(ADAPTED))
def test_adapters_round_trip(model_type, tmp_path):
  model = make(model_type)
  tl.inject(model, tl.LoraConfig(r=4, lora_alpha=8, target_modules=ADAPTED[model_type], init_lora_weights=False))
  want = model(TOKENS).numpy()
  tl.save_adapter(model, tmp_path / "a.gguf", format="gguf")
  names = {t.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
  assert {n.split(".")[2] for n in names} == GGUF_LINEARS[model_type] and len(names) == 2 * 3 * model.config.num_hidden_layers
  back = tl.load_adapter(make(model_type), tmp_path / "a.gguf")
  np.testing.assert_allclose(back(TOKENS).numpy(), want, atol=1e-5, rtol=1e-5)
