import math
import numpy as np, pytest
from tinygrad import Tensor, nn, GlobalCounters
from tinygrad.helpers import Context
import tinylora as tl
from tinylora import LoraConfig, LoraError


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def np_lora(x, W, b, A, B, s):
  y = x @ W.T + x @ A.T @ B.T * s
  return y if b is None else y + b

def test_identity_at_init_is_exact(tiny_lm, tokens):
  Tensor.manual_seed(5)
  lin, x = nn.Linear(32, 24), Tensor.randn(3, 5, 32).realize()
  base = lin(x).numpy()
  np.testing.assert_array_equal(tl.LoraLinear(lin, r=4, scale=2.0)(x).numpy(), base)  # B = 0: bit for bit on CPU
  base = tiny_lm(tokens).numpy()
  tl.inject(tiny_lm, LoraConfig(r=4, target_modules=ALL7))
  # a whole model may fuse its matmuls differently once adapters split the graph: equal to float32 rounding
  np.testing.assert_allclose(tiny_lm(tokens).numpy(), base, rtol=1e-6, atol=1e-6)

def test_forward_matches_numpy():
  Tensor.manual_seed(1)
  lin = nn.Linear(12, 20)
  layer = tl.LoraLinear(lin, r=3, scale=2.5, init=False)
  x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
  ref = np_lora(x.astype(np.float64), *(t.numpy().astype(np.float64) for t in (lin.weight, lin.bias, layer.lora_A, layer.lora_B)), 2.5)
  np.testing.assert_allclose(layer(Tensor(x)).numpy(), ref, rtol=1e-5, atol=1e-5)
  assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (20, 3)  # PEFT orientation

def test_init_distributions():
  Tensor.manual_seed(2)
  layer = tl.LoraLinear(nn.Linear(256, 64), r=32, scale=1.0)
  A = layer.lora_A.numpy()
  assert np.all(np.abs(A) <= 1 / math.sqrt(256)) and A.std() > 0.5 / math.sqrt(3 * 256)  # nn.Linear's kaiming-uniform
  assert not layer.lora_B.numpy().any()
  g = tl.LoraLinear(nn.Linear(256, 64), r=32, scale=1.0, init="gaussian").lora_A.numpy()
  assert abs(g.std() - 1 / 32) < 0.1 / 32

def test_merge_unmerge_and_merge_and_unload_agree(tiny_lm, tokens):
  base = tiny_lm(tokens).numpy()
  tl.inject(tiny_lm, LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, init_lora_weights=False))
  unmerged = tiny_lm(tokens).numpy()
  assert np.abs(unmerged - base).max() > 1e-3  # the adapter does something
  tl.merge(tiny_lm)
  merged = tiny_lm(tokens).numpy()
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
  with pytest.raises(LoraError, match="already merged"): tl.merge(tiny_lm)
  np.testing.assert_allclose(tiny_lm(tokens).numpy(), merged, rtol=0, atol=0)  # a refused merge added nothing
  tl.unmerge(tiny_lm)
  np.testing.assert_allclose(tiny_lm(tokens).numpy(), unmerged, rtol=1e-5, atol=1e-5)
  with pytest.raises(LoraError, match="not merged"): tl.unmerge(tiny_lm)
  tl.merge_and_unload(tiny_lm)
  assert not tl.lora_layers(tiny_lm) and isinstance(tiny_lm.model.layers[0].self_attn.q_proj, nn.Linear)
  assert not any("lora" in k for k in nn.state.get_state_dict(tiny_lm))
  np.testing.assert_allclose(tiny_lm(tokens).numpy(), unmerged, rtol=1e-5, atol=1e-5)

def test_disabled_gives_base_output(tiny_lm, tokens):
  base = tiny_lm(tokens).numpy()
  tl.inject(tiny_lm, LoraConfig(r=4, target_modules=ALL7, init_lora_weights=False))
  with tl.disabled(tiny_lm): np.testing.assert_array_equal(tiny_lm(tokens).numpy(), base)
  tl.merge(tiny_lm)
  with tl.disabled(tiny_lm): np.testing.assert_allclose(tiny_lm(tokens).numpy(), base, rtol=1e-5, atol=1e-5)
  assert all(l.merged for l in tl.lora_layers(tiny_lm).values())

