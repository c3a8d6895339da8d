"""Session fixtures that build, in temporary directories, everything the interop tests compare against: tiny HF Llama
and Qwen2 checkpoints written by transformers, LoRA adapters written by PEFT and by mlx-lm, and mlx-lm 4-bit
checkpoints. A fixture skips (naming the package) when the library it needs is missing."""
from __future__ import annotations
import json, pathlib
import numpy as np, pytest
from .common import MAX_DIFFS, TOKENS, Adapter, hf_logits, hf_model, mlx_load, mlx_logits, mlx_with_adapter

HINT = "the interop tests need the interop extra: pip install -e '.[interop]'"
T7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def pytest_terminal_summary(terminalreporter):
  if MAX_DIFFS:
    terminalreporter.section("interop: measured max |difference| per check")
    for name, diff in MAX_DIFFS.items(): terminalreporter.write_line(f"{diff:.2e}  {name}")

@pytest.fixture(scope="session")
def needs_transformers():
  for name in ("torch", "transformers"): pytest.importorskip(name, reason=f"{name} is not installed; {HINT}")

@pytest.fixture(scope="session")
def needs_peft(needs_transformers):
  pytest.importorskip("peft", reason=f"peft is not installed; {HINT}")

@pytest.fixture(scope="session")
def needs_mlx():
  for name in ("mlx.core", "mlx_lm"): pytest.importorskip(name, reason=f"{name} is not installed; {HINT}")

# ---- base checkpoints (transformers)

# name: (config class, seed, extra config). "llama" keeps the config.json transformers 5 writes, with its non-default
# rope theta only under rope_parameters; "qwen2" also gets the top-level rope_theta that mlx-lm reads (its qwen2
# default is 1e6); "llama_tied" shares the embedding with the output head.
HF_MODELS = {"llama": ("LlamaConfig", 0, {"rope_theta": 1000.0}),
             "qwen2": ("Qwen2Config", 1, {}),
             "llama_tied": ("LlamaConfig", 2, {"tie_word_embeddings": True})}

def make_hf_model(path: pathlib.Path, config_class: str, seed: int, extra: dict) -> pathlib.Path:
  import torch, transformers
  config = getattr(transformers, config_class)(**{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
                                                  "max_position_embeddings": 128, "tie_word_embeddings": False, **extra})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():  # every tensor random (norms near 1), so no bug hides behind ones or zeros
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
  model.save_pretrained(path)
  return path

