"""KV-cache generation: cached greedy equals greedy recomputed without a cache, the jitted decode step replays, and
sampling options behave."""
import numpy as np, pytest
from tinygrad import Tensor
from tinylora.errors import LoraError
from tinylora.generate import Decoder, generate, sample
from tinylora.models import Model

CONFIG = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
PROMPT, PAD = [3, 17, 42, 8], 16

@pytest.fixture(scope="module")
def model() -> Model:
  Tensor.manual_seed(0)
  return Model.from_config(CONFIG)

def full_logits(model: Model, seq: list[int]) -> np.ndarray:
  """Logits at every position of `seq`, without a cache. The input is padded to one length so a single set of kernels
  serves every call; causal attention keeps the padding from affecting earlier positions."""
  return model(Tensor([seq + [0] * (PAD - len(seq))]))[0, :len(seq)].numpy()

def greedy_without_cache(model: Model, prompt: list[int], n: int) -> list[int]:
  seq = list(prompt)
  for _ in range(n): seq.append(int(full_logits(model, seq)[-1].argmax()))
  return seq[len(prompt):]

def test_cached_greedy_equals_uncached_greedy(model):
  out = generate(model, PROMPT, 6)
  assert out == greedy_without_cache(model, PROMPT, 6)
  assert len(out) == 6 and all(0 <= t < CONFIG["vocab_size"] for t in out)

def test_jitted_decode_steps_replay_and_match_the_full_forward(model):
  seq = PROMPT + [5, 9, 60, 1, 33]
  decoder = Decoder(model, len(seq))
  steps = [decoder.prefill(PROMPT)] + [decoder.step(t, i) for i, t in enumerate(seq[len(PROMPT):-1], start=len(PROMPT))]
  assert decoder.jit.captured is not None and decoder.jit.cnt == len(seq)  # cnt starts at 1: call 1 captured, calls 2+ replayed
  np.testing.assert_allclose(np.stack(steps), full_logits(model, seq)[len(PROMPT) - 1:-1], atol=1e-5, rtol=1e-5)

def test_stop_tokens_end_generation_and_are_not_returned(model):
  out = generate(model, PROMPT, 8)
  stop = next(t for i, t in enumerate(out) if t not in out[:i] and i > 0)
  assert generate(model, PROMPT, 8, stop_tokens=[stop]) == out[:out.index(stop)]

def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
  a = generate(model, PROMPT, 5, temperature=1.0, seed=7)
  assert a == generate(model, PROMPT, 5, temperature=1.0, seed=7)
  assert generate(model, PROMPT, 5, temperature=1.0, top_p=1e-6, seed=1) == generate(model, PROMPT, 5)

def test_sample():
  rng = np.random.default_rng(0)
  logits = np.array([1.0, 3.0, 2.9, -5.0], np.float32)
  assert sample(logits, 0.0, 1.0, rng) == 1
  assert {sample(logits, 1.0, 0.45, rng) for _ in range(50)} == {1}  # p = 0.49, 0.45, 0.06, 0.0001
  assert {sample(logits, 1.0, 0.9, rng) for _ in range(200)} == {1, 2}
  assert {sample(logits, 100.0, 1.0, rng) for _ in range(200)} == {0, 1, 2, 3}