def test_unload_restores_base(tiny_lm, tokens):
  base = tiny_lm(tokens).numpy()
  weights = {k: t.numpy().copy() for k, t in nn.state.get_state_dict(tiny_lm).items()}
  tl.inject(tiny_lm, LoraConfig(r=4, target_modules=ALL7, init_lora_weights=False))
  tl.unload(tiny_lm)
  np.testing.assert_array_equal(tiny_lm(tokens).numpy(), base)
  tl.inject(tiny_lm, LoraConfig(r=4, target_modules=ALL7, init_lora_weights=False))
  tl.merge(tiny_lm)
  tl.unload(tiny_lm)  # a merged adapter is unmerged first: the base weights come back to float rounding
  assert not tl.lora_layers(tiny_lm) and isinstance(tiny_lm.model.layers[0].mlp.up_proj, nn.Linear)
  after = nn.state.get_state_dict(tiny_lm)
  assert after.keys() == weights.keys()
  for k, w in weights.items(): np.testing.assert_allclose(after[k].numpy(), w, rtol=0, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(tiny_lm(tokens).numpy(), base, rtol=1e-5, atol=1e-5)

def test_disabled_restores_the_adapters_when_the_block_raises(tiny_lm, tokens):
  tl.inject(tiny_lm, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
  layers = tl.lora_layers(tiny_lm)
  for p in list(layers)[:3]: layers[p].merge()  # some merged, some not
  merged_weight = layers[next(iter(layers))].base.weight.numpy().copy()
  out = tiny_lm(tokens).numpy()
  with pytest.raises(KeyError, match="inside the block"), tl.disabled(tiny_lm):
    assert not any(l.enabled or l.merged for l in layers.values())
    raise KeyError("inside the block")
  assert [l.merged for l in layers.values()] == [True] * 3 + [False] * 3 and all(l.enabled for l in layers.values())
  np.testing.assert_allclose(layers[next(iter(layers))].base.weight.numpy(), merged_weight, rtol=0, atol=1e-6)
  np.testing.assert_allclose(tiny_lm(tokens).numpy(), out, rtol=1e-5, atol=1e-5)

def test_saving_a_hand_built_lora_linear_names_it(tiny_lm, tmp_path):
  attn = tiny_lm.model.layers[0].self_attn
  attn.q_proj = tl.LoraLinear(attn.q_proj, r=2, scale=1.0)  # placed by hand, not by inject: no LoraConfig to record
  with pytest.raises(LoraError, match=r"model\.layers\.0\.self_attn\.q_proj holds a LoraLinear built by hand.*inject"):
    tl.save_adapter(tiny_lm, tmp_path)
  assert not any(tmp_path.iterdir())

def test_merge_refuses_non_finite(tiny_lm, tokens):
  tl.inject(tiny_lm, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
  layers = list(tl.lora_layers(tiny_lm).values())
  layers[-1].lora_B.assign(Tensor.full(layers[-1].lora_B.shape, float("inf"))).realize()
  weights = [l.base.weight.numpy().copy() for l in layers]
  with pytest.raises(LoraError, match="non-finite"): tl.merge(tiny_lm)
  assert not any(l.merged for l in layers)
  for l, w in zip(layers, weights): np.testing.assert_array_equal(l.base.weight.numpy(), w)
  with pytest.raises(LoraError, match="non-finite"): tl.merge_and_unload(tiny_lm)
  assert len(tl.lora_layers(tiny_lm)) == 3

def test_gqa_shapes_and_parameter_counts(tiny_lm):
  _, total_before = tl.count_parameters(tiny_lm)
  tl.inject(tiny_lm, LoraConfig(r=4, target_modules=ALL7))
  attn = tiny_lm.model.layers[0].self_attn
  assert attn.k_proj.lora_B.shape == (8, 4) and attn.k_proj.lora_A.shape == (4, 16)  # sized from the real weight
  trainable, total = tl.count_parameters(tiny_lm)
  per_block = 4 * ((16 + 16) * 2 + (16 + 8) * 2 + (16 + 24) * 2 + (24 + 16))
  assert trainable == 3 * per_block and total == total_before + trainable
  assert len(tl.trainable_parameters(tiny_lm)) == 2 * 7 * 3
  params = nn.state.get_state_dict(tiny_lm)
  assert {k for k, t in params.items() if t.is_param} == {k for k in params if ".lora_" in k}

@pytest.mark.parametrize("tied", [False, True])
def test_quantized_model_counts_the_parameters_it_stands_for(tied):
  """A packed weight counts rows x cols of the matrix it stands for (its scales and biases not at all): the total of a
  quantized model equals the float model's, counted by hand from the config."""
  from tinylora.models import Model
  from tinylora.quant import QuantizedLinear, quantize
  cfg = dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tied)
  D, F, V, kv = 64, 96, 64, 32
  per_layer = D * D + 2 * kv * D + (D + 2 * kv) + D * D + 3 * D * F + 2 * D  # q k v (+ their biases) o, MLP, 2 norms
  expected = V * D * (1 if tied else 2) + 2 * per_layer + D
  model = Model.from_config(cfg)
  assert tl.count_parameters(model) == (0, expected)
  quantize(model, bits=4, group_size=32)
  assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
  assert tl.count_parameters(model) == (0, expected)
  tl.inject(model, LoraConfig(r=2))  # the default targets: q_proj and v_proj
  trainable = 2 * (2 * (D + D) + 2 * (D + kv))
  assert tl.count_parameters(model) == (trainable, expected + trainable)

def test_default_targets_of_a_model_without_a_family(tiny_lm):
  """With no target_modules, a model without a config (no family) gets q_proj and v_proj, which its adapters record."""
  tl.inject(tiny_lm, LoraConfig(r=2))
  assert sorted(tl.lora_layers(tiny_lm)) == [f"model.layers.{i}.self_attn.{n}" for i in range(3) for n in ("q_proj", "v_proj")]
  assert all(l.config.target_modules == ["q_proj", "v_proj"] for l in tl.lora_layers(tiny_lm).values())
  assert LoraConfig().target_modules is None  # resolved at injection, the config itself left as given

def test_scaling_rslora_and_patterns(tiny_lm):
  tl.inject(tiny_lm, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 4}))
  attn0, attn1 = tiny_lm.model.layers[0].self_attn, tiny_lm.model.layers[1].self_attn
  assert attn0.q_proj.scale == 16 / math.sqrt(4) and attn0.v_proj.r == 2 and attn0.v_proj.scale == 16 / math.sqrt(2)
  assert attn1.q_proj.scale == 4 / math.sqrt(4)
  assert LoraConfig(r=8, lora_alpha=16).scale("x.q_proj") == 2.0