@pytest.fixture(scope="session")
def hf_models(needs_transformers, tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("hf")
  models = {name: make_hf_model(root / name, *spec) for name, spec in HF_MODELS.items()}
  cfg = json.loads((models["qwen2"] / "config.json").read_text())
  cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta"))
  (models["qwen2"] / "config.json").write_text(json.dumps(cfg, indent=2))
  return models

# ---- PEFT adapters

PEFT_VARIANTS = {
  "llama_std": ("llama", {"target_modules": T7}),
  "qwen2_std": ("qwen2", {"target_modules": T7}),
  "llama_subset": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
  "llama_regex": ("llama", {"target_modules": r".*\.(k|o|up)_proj"}),
  "llama_alllinear": ("llama", {"target_modules": "all-linear"}),  # PEFT saves the 14 resolved full paths
  "qwen2_alllinear": ("qwen2", {"target_modules": "all-linear"}),
  "llama_rslora": ("llama", {"target_modules": T7, "use_rslora": True}),
  "llama_layer1": ("llama", {"target_modules": T7, "layers_to_transform": [1]}),
  "llama_patterns": ("llama", {"target_modules": T7, "rank_pattern": {"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                               "alpha_pattern": {"v_proj": 32, "layers.0.mlp.up_proj": 3}}),
  "tied_std": ("llama_tied", {"target_modules": T7}),
}

def make_peft_adapter(base: pathlib.Path, path: pathlib.Path, seed: int, kwargs: dict) -> Adapter:
  import torch
  from peft import LoraConfig, get_peft_model
  model = hf_model(base)
  base_logits = hf_logits(model)
  torch.manual_seed(seed)
  # init_lora_weights=False: B gets nn.Linear's random init instead of zeros, as after training
  model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)).eval()
  logits = hf_logits(model)
  assert np.abs(logits - base_logits).max() > 0.1, "the adapter should change the logits"
  model.save_pretrained(path)
  return Adapter(base, path, logits, merged=hf_logits(model.merge_and_unload()))

@pytest.fixture(scope="session")
def peft_adapters(needs_peft, hf_models, tmp_path_factory) -> dict[str, Adapter]:
  root = tmp_path_factory.mktemp("peft")
  return {name: make_peft_adapter(hf_models[model], root / name, seed, kwargs)
          for seed, (name, (model, kwargs)) in enumerate(PEFT_VARIANTS.items())}

# ---- mlx-lm adapters and quantized checkpoints

# name: (model, num_layers, lora_parameters.keys or None for mlx-lm's default: every linear in the block)
MLX_VARIANTS = {
  "llama_keys_last1": ("llama", 1, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]),
  "llama_default_last1": ("llama", 1, None),
  "qwen2_default_last1": ("qwen2", 1, None),
  "qwen2_keys_all": ("qwen2", -1, ["self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]),
}

def make_mlx_adapter(base: pathlib.Path, path: pathlib.Path, seed: int, num_layers: int, keys: list[str] | None,
                     tokens: np.ndarray = TOKENS) -> Adapter:
  """Writes the files `mlx_lm.lora --train` writes: the trainable parameters and the CLI arguments; mlx-lm's logits of
  `tokens` with the adapter."""
  import mlx.core as mx
  from mlx.utils import tree_flatten
  from mlx_lm.lora import CONFIG_DEFAULTS
  from mlx_lm.tuner.lora import LoRALinear
  from mlx_lm.tuner.utils import linear_to_lora_layers
  from mlx_lm.utils import save_config
  params = {"rank": 4, "dropout": 0.0, "scale": 3.0, **({} if keys is None else {"keys": keys})}
  model, _ = mlx_load(base)
  model.freeze()
  linear_to_lora_layers(model, num_layers, params)
  mx.random.seed(seed)
  for _, m in model.named_modules():  # mlx-lm starts B at zero; a trained adapter has B != 0
    if isinstance(m, LoRALinear): m.lora_b = 0.5 * mx.random.normal(m.lora_b.shape)
  path.mkdir()
  mx.save_safetensors(str(path / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
  args = dict(CONFIG_DEFAULTS, model=str(base), train=True, adapter_path=str(path), num_layers=num_layers, lora_parameters=params)
  save_config(args, path / "adapter_config.json")
  return Adapter(base, path, mlx_logits(mlx_with_adapter(base, path), tokens))

@pytest.fixture(scope="session")
def mlx_adapters(needs_mlx, hf_models, tmp_path_factory) -> dict[str, Adapter]:
  root = tmp_path_factory.mktemp("mlx")
  return {name: make_mlx_adapter(hf_models[model], root / name, seed, n, keys)
          for seed, (name, (model, n, keys)) in enumerate(MLX_VARIANTS.items())}

# name: (model, group_size); 4 bits. With group 32 every linear and embedding is quantized (lm_head too); with group 64
# only down_proj (in_features 64) is, the rest stay float, as mlx-lm quantizes only when in_features % group_size == 0.
QUANT_VARIANTS = {"llama_g32": ("llama", 32), "llama_g64": ("llama", 64), "tied_g32": ("llama_tied", 32),
                  "qwen2_g32": ("qwen2", 32)}

def make_quantized(base: pathlib.Path, path: pathlib.Path, group_size: int) -> tuple[pathlib.Path, np.ndarray]:
  """What `mlx_lm.convert -q --q-bits 4 --q-group-size N` writes, and mlx-lm's logits of the reloaded checkpoint."""
  from mlx_lm.utils import quantize_model, save_config, save_model
  model, config = mlx_load(base)
  model, config = quantize_model(model, config, group_size=group_size, bits=4)
  save_model(path, model)
  save_config(config, path / "config.json")
  return path, mlx_logits(mlx_load(path)[0])

@pytest.fixture(scope="session")
def mlx_quantized(needs_mlx, hf_models, tmp_path_factory) -> dict[str, tuple[pathlib.Path, np.ndarray]]:
  root = tmp_path_factory.mktemp("quant")
  return {name: make_quantized(hf_models[model], root / name, gs) for name, (model, gs) in QUANT_VARIANTS.items()}

@pytest.fixture(scope="session")
def mlx_quantized_adapters(mlx_quantized, tmp_path_factory) -> dict[str, Adapter]:
  """An mlx-lm LoRA adapter (every linear of both blocks) on each 4-bit checkpoint."""
  root = tmp_path_factory.mktemp("quant_lora")
  return {name: make_mlx_adapter(path, root / name, 100 + seed, 2, None)
          for seed, (name, (path, _)) in enumerate(mlx_quantized.items())}

# ---- every family tinylora's decoder runs (test_families.py)

# name: (config class, seed, extra config). 4 layers (Gemma 3: 6, for its 5 sliding : 1 full pattern); every sliding
# window (3 or 4) is shorter than TOKENS (7) and than the generated sequences; the norms are perturbed around 1 by
# make_hf_model, so a norm of the wrong form (w or 1 + w) or in the wrong place shows.
PHI4_MINI_ROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.25, 2.5], "long_factor": [1.5, 4.0, 9.0],
                  "original_max_position_embeddings": 5}
FAMILIES = {
  "llama": ("LlamaConfig", 30, {"num_hidden_layers": 4, "rope_theta": 500.0}),
  "mistral": ("MistralConfig", 31, {"num_hidden_layers": 4, "sliding_window": 4}),
  "qwen2": ("Qwen2Config", 32, {"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
  "qwen3": ("Qwen3Config", 33, {"num_hidden_layers": 4, "head_dim": 16}),  # 4 heads x 16 != hidden 32
  # tied, as Gemma 2 is (mlx-lm's gemma2 has no lm_head); soft-caps low enough to bite
  "gemma2": ("Gemma2Config", 34, {"num_hidden_layers": 4, "tie_word_embeddings": True, "head_dim": 8, "query_pre_attn_scalar": 12,
                                  "sliding_window": 4, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
  # hidden 64: mlx-lm 0.32's gemma3_text rounds the embedding scale sqrt(hidden) to bfloat16 (transformers keeps it in
  # float32), 1e-3 apart at hidden 32; sqrt(64) = 8 is exact in both
  "gemma3_text": ("Gemma3TextConfig", 35, {"num_hidden_layers": 6, "hidden_size": 64, "head_dim": 8, "query_pre_attn_scalar": 12,
                                           "sliding_window": 3}),
  "gemma3_text_linear": ("Gemma3TextConfig", 36, {"num_hidden_layers": 6, "head_dim": 8, "query_pre_attn_scalar": 12,
                                                  "sliding_window": 3, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
  "phi3": ("Phi3Config", 37, {"num_hidden_layers": 4, "pad_token_id": 0, "sliding_window": 4}),
  # Phi-4-mini's form: LongRoPE on 3/4 of each head; TOKENS (7) passes original_max_position_embeddings (long factors)
  "phi3_longrope": ("Phi3Config", 38, {"num_hidden_layers": 4, "pad_token_id": 0, "partial_rotary_factor": 0.75,
                                       "rope_scaling": PHI4_MINI_ROPE}),
  "smollm3": ("SmolLM3Config", 39, {"num_hidden_layers": 4, "pad_token_id": 0}),  # layer 3 without RoPE
  "olmo2": ("Olmo2Config", 40, {"num_hidden_layers": 4, "pad_token_id": 0}),
  "granite": ("GraniteConfig", 41, {"num_hidden_layers": 4, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                    "attention_multiplier": 0.03, "logits_scaling": 8.0}),
}
PHI3_T4 = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

def family_targets(name: str) -> list[str]: return PHI3_T4 if name.startswith("phi3") else T7

@pytest.fixture(scope="session")
def family_models(needs_transformers, tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("families")
  return {name: make_hf_model(root / name, *spec) for name, spec in FAMILIES.items()}

@pytest.fixture(scope="session")
def family_peft_adapters(needs_peft, family_models, tmp_path_factory) -> dict[str, Adapter]:
  root = tmp_path_factory.mktemp("families_peft")
  return {name: make_peft_adapter(path, root / name, 200 + seed, {"target_modules": family_targets(name)})
          for seed, (name, path) in enumerate(family_models.items())}

# name: tokens mlx-lm's model is compared on. mlx-lm 0.32's gemma2 and phi3 ignore sliding_window (full attention), so
# those two are compared on the first 4 tokens, which the window of 4 does not cut.
MLX_FAMILIES = {"qwen3": TOKENS, "gemma2": TOKENS[:, :4], "gemma3_text": TOKENS, "phi3": TOKENS[:, :4], "smollm3": TOKENS,
                "olmo2": TOKENS, "granite": TOKENS}

@pytest.fixture(scope="session")
def family_mlx_adapters(needs_mlx, family_models, tmp_path_factory) -> dict[str, Adapter]:
  """An mlx-lm LoRA adapter (mlx-lm's default: every linear of the last 2 blocks) on each family mlx-lm has."""
  root = tmp_path_factory.mktemp("families_mlx")
  return {name: make_mlx_adapter(family_models[name], root / name, 300 + seed, 2, None, tokens)
          for seed, (name, tokens) in enumerate(MLX_FAMILIES.items())}
