"""mlx-lm adapters and 4-bit checkpoints give mlx-lm's logits in tinylora, the adapters tinylora saves in mlx-lm's
format load in mlx-lm with every tensor and give the same logits, and tinylora's quantization is bit-exact with mlx's."""
import json
import numpy as np, pytest
import tinylora as tl
from tinylora import load_pretrained
from tinylora.quant import BITS, GROUP_SIZES, dequantize_array, quantize_array
from .common import assert_close, mlx_load, mlx_loading_saved, mlx_logits, tl_logits
from .conftest import MLX_VARIANTS, QUANT_VARIANTS

pytestmark = pytest.mark.interop

@pytest.mark.parametrize("name", MLX_VARIANTS)
def test_mlx_adapter_logits(mlx_adapters, name):
  ref = mlx_adapters[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  assert_close(f"mlx {name}: load_adapter vs mlx-lm load_adapters", tl_logits(model), ref.logits)

@pytest.mark.parametrize("name", MLX_VARIANTS)
def test_saved_mlx_adapter_loads_in_mlx(mlx_adapters, tmp_path, name):
  ref = mlx_adapters[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  tl.save_adapter(model, tmp_path, format="mlx")
  assert_close(f"mlx {name}: tinylora-saved adapter in mlx-lm vs original",
               mlx_logits(mlx_loading_saved(model, ref.base, tmp_path)), ref.logits)

@pytest.mark.parametrize("name", QUANT_VARIANTS)
def test_quantized_checkpoint_logits(mlx_quantized, name):
  path, want = mlx_quantized[name]
  cfg = json.loads((path / "config.json").read_text())
  assert cfg["quantization"]["bits"] == 4
  model = load_pretrained(path)
  assert_close(f"quant {name}: load_pretrained vs mlx-lm", tl_logits(model), want)

def test_quantized_checkpoints_are_what_mlx_lm_writes(mlx_quantized):
  from safetensors import safe_open
  def keys(name):
    with safe_open(mlx_quantized[name][0] / "model.safetensors", "np") as f: return set(f.keys())
  assert {"model.embed_tokens.scales", "lm_head.scales", "model.layers.0.self_attn.q_proj.scales"} <= keys("llama_g32")
  assert not any(k.startswith("lm_head") for k in keys("tied_g32")) and "model.embed_tokens.scales" in keys("tied_g32")
  assert {k for k in keys("llama_g64") if k.endswith(".scales")} == {f"model.layers.{i}.mlp.down_proj.scales" for i in (0, 1)}

@pytest.mark.parametrize("name", QUANT_VARIANTS)
def test_mlx_adapter_on_quantized_checkpoint(mlx_quantized_adapters, tmp_path, name):
  ref = mlx_quantized_adapters[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  assert_close(f"quant {name}: mlx-lm LoRA on the 4-bit model, load_adapter vs mlx-lm", tl_logits(model), ref.logits)
  tl.save_adapter(model, tmp_path, format="mlx")
  assert_close(f"quant {name}: tinylora-saved adapter on the 4-bit model in mlx-lm vs original",
               mlx_logits(mlx_loading_saved(model, ref.base, tmp_path)), ref.logits)

@pytest.mark.parametrize("name", ["llama", "llama_tied"])
def test_tinylora_quantized_checkpoint_loads_in_mlx_lm(needs_mlx, hf_models, tmp_path, name):
  """quantize + save_pretrained writes what mlx-lm's own loader reads, with the same logits (and bit-equal codes)."""
  from tinylora import save_pretrained
  from tinylora.quant import quantize
  model = quantize(load_pretrained(hf_models[name]), bits=4, group_size=32)
  save_pretrained(model, tmp_path)
  mlx_model, _ = mlx_load(tmp_path)
  assert_close(f"quant {name}: tinylora quantize + save_pretrained, loaded by mlx-lm", mlx_logits(mlx_model), tl_logits(model))

def test_quantize_array_is_bit_exact_with_mx_quantize(needs_mlx):
  import mlx.core as mx
  rng = np.random.default_rng(0)
  for bits in BITS:
    for group_size in GROUP_SIZES:
      for dtype in (np.float32, np.float16):
        w = (rng.standard_normal((8, 256)) * 0.05).astype(dtype)
        w[0], w[1], w[2] = 0, 0.3, np.abs(w[2])
        ref = [np.array(a) for a in mx.quantize(mx.array(w), group_size=group_size, bits=bits)]
        ours = quantize_array(w, bits, group_size)
        for a, b in zip(ours, ref): np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(dequantize_array(*ours, bits, group_size),
                                      np.array(mx.dequantize(*(mx.array(a) for a in ref), group_size=group_size, bits=bits)))