def test_target_matching_rules(tiny_lm):
  c = LoraConfig(target_modules=["q_proj", "mlp.up_proj"], layers_to_transform=[0, 2])
  assert c.matches("model.layers.0.self_attn.q_proj") and c.matches("model.layers.2.mlp.up_proj")
  assert not c.matches("model.layers.1.self_attn.q_proj") and not c.matches("model.layers.0.self_attn.xq_proj")
  assert LoraConfig(target_modules=r".*\.layers\.1\..*_proj").matches("model.layers.1.mlp.down_proj")
  tl.inject(tiny_lm, LoraConfig(target_modules="all-linear"))
  paths = tl.lora_layers(tiny_lm)
  assert len(paths) == 21 and "lm_head" not in paths

def test_layers_to_transform(tiny_lm):
  tl.inject(tiny_lm, LoraConfig(r=2, target_modules=ALL7, layers_to_transform=[1]))
  assert {p.split(".")[2] for p in tl.lora_layers(tiny_lm)} == {"1"} and len(tl.lora_layers(tiny_lm)) == 7

@pytest.mark.parametrize("kwargs, field", [
  ({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"r": True}, "r"), ({"lora_alpha": 0}, "lora_alpha"), ({"lora_alpha": -1}, "lora_alpha"),
  ({"lora_alpha": float("nan")}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_dropout": -0.1}, "lora_dropout"),
  ({"target_modules": []}, "target_modules"), ({"target_modules": ""}, "target_modules"), ({"target_modules": "(["}, "target_modules"),
  ({"target_modules": [1]}, "target_modules"), ({"use_rslora": "yes"}, "use_rslora"),
  ({"layers_to_transform": [-1]}, "layers_to_transform"), ({"init_lora_weights": "pissa"}, "init_lora_weights"),
  ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"), ({"alpha_pattern": {"q_proj": -2}}, "alpha_pattern")])
def test_config_errors(kwargs, field):
  with pytest.raises(LoraError, match=f"LoraConfig.{field}"): LoraConfig(**kwargs)
  assert issubclass(LoraError, ValueError)

def test_target_matching_nothing_lists_linears(tiny_lm):
  with pytest.raises(LoraError, match=r"matches no linear.*model\.layers\.0\.self_attn\.q_proj"):
    tl.inject(tiny_lm, LoraConfig(target_modules=["query_key_value"]))
  assert not tl.lora_layers(tiny_lm)

def test_second_injection_is_refused(tiny_lm):
  tl.inject(tiny_lm, LoraConfig(target_modules=["q_proj"]))
  with pytest.raises(LoraError, match="already has an adapter named 'default'"): tl.inject(tiny_lm, LoraConfig(target_modules=["v_proj"]))
  assert len(tl.lora_layers(tiny_lm)) == 3

def test_dropout_scales_the_lora_input_only_in_training():
  """With A = B = I (r = in = out) and scale 1 the adapter adds dropout(x) itself: y - base(x) must be 0 or x / (1 - p)
  in each element (inverted dropout), about half of each at p = 0.5, and the base path must not be dropped at all."""
  Tensor.manual_seed(3)
  lin, eye = nn.Linear(64, 64), Tensor.eye(64)
  layer = tl.LoraLinear(lin, r=64, scale=1.0, dropout=0.5, weights=(eye, eye))
  x = (Tensor.rand(8, 64) + 0.5).contiguous().realize()
  base, xn = lin(x).numpy(), x.numpy()
  np.testing.assert_allclose(layer(x).numpy() - base, xn, rtol=1e-5, atol=1e-5)  # outside training: no dropout
  with Context(TRAINING=1): delta = layer(x).numpy() - base
  kept = np.abs(delta - 2 * xn) < 1e-4
  assert (kept | (np.abs(delta) < 1e-4)).all()  # each element dropped (0) or kept and scaled by 1 / (1 - 0.5)
  assert 0.35 < kept.mean() < 0.65

def kernels(*outs: Tensor) -> int:
  GlobalCounters.reset()
  Tensor.realize(*outs)
  return GlobalCounters.kernel_count

def test_kernel_counts_of_lora_and_merged_forward():
  Tensor.manual_seed(4)
  lin = nn.Linear(128, 128)
  Tensor.realize(lin.weight, lin.bias)
  x = Tensor.randn(64, 128).realize()
  base_k = kernels(lin(x))
  layer = tl.LoraLinear(lin, r=8, scale=2.0, init=False)
  lora_k = kernels(layer(x))
  assert 0 < lora_k - base_k <= 2, (base_k, lora_k)
  layer.merge()
  assert kernels(layer(x)) == base_k

def test_merge_on_the_fly_outside_training(monkeypatch):
  # the path CUDA and NV take for forwards outside training, forced onto the CPU: same numbers, one matmul kernel
  # plus B @ A, and training keeps the separate delta (its gradients would otherwise go through a d x d weight)
  Tensor.manual_seed(6)
  lin = nn.Linear(48, 40)
  Tensor.realize(lin.weight, lin.bias)
  x = Tensor.randn(2, 7, 48).realize()
  base, base_k = lin(x).numpy(), kernels(lin(x))
  identity = tl.LoraLinear(lin, r=4, scale=2.0)
  layer = tl.LoraLinear(lin, r=4, scale=2.0, init=False)
  separate, separate_k = layer(x).numpy(), kernels(layer(x))
  monkeypatch.setattr(tl.device_policy, "MERGE_ON_THE_FLY", ("CPU",))
  np.testing.assert_array_equal(identity(x).numpy(), base)  # B = 0 adds exactly nothing to W
  ref = np_lora(x.numpy().astype(np.float64), *(t.numpy().astype(np.float64) for t in (lin.weight, lin.bias, layer.lora_A,
                                                                                        layer.lora_B)), 2.0)
  np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer(x).numpy(), separate, rtol=1e-5, atol=1e-5)
  assert kernels(layer(x)) == base_k + 1 < separate_k
  with Context(TRAINING=1): assert kernels(layer(x)) == separate_k
  layer.enabled = False
  np.testing.assert_array_equal(layer(x).numpy(), base)

def test_merge_refuses_a_tied_weight_but_merge_and_unload_unties(tiny_lm, tokens):
  tiny_lm.lm_head.weight = tiny_lm.model.embed_tokens  # tied head, as with tie_word_embeddings
  tl.inject(tiny_lm, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
  emb = tiny_lm.model.embed_tokens.numpy().copy()
  with pytest.raises(LoraError, match=r"lm_head's weight is shared with model\.embed_tokens"): tl.merge(tiny_lm)
  unmerged = tiny_lm(tokens).numpy()
  tl.merge_and_unload(tiny_lm)
  np.testing.assert_array_equal(tiny_lm.model.embed_tokens.numpy(), emb)
  np.testing.assert_allclose(tiny_lm(tokens).numpy(), unmerged, rtol=1e-5, atol=1e-5)
