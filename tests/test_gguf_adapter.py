"""Reading llama.cpp LoRA adapters (`general.type adapter`): files written as llama.cpp's convert_lora_to_gguf.py writes
them (with the `gguf` package: tensors `<base tensor>.lora_a` (r, in) and `.lora_b` (out, r), the llama Q/K rows of B
permuted as convert_hf_to_gguf.py permutes weights, `adapter.lora.alpha`, scale alpha / r) load onto the model with
the logits of the base weights merged in numpy; tinylora's own GGUF adapters round-trip; bad files are refused."""
import numpy as np, pytest
from tinygrad import Tensor
import tinylora as tl
from tinylora.errors import LoraError
from tinylora.lora import adaptable_linears
from tinylora.models import Model

gguf = pytest.importorskip("gguf")
TOKENS = Tensor([[1, 5, 60, 7, 33, 2, 9, 14]])
HEADS = {"q_proj": 4, "k_proj": 2}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
              "up_proj": "ffn_up", "down_proj": "ffn_down"}

def config(model_type="llama") -> dict:
  return dict(model_type=model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=64,
              tie_word_embeddings=False)

def base_model(model_type="llama") -> Model:
  Tensor.manual_seed(0)
  return Model.from_config(config(model_type))

def converter_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute, applied by convert_lora_to_gguf.py to the rows of lora_B."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def hf_adapter(model: Model, targets: dict[str, int], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Random (A (r, in), B (out, r)) in HF/PEFT layout for model.layers.N.<module> paths, `targets` path -> rank."""
  rng, linears = np.random.default_rng(seed), adaptable_linears(model)
  return {p: (rng.standard_normal((r, linears[p][1])).astype(np.float32) * 0.1,
              rng.standard_normal((linears[p][0], r)).astype(np.float32) * 0.1) for p, r in targets.items()}

def write_like_llama_cpp(path, arch: str, adapter: dict, alpha: float, outtype: str = "F32") -> None:
  """What convert_lora_to_gguf.py writes for a PEFT adapter: the adapter type keys, lora_alpha as adapter.lora.alpha,
  and per linear `<blk.N.name>.weight.lora_a` / `.lora_b` in --outtype (f32 default, f16), llama Q/K rows of B permuted."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_type(gguf.GGUFType.ADAPTER)
  w.add_string(gguf.Keys.Adapter.TYPE, "lora")
  w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
  dtype = {"F32": np.float32, "F16": np.float16}[outtype]
  for p, (A, B) in adapter.items():
    block, module = p.split(".")[2], p.rsplit(".", 1)[1]
    if arch == "llama" and module in HEADS: B = converter_permute(B, HEADS[module])
    name = f"blk.{block}.{GGUF_NAMES[module]}.weight"
    w.add_tensor(f"{name}.lora_a", A.astype(dtype))
    w.add_tensor(f"{name}.lora_b", B.astype(dtype))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

def merged_logits(model_type: str, adapter: dict, scales: dict[str, float]) -> np.ndarray:
  """The independent reference: a fresh copy of the base with W + scale * B @ A written into its weights in numpy."""
  ref = base_model(model_type)
  for p, (A, B) in adapter.items():
    linear = ref
    for part in p.split("."): linear = linear[int(part)] if part.isdigit() else getattr(linear, part)
    linear.weight.assign(Tensor(linear.weight.numpy() + scales[p] * B @ A)).realize()
  return ref(TOKENS).numpy()

TARGETS = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.k_proj": 4, "model.layers.1.self_attn.v_proj": 4,
           "model.layers.1.mlp.down_proj": 4}

@pytest.mark.parametrize("model_type,outtype", [("llama", "F32"), ("llama", "F16"), ("qwen2", "F32")])
def test_loads_an_adapter_written_as_llama_cpps_converter_writes_it(tmp_path, model_type, outtype):
  model = base_model(model_type)
  adapter = hf_adapter(model, TARGETS)
  if outtype == "F16": adapter = {p: (A.astype(np.float16).astype(np.float32), B.astype(np.float16).astype(np.float32)) for p, (A, B) in adapter.items()}
  write_like_llama_cpp(tmp_path / "a.gguf", model_type, adapter, alpha=8.0, outtype=outtype)
  tl.load_adapter(model, tmp_path / "a.gguf")
  layers = tl.lora_layers(model)
  assert sorted(layers) == sorted(TARGETS)
  for p, (A, B) in adapter.items():  # un-permuted back to HF's row order, scale alpha / r as llama.cpp computes it
    np.testing.assert_array_equal(layers[p].lora_A.numpy(), A)
    np.testing.assert_array_equal(layers[p].lora_B.numpy(), B)
    assert layers[p].scale == 8.0 / 4
  np.testing.assert_allclose(model(TOKENS).numpy(), merged_logits(model_type, adapter, {p: 2.0 for p in adapter}), atol=2e-5)

def test_ranks_that_differ_per_layer_and_alpha_zero(tmp_path):
  """llama.cpp takes each tensor's rank from lora_b and uses scale 1 when adapter.lora.alpha is 0."""
  model = base_model()
  adapter = hf_adapter(model, {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 6})
  write_like_llama_cpp(tmp_path / "a.gguf", "llama", adapter, alpha=0.0)
  tl.load_adapter(model, tmp_path / "a.gguf")
  assert {p: (l.r, l.scale) for p, l in tl.lora_layers(model).items()} == \
    {"model.layers.0.self_attn.q_proj": (2, 1.0), "model.layers.1.self_attn.q_proj": (6, 1.0)}
  np.testing.assert_allclose(model(TOKENS).numpy(), merged_logits("llama", adapter, {p: 1.0 for p in adapter}), atol=2e-5)

