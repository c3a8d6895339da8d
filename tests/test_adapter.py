import json
import numpy as np, pytest
from safetensors.numpy import load_file, save_file
from tinygrad import Tensor
import tinylora as tl
from tinylora import LoraConfig, LoraError
from conftest import TinyLM

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def trained(config: LoraConfig, seed=0) -> TinyLM:
  Tensor.manual_seed(seed)
  return tl.inject(TinyLM(), config)

def fresh_base(seed=0) -> TinyLM:
  Tensor.manual_seed(seed)
  return TinyLM()

def test_peft_round_trip_is_bit_exact(tmp_path, tokens):
  cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, layers_to_transform=[0, 2], init_lora_weights=False)
  m = trained(cfg)
  out = m(tokens).numpy()
  tl.save_adapter(m, tmp_path)
  saved = json.loads((tmp_path / "adapter_config.json").read_text())
  assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["bias"] == "none"
  assert saved["target_modules"] == ALL7 and saved["layers_to_transform"] == [0, 2] and saved["use_rslora"] is False
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 16)
  assert tensors["base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"].shape == (8, 4)
  assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 24)
  assert len(tensors) == 2 * 7 * 2 and not any(".layers.1." in k for k in tensors)
  m2 = tl.load_adapter(fresh_base(), tmp_path)
  for (p, a), (q, b) in zip(tl.lora_layers(m).items(), tl.lora_layers(m2).items()):
    assert p == q and a.scale == b.scale
    np.testing.assert_array_equal(a.lora_A.numpy(), b.lora_A.numpy())
    np.testing.assert_array_equal(a.lora_B.numpy(), b.lora_B.numpy())
  np.testing.assert_array_equal(m2(tokens).numpy(), out)

def test_all_linear_is_saved_as_resolved_paths(tmp_path):
  tl.save_adapter(trained(LoraConfig(target_modules="all-linear")), tmp_path)
  saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
  assert len(saved) == 21 and "model.layers.2.mlp.down_proj" in saved and "lm_head" not in saved

def test_rslora_and_patterns_round_trip(tmp_path, tokens):
  cfg = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                   alpha_pattern={"q_proj": 3}, init_lora_weights=False)
  m = trained(cfg)
  tl.save_adapter(m, tmp_path)
  m2 = tl.load_adapter(fresh_base(), tmp_path)
  assert [(l.r, l.scale) for l in tl.lora_layers(m2).values()] == [(l.r, l.scale) for l in tl.lora_layers(m).values()]
  np.testing.assert_array_equal(m2(tokens).numpy(), m(tokens).numpy())

def test_mlx_round_trip_and_layout(tmp_path, tokens):
  m = trained(LoraConfig(r=4, lora_alpha=10, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2],
                         init_lora_weights=False))
  tl.save_adapter(m, tmp_path, format="mlx")
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert cfg == {"fine_tune_type": "lora", "num_layers": 2,
                 "lora_parameters": {"rank": 4, "scale": 2.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}
  tensors = load_file(tmp_path / "adapters.safetensors")
  assert tensors["model.layers.1.self_attn.q_proj.lora_a"].shape == (16, 4)  # mlx orientation (in, r)
  assert tensors["model.layers.2.self_attn.v_proj.lora_b"].shape == (4, 8)
  m2 = tl.load_adapter(fresh_base(), tmp_path)
  assert {p: l.scale for p, l in tl.lora_layers(m2).items()} == {p: 2.5 for p in tl.lora_layers(m)}
  np.testing.assert_array_equal(m2(tokens).numpy(), m(tokens).numpy())

def test_mlx_scale_is_used_as_is_and_default_keys(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "adapter_config.json").write_text(json.dumps({"num_layers": -1, "lora_parameters": {"rank": 2, "scale": 20.0, "dropout": 0.0}}))
  linears = {"self_attn.q_proj": (16, 16), "self_attn.k_proj": (16, 8), "self_attn.v_proj": (16, 8), "self_attn.o_proj": (16, 16),
             "mlp.gate_proj": (16, 24), "mlp.up_proj": (16, 24), "mlp.down_proj": (24, 16)}
  save_file({f"model.layers.{i}.{k}.lora_{n}": rng.standard_normal(((din, 2) if n == "a" else (2, dout))).astype(np.float32)
             for i in range(3) for k, (din, dout) in linears.items() for n in "ab"}, tmp_path / "adapters.safetensors")
  m = tl.load_adapter(fresh_base(), tmp_path)
  assert len(tl.lora_layers(m)) == 21 and all(l.scale == 20.0 for l in tl.lora_layers(m).values())

def test_mlx_refuses_layouts_it_cannot_express(tmp_path):
  with pytest.raises(LoraError, match="last num_layers"):
    tl.save_adapter(trained(LoraConfig(target_modules=["q_proj"], layers_to_transform=[0])), tmp_path, format="mlx")
  with pytest.raises(LoraError, match="one rank"):
    tl.save_adapter(trained(LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})), tmp_path, format="mlx")

