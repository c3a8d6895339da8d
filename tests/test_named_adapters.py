"""Several named adapters on one base: adding, choosing, deleting, saving and loading them, training and merging only
the active one, and mixed batches whose rows use different adapters in one pass."""
import inspect
import numpy as np, pytest
from tinygrad import Tensor, nn
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.models import Model
from tinylora.train import Trainer, TrainConfig
from conftest import TinyLM

LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
# three adapters with different targets, ranks and kinds
CONFIGS = {"default": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
           "mlp": LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj", "down_proj", "v_proj"], init_lora_weights=False),
           "dora": LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"], init_lora_weights=False, use_dora=True)}

def base_lm(seed=0) -> TinyLM:
  Tensor.manual_seed(seed)
  return TinyLM()

def three_adapters(model, names=tuple(CONFIGS)):
  for i, name in enumerate(names):
    Tensor.manual_seed(100 + i)
    tl.inject(model, CONFIGS[name], adapter_name=name)
  return model

def test_adapters_sit_side_by_side_and_set_adapter_switches(tmp_path, tokens):
  m = three_adapters(base_lm())
  assert tl.list_adapters(m) == ["default", "mlp", "dora"] and tl.active_adapter(m) == "default"
  outs = {}
  for name in CONFIGS:
    tl.set_adapter(m, name)
    outs[name] = m(tokens).numpy()
    tl.save_adapter(m, tmp_path / name)
    # the same adapter alone on a fresh copy of the base gives the same output
    np.testing.assert_allclose(tl.load_adapter(base_lm(), tmp_path / name)(tokens).numpy(), outs[name], rtol=1e-6, atol=1e-6)
  assert len({round(float(o.sum()), 4) for o in outs.values()}) == 3
  assert set(tl.lora_layers(m, "mlp")) == {f"model.layers.{i}.{k}" for i in range(3)
                                           for k in ("mlp.up_proj", "mlp.down_proj", "self_attn.v_proj")}
  with tl.disabled(m): base = m(tokens).numpy()
  np.testing.assert_array_equal(base, base_lm()(tokens).numpy())
  # save by name without switching, and load by name beside the others (PEFT next to mlx-lm)
  tl.set_adapter(m, "default")
  tl.save_adapter(m, tmp_path / "mlp-mlx", format="mlx", adapter_name="mlp")
  b = tl.load_adapter(base_lm(), tmp_path / "default")
  tl.load_adapter(b, tmp_path / "mlp-mlx", adapter_name="mlp")
  assert tl.list_adapters(b) == ["default", "mlp"] and tl.active_adapter(b) == "default"
  np.testing.assert_allclose(b(tokens).numpy(), outs["default"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(tl.set_adapter(b, "mlp")(tokens).numpy(), outs["mlp"], rtol=1e-6, atol=1e-6)

def test_delete_adapter(tokens):
  m = three_adapters(base_lm())
  tl.set_adapter(m, "mlp")
  ref = m(tokens).numpy()
  tl.delete_adapter(m, "default")
  assert tl.list_adapters(m) == ["mlp", "dora"]
  np.testing.assert_array_equal(m(tokens).numpy(), ref)
  tl.delete_adapter(m, "mlp")  # the active one: the first remaining becomes active
  assert tl.active_adapter(m) == "dora" and not tl.lora_layers(m, "mlp")
  # q_proj keeps its DoRA adapter; v_proj and the MLP linears are plain linears again
  attn = m.model.layers[0].self_attn
  assert isinstance(attn.q_proj, tl.LoraLinear) and isinstance(attn.v_proj, nn.Linear) and isinstance(m.model.layers[0].mlp.up_proj, nn.Linear)
  tl.delete_adapter(m, "dora")
  assert not tl.list_adapters(m) and tl.active_adapter(m) is None
  np.testing.assert_array_equal(m(tokens).numpy(), base_lm()(tokens).numpy())

def test_training_and_merging_touch_only_the_active_adapter(tokens):
  m = three_adapters(base_lm())
  tl.set_adapter(m, "dora")
  frozen = {n: [t.numpy().copy() for l in tl.lora_layers(m, n).values() for t in l.adapters[n].parameters()] for n in ("default", "mlp")}
  params = tl.trainable_parameters(m)
  assert len(params) == 3 * len(tl.lora_layers(m, "dora")) and tl.count_parameters(m)[0] == sum(p.numel() for p in params)
  tok = np.random.default_rng(0).integers(0, 48, (2, 8)).astype(np.int32)
  tr = Trainer(m, TrainConfig(lr=1e-2, iters=3, warmup=0))
  for _ in range(3): tr.train_step([(tok, (tok + 1) % 48, np.ones((2, 8), np.float32))])
  for n, before in frozen.items():
    after = [t.numpy() for l in tl.lora_layers(m, n).values() for t in l.adapters[n].parameters()]
    for a, b in zip(after, before): np.testing.assert_array_equal(a, b)
  out = m(tokens).numpy()
  tl.merge(m)
  np.testing.assert_allclose(m(tokens).numpy(), out, rtol=1e-5, atol=1e-5)
  with pytest.raises(LoraError, match="unmerge before switching"): tl.set_adapter(m, "mlp")
  with pytest.raises(LoraError, match="mixed batches need unmerged"):
    with tl.mixed_batch(m, ["mlp", "dora"], 2): pass
  tl.unmerge(m)
  tl.set_adapter(m, "mlp")
  mlp_out = m(tokens).numpy()
  tl.merge_and_unload(m)  # folds the active adapter in, drops the others
  assert not tl.list_adapters(m)
  np.testing.assert_allclose(m(tokens).numpy(), mlp_out, rtol=1e-5, atol=1e-5)

def test_mixed_batch_rows_equal_each_adapter_alone():
  m = three_adapters(base_lm())
  rows = ["dora", "__base__", "default", "mlp", "default"]
  tok = Tensor(np.random.default_rng(3).integers(0, 48, (len(rows), 7)).astype(np.int32))
  alone = {}
  for name in CONFIGS: alone[name] = tl.set_adapter(m, name)(tok).numpy()
  with tl.disabled(m): alone["__base__"] = m(tok).numpy()
  tl.set_adapter(m, "default")
  with tl.mixed_batch(m, rows, len(rows)): mixed = m(tok).numpy()
  for i, name in enumerate(rows): np.testing.assert_allclose(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5, err_msg=f"row {i} ({name})")
  assert all(l.row_masks is None for l in tl.lora_layers(m).values())  # the selection lasts for the block only
  np.testing.assert_array_equal(m(tok).numpy(), alone["default"])

def test_llama_rows_routed_by_mixed_batch():
  """The model knows nothing of adapters: a mixed batch is the caller's `with mixed_batch(...)` around its call."""
  Tensor.manual_seed(0)
  model = Model.from_config(LLAMA)
  tokens = Tensor(np.random.default_rng(0).integers(0, 64, (3, 6)).astype(np.int32))
  three_adapters(model, ("default", "dora"))
  alone = {n: tl.set_adapter(model, n)(tokens).numpy() for n in ("default", "dora")}
  with tl.disabled(model): alone["__base__"] = model(tokens).numpy()
  rows = ["dora", "__base__", "default"]
  with tl.mixed_batch(model, rows): mixed = model(tokens).numpy()
  for i, name in enumerate(rows): np.testing.assert_allclose(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5, err_msg=name)
  assert "adapter_names" not in inspect.signature(Model.__call__).parameters
  with pytest.raises(LoraError, match=r"adapter_names has 2 name\(s\) for a batch of 3"):
    with tl.mixed_batch(model, ["dora", "default"]): model(tokens)  # no batch_size given: the layers check the rows
  with pytest.raises(LoraError, match=r"adapter_names has 2 name\(s\) for a batch of 3"), tl.mixed_batch(model, ["dora", "default"], 3): pass
  with pytest.raises(LoraError, match=r"unknown adapter\(s\) \['nope'\]"), tl.mixed_batch(model, ["dora", "nope", "default"]): pass
  with pytest.raises(LoraError, match="list of adapter names"), tl.mixed_batch(model, "dora"): pass
  np.testing.assert_array_equal(model(tokens).numpy(), alone["dora"])  # refused calls left no selection behind

def test_bad_names_are_refused_and_nothing_changes(tmp_path, tokens):
  m = three_adapters(base_lm(), ("default", "mlp"))
  out = m(tokens).numpy()
  with pytest.raises(LoraError, match="already has an adapter named 'mlp'"): tl.inject(m, CONFIGS["dora"], adapter_name="mlp")
  with pytest.raises(LoraError, match="adapter_name='__base__'"): tl.inject(m, CONFIGS["dora"], adapter_name="__base__")
  with pytest.raises(LoraError, match=r"no adapter named 'x'; the model has \['default', 'mlp'\]"): tl.set_adapter(m, "x")
  with pytest.raises(LoraError, match="no adapter named 'x'"): tl.delete_adapter(m, "x")
  with pytest.raises(LoraError, match="no adapter named 'x' to save"): tl.save_adapter(m, tmp_path / "x", adapter_name="x")
  tl.save_adapter(m, tmp_path / "mlp", adapter_name="mlp")
  with pytest.raises(LoraError, match="already has an adapter named 'mlp'"): tl.load_adapter(m, tmp_path / "mlp", adapter_name="mlp")
  np.testing.assert_array_equal(m(tokens).numpy(), out)
  # a DoRA adapter that cannot be built on one linear leaves the others without it
  m.model.layers[2].self_attn.o_proj.weight.assign(Tensor.zeros(16, 16)).realize()
  with pytest.raises(LoraError, match=r"model\.layers\.2\.self_attn\.o_proj: DoRA needs a nonzero norm"):
    tl.inject(m, LoraConfig(target_modules=["q_proj", "o_proj"], use_dora=True), adapter_name="dora")  # B = 0: W's norm
  assert tl.list_adapters(m) == ["default", "mlp"] and not (tmp_path / "x").exists()
  assert isinstance(m.model.layers[0].self_attn.o_proj, nn.Linear)
  tl.set_adapter(m, "default")
  assert tl.active_adapter(m) == "default"