def test_round_trip_through_tinyloras_own_gguf_adapter(tmp_path):
  """Ranks and scales that differ per layer are folded into B on save (one alpha per file) and read back to the same
  deltas; the loaded adapter saves again as PEFT."""
  model = base_model()
  tl.inject(model, tl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"], rank_pattern={"up_proj": 2},
                                 init_lora_weights=False))
  ref = model(TOKENS).numpy()
  tl.save_adapter(model, tmp_path / "a.gguf", format="gguf")
  back = tl.load_adapter(base_model(), tmp_path / "a.gguf")
  np.testing.assert_allclose(back(TOKENS).numpy(), ref, atol=1e-5)
  for p, layer in tl.lora_layers(model).items():
    np.testing.assert_allclose(tl.lora_layers(back)[p].delta_weight().numpy(), layer.delta_weight().numpy(), atol=1e-6)
  tl.save_adapter(back, tmp_path / "peft")
  np.testing.assert_allclose(tl.load_adapter(base_model(), tmp_path / "peft")(TOKENS).numpy(), ref, atol=1e-5)

def write_raw(path, tensors: dict, arch: str = "llama", kind: str = "adapter") -> None:
  w = gguf.GGUFWriter(str(path), arch)
  w.add_type(kind)
  if kind == "adapter":
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
  for name, a in tensors.items(): w.add_tensor(name, a.astype(np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

BAD = {  # name -> (tensors, arch, general.type, the error's words)
  "a model file": ({"blk.0.attn_q.weight": np.ones((64, 64))}, "llama", "model", "not a LoRA adapter"),
  "another architecture": ({"blk.0.attn_q.weight.lora_a": np.ones((4, 64)), "blk.0.attn_q.weight.lora_b": np.ones((64, 4))},
                           "qwen2", "adapter", "architecture"),
  "lora_a without lora_b": ({"blk.0.attn_q.weight.lora_a": np.ones((4, 64))}, "llama", "adapter", "lora_b"),
  "a full tensor": ({"blk.0.attn_norm.weight": np.ones(64)}, "llama", "adapter", "not one half of a LoRA pair"),
  "a layer the model lacks": ({"blk.7.attn_q.weight.lora_a": np.ones((4, 64)), "blk.7.attn_q.weight.lora_b": np.ones((64, 4))},
                              "llama", "adapter", "layers.7"),
  "ranks that disagree": ({"blk.0.attn_q.weight.lora_a": np.ones((4, 64)), "blk.0.attn_q.weight.lora_b": np.ones((64, 3))},
                          "llama", "adapter", "rank"),
  "the wrong input size": ({"blk.0.attn_q.weight.lora_a": np.ones((4, 32)), "blk.0.attn_q.weight.lora_b": np.ones((64, 4))},
                           "llama", "adapter", "shape"),
}

@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_files_are_refused_and_leave_the_model_as_it_was(tmp_path, case):
  tensors, arch, kind, words = BAD[case]
  write_raw(tmp_path / "bad.gguf", tensors, arch, kind)
  model = base_model()
  before = model(TOKENS).numpy()
  with pytest.raises(LoraError, match=words): tl.load_adapter(model, tmp_path / "bad.gguf")
  assert tl.list_adapters(model) == []
  np.testing.assert_array_equal(model(TOKENS).numpy(), before)

def test_a_truncated_adapter_file_is_refused(tmp_path):
  model = base_model()
  write_like_llama_cpp(tmp_path / "a.gguf", "llama", hf_adapter(model, TARGETS), 8.0)
  data = (tmp_path / "a.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 100])
  with pytest.raises(LoraError, match="truncated"): tl.load_adapter(model, tmp_path / "cut.gguf")
  with pytest.raises(FileNotFoundError): tl.load_adapter(model, tmp_path / "missing.gguf")
  assert tl.list_adapters(model) == []

def test_an_adapter_file_is_no_model(tmp_path):
  model = base_model()
  write_like_llama_cpp(tmp_path / "a.gguf", "llama", hf_adapter(model, TARGETS), 8.0)
  with pytest.raises(LoraError, match="a LoRA adapter, not a model: load it with load_adapter"): tl.load_pretrained(tmp_path / "a.gguf")