def test_lora_model_generates_with_its_adapter():
  from tinylora import LoraConfig, disabled, inject, merge_and_unload
  lora = Model.from_config(CONFIG)
  base = generate(lora, PROMPT, 6)
  inject(lora, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
  out = generate(lora, PROMPT, 6)
  assert out != base  # the adapter changes what is generated
  with disabled(lora): assert generate(lora, PROMPT, 6) == base
  assert out == generate(merge_and_unload(lora), PROMPT, 6)

@pytest.mark.parametrize("max_len", [0, 1])
def test_decoder_needs_two_positions(model, max_len):
  with pytest.raises(LoraError, match=f"at least 2 positions, found max_len={max_len}"): Decoder(model, max_len)

@pytest.mark.parametrize("kwargs, match", [
  (dict(tokens=[]), "at least one prompt token"), (dict(max_new_tokens=-1), "max_new_tokens"),
  (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(tokens=[1, 64]), "token 64"),
])
def test_bad_arguments(model, kwargs, match):
  with pytest.raises(LoraError, match=match): generate(model, **{"tokens": PROMPT, "max_new_tokens": 3, **kwargs})

def test_zero_new_tokens(model):
  assert generate(model, PROMPT, 0) == []

def test_cache_overflow_is_refused(model):
  cache = model.make_cache(1, 4)
  with pytest.raises(LoraError, match="KV cache of 4"): model(Tensor([[1, 2, 3, 4, 5]]), 0, cache)

def test_one_decoder_serves_every_prompt_until_the_model_changes():
  from tinylora import LoraConfig, inject, merge
  from tinylora.generate import decoder_for
  model = Model.from_config(CONFIG)
  first = generate(model, PROMPT, 3)
  decoder = decoder_for(model, 8)
  assert generate(model, PROMPT[:2], 5) == greedy_without_cache(model, PROMPT[:2], 5)
  assert decoder_for(model, 8) is decoder and decoder.jit.cnt > len(PROMPT) + 5  # replayed for another prompt length
  inject(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
  adapted = generate(model, PROMPT, 3)
  assert decoder_for(model, 8) is not decoder and adapted == greedy_without_cache(model, PROMPT, 3) != first
  decoder = decoder_for(model, 8)
  merge(model)
  assert decoder_for(model, 8) is not decoder and generate(model, PROMPT, 3) == adapted

def test_a_shared_prompt_prefix_is_not_computed_again(model):
  from tinylora.generate import decoder_for
  decoder = decoder_for(model, 16)
  generate(model, PROMPT + [5, 6], 1)
  calls = decoder.jit.cnt
  generate(model, PROMPT + [7], 1)
  assert decoder.jit.cnt == calls + len(PROMPT) + 1  # without cache_prompt, the whole prompt runs again
  generate(model, PROMPT + [5, 6], 1, cache_prompt=True)
  assert decoder.jit.cnt == calls + len(PROMPT) + 1 + 2  # with it, only what differs from the cached PROMPT + [7]
  decoder.prefill(PROMPT + [5, 6])
  calls = decoder.jit.cnt
  logits = decoder.prefill(PROMPT + [7])
  assert decoder.jit.cnt == calls + 1 and decoder.tokens == PROMPT + [7]  # only the new token ran
  np.testing.assert_allclose(logits, full_logits(model, PROMPT + [7])[-1], atol=1e-5, rtol=1e-5)
  assert decoder.prefill(PROMPT) is not None and decoder.jit.cnt == calls + 2  # fully cached: the last token runs again
  with pytest.raises(LoraError, match="uncached"): decoder.step(1, len(PROMPT) + 3)

def test_batched_prompts_generate_as_each_prompt_alone():
  model = Model.from_config(CONFIG)
  stop = generate(model, PROMPT, 6)[2]
  prompts = [PROMPT, PROMPT[:2], [9, 9, 9, 9, 9, 9]]  # different lengths: rows start generating at different positions
  assert generate(model, prompts, 6, stop_tokens=[stop]) == [generate(model, p, 6, stop_tokens=[stop]) for p in prompts]
  assert generate(model, prompts[:1], 6) == [generate(model, PROMPT, 6)]
  with pytest.raises(LoraError, match="not a mix"): generate(model, [PROMPT, 3], 2)

def test_mixed_adapter_rows_generate_as_each_adapter_alone():
  from tinylora import LoraConfig, inject, set_adapter, disabled
  model = Model.from_config(CONFIG)
  inject(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), adapter_name="a")
  inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name="b")
  prompts = [PROMPT, PROMPT[:2], [9, 9, 9]]
  rows = generate(model, prompts, 5, adapter_names=["b", "__base__", "a"])
  set_adapter(model, "b")
  alone_b = generate(model, PROMPT, 5)
  with disabled(model): alone_base = generate(model, PROMPT[:2], 5)
  set_adapter(model, "a")
  assert rows == [alone_b, alone_base, generate(model, [9, 9, 9], 5)]
  assert len({tuple(r) for r in (alone_b, generate(model, PROMPT, 5))}) == 2  # the adapters do change the output
  with pytest.raises(LoraError, match="one per adapter name"): generate(model, [PROMPT], 3, adapter_names=["a", "b"])
  with pytest.raises(LoraError, match="unknown adapter"): generate(model, [PROMPT], 3, adapter_names=["c"])

def test_decoders_kept_per_model_are_bounded():
  """A long-lived process asking for many batch sizes and adapter sets keeps at most DECODERS_PER_MODEL decoders per
  model: the least recently used one is dropped, and freed at once with its KV cache; the decoders never keep the model
  alive."""
  import gc, weakref
  from tinylora import LoraConfig, inject
  from tinylora.generate import DECODERS_PER_MODEL, _decoders, decoder_for
  model = Model.from_config(CONFIG)
  inject(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="a")
  assert generate(model, [PROMPT, PROMPT[:2]], 2, adapter_names=["a", "__base__"]) is not None  # a captured decoder
  first = decoder_for(model, 8, 2, ("a", "__base__"))
  decoder, kv = weakref.ref(first), weakref.ref(first.cache.k[0].uop.buffer)
  del first
  gc.collect()
  gc.disable()  # freed by reference counting, not left for a cycle collection
  try:
    for rows in range(3, 3 + DECODERS_PER_MODEL): decoder_for(model, 8, rows)
    assert decoder() is None and kv() is None
  finally: gc.enable()
  for names in [("a",), ("__base__",), ("a", "a"), ("a", "__base__", "a"), ("__base__", "a")]:
    decoder_for(model, 8, len(names), names)
    assert len(_decoders[model]) == DECODERS_PER_MODEL
  assert list(_decoders[model])[-1] == (2, ("__base__", "a"))  # the most recent kept last
  model_ref = weakref.ref(model)
  del model
  gc.collect()
  assert model_ref() is None