def corrupt(tmp_path, edit_tensors=None, edit_config=None):
  m = trained(LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
  tl.save_adapter(m, tmp_path)
  if edit_tensors or edit_config:  # rewritten as another tool would, without tinylora's config digest
    t = load_file(tmp_path / "adapter_model.safetensors")
    if edit_tensors: edit_tensors(t)
    save_file(t, tmp_path / "adapter_model.safetensors")
  if edit_config:
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    edit_config(c)
    (tmp_path / "adapter_config.json").write_text(json.dumps(c))

KEY_A = "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"

@pytest.mark.parametrize("edit_tensors, edit_config, message", [
  (lambda t: t.pop(KEY_B), None, r"tensor '.*layers\.1\.self_attn\.k_proj\.lora_B\.weight' of shape \(8, 4\) is missing"),
  (lambda t: t.update(extra=np.zeros((2, 2), np.float32)), None, r"unexpected tensor 'extra' of shape \(2, 2\)"),
  (lambda t: t.update({KEY_A: np.zeros((4, 17), np.float32)}), None, r"k_proj\.lora_A\.weight' has shape \(4, 17\), expected \(4, 16\)"),
  (lambda t: t.update({KEY_B: np.zeros((8, 5), np.float32)}), None, r"has shape \(8, 5\), expected \(8, 4\); the config's rank is 4"),
  (None, lambda c: c.update(r=8), r"expected \(8, 16\); the config's rank is 8"),
  (None, lambda c: c.update(target_modules=["qkv"]), r"matches no linear"),
  (None, lambda c: c.update(use_dora=True), r"tensor '.*lora_magnitude_vector' of shape \(\d+,\) is missing"),
  (None, lambda c: c.update(bias="all"), r"bias='all' is not supported"),
  (None, lambda c: c.update(modules_to_save=["lm_head"]), r"modules_to_save"),
  (None, lambda c: c.update(lora_alpha=-1), r"lora_alpha"),
  (None, lambda c: c.pop("peft_type") and c.pop("r"), r"unknown adapter format"),
])
def test_failed_load_names_the_problem_and_leaves_model_unchanged(tmp_path, tokens, edit_tensors, edit_config, message):
  corrupt(tmp_path, edit_tensors, edit_config)
  m = fresh_base(seed=7)
  before = m(tokens).numpy()
  with pytest.raises(LoraError, match=message): tl.load_adapter(m, tmp_path)
  assert not tl.lora_layers(m)
  np.testing.assert_array_equal(m(tokens).numpy(), before)

def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError): tl.load_adapter(fresh_base(), tmp_path / "nope")
  (tmp_path / "adapter_config.json").write_text("{not json")
  with pytest.raises(LoraError, match="invalid JSON"): tl.load_adapter(fresh_base(), tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"): tl.load_adapter(fresh_base(), tmp_path)
  (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
  with pytest.raises(LoraError, match="not a valid safetensors file"): tl.load_adapter(fresh_base(), tmp_path)

def test_loading_into_an_adapted_model_is_refused(tmp_path):
  m = trained(LoraConfig(target_modules=["q_proj"]))
  tl.save_adapter(m, tmp_path)
  with pytest.raises(LoraError, match="already has an adapter named 'default'"): tl.load_adapter(m, tmp_path)

def test_save_refuses_non_finite_and_keeps_previous_files(tmp_path):
  m = trained(LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
  tl.save_adapter(m, tmp_path)
  before = (tmp_path / "adapter_model.safetensors").read_bytes()
  layer = next(iter(tl.lora_layers(m).values()))
  layer.lora_A.assign(Tensor.full(layer.lora_A.shape, float("nan"))).realize()
  with pytest.raises(LoraError, match="non-finite"): tl.save_adapter(m, tmp_path)
  assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

def test_weights_and_config_from_different_saves_are_refused(tmp_path):
  tl.save_adapter(trained(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])), tmp_path / "a")
  tl.save_adapter(trained(LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj"])), tmp_path / "b")
  (tmp_path / "a" / "adapter_config.json").write_bytes((tmp_path / "b" / "adapter_config.json").read_bytes())
  with pytest.raises(LoraError, match="different adapter_config.json"): tl.load_adapter(fresh_base(), tmp_path / "a")
