"""The `tinylora` command line on a tiny HF model directory: train (LoRA and DoRA, config file, resume), fuse, generate
with and without an adapter, convert, --help of every subcommand, and one-line errors with a non-zero exit."""
import argparse, json, re, subprocess, sys
import numpy as np, pytest
from tinygrad import Tensor, dtypes, nn
import tinylora as tl
from tinylora.cli import _load_model, _parser, main
from tinylora.errors import LoraError
from tinylora import load_pretrained, load_tokenizer, save_pretrained
from tinylora.models import Model
from tinylora.quant import QuantizedLinear

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False)
TEXTS = ["the sky is blue", "grass is green", "the sun is yellow", "snow is white"]

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  path = tmp_path_factory.mktemp("model")
  Tensor.manual_seed(0)
  save_pretrained(Model.from_config(CONFIG), path)
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 20, trainer)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  return path

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("data")
  rows = [{"prompt": t.rsplit(" ", 1)[0] + " ", "completion": t.rsplit(" ", 1)[1]} for t in TEXTS]
  for name in ("train", "valid", "test"): (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path

TRAIN = ["--iters", "3", "--batch-size", "2", "--max-seq-length", "12", "--learning-rate", "1e-2", "--steps-per-eval", "3",
         "--save-every", "3", "--val-batches", "1"]

def run(capsys, *argv) -> tuple[int, str, str]:
  rc = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err

def test_train_generate_fuse_convert(capsys, tmp_path, model_dir, data_dir):
  adapters = tmp_path / "adapters"
  rc, out, err = run(capsys, "train", "--model", model_dir, "--data", data_dir, "--train", "--test", "--adapter-path", adapters,
                     "--rank", 4, "--alpha", 8, "--num-layers", 1, "--targets", "q_proj,v_proj", *TRAIN)
  assert rc == 0, err
  assert "saved the adapter" in out and "test loss" in out
  cfg = json.loads((adapters / "adapter_config.json").read_text())
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["layers_to_transform"] == [1] and cfg["use_dora"] is False
  assert (adapters / "checkpoints" / "latest.json").exists()
  model = tl.load_adapter(load_pretrained(model_dir), adapters)
  assert sorted(tl.lora_layers(model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

  # generate with the adapter equals the library's greedy generation
  from tinylora.generate import generate
  tok = load_tokenizer(model_dir)
  want = tok.decode(generate(model, tok.encode("the sky is"), 5, stop_tokens=[tok.eos_id]), skip_special_tokens=True)
  rc, out, _ = run(capsys, "generate", "--model", model_dir, "--adapter-path", adapters, "--prompt", "the sky is", "--max-tokens", 5)
  assert rc == 0 and out == want + "\n"
  rc, base_out, _ = run(capsys, "generate", "--model", model_dir, "--prompt", "the sky is", "--max-tokens", 5)
  assert rc == 0

  # fuse: a plain model whose logits are the adapter's
  rc, out, err = run(capsys, "fuse", "--model", model_dir, "--adapter-path", adapters, "--save-path", tmp_path / "fused")
  assert rc == 0, err
  tokens = Tensor([[5, 9, 33, 2]])
  np.testing.assert_allclose(load_pretrained(tmp_path / "fused")(tokens).numpy(), model(tokens).numpy(), rtol=1e-5, atol=1e-5)
  assert (tmp_path / "fused" / "tokenizer.json").exists()

  # convert to mlx-lm's format and back: the same tensors
  rc, out, err = run(capsys, "convert", "--model", model_dir, "--adapter-path", adapters, "--save-path", tmp_path / "mlx", "--format", "mlx")
  assert rc == 0 and json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["fine_tune_type"] == "lora", err
  again = tl.load_adapter(load_pretrained(model_dir), tmp_path / "mlx")
  np.testing.assert_allclose(again(tokens).numpy(), model(tokens).numpy(), rtol=1e-6, atol=1e-6)

  # resume from the run's checkpoints: continues at step 3 up to --iters 5
  rc, out, err = run(capsys, "train", "--model", model_dir, "--data", data_dir, "--train", "--adapter-path", tmp_path / "more",
                     "--resume-adapter-file", adapters / "checkpoints", *TRAIN[:-6], "--iters", 5)
  assert rc == 0 and "resumed at step 3" in out, err

def test_a_gguf_trains_packed_unless_dequantized_and_fuses_to_a_plain_model(capsys, tmp_path, model_dir, data_dir):
  gguf = tmp_path / "m.gguf"
  save_pretrained(load_pretrained(model_dir), gguf, format="gguf", quantization="q8_0", tokenizer=load_tokenizer(model_dir))
  packed, plain = _load_model(str(gguf)), _load_model(str(gguf), dequantize=True)
  assert all(isinstance(l.mlp.down_proj, QuantizedLinear) for l in packed.model.layers) and packed.dtype == dtypes.float32
  assert all(type(l.mlp.down_proj) is nn.Linear for l in plain.model.layers) and plain.dtype == dtypes.float32
  adapters = tmp_path / "adapters"
  rc, out, err = run(capsys, "train", "--model", gguf, "--data", data_dir, "--train", "--adapter-path", adapters, "--rank", 4, *TRAIN)
  assert rc == 0 and "saved the adapter" in out, err
  model = tl.load_adapter(packed, adapters)
  assert all(isinstance(l.base, QuantizedLinear) for l in tl.lora_layers(model).values())
  rc, out, err = run(capsys, "fuse", "--model", gguf, "--adapter-path", adapters, "--save-path", tmp_path / "fused", "--de-quantize")
  assert rc == 0, err
  assert "quantization" not in json.loads((tmp_path / "fused" / "config.json").read_text())  # plain: transformers loads it
  tokens = Tensor([[5, 9, 33, 2]])
  np.testing.assert_allclose(load_pretrained(tmp_path / "fused")(tokens).numpy(), model(tokens).numpy(), rtol=1e-5, atol=1e-5)

def test_dora_from_a_config_file_in_mlx_format(capsys, tmp_path, model_dir, data_dir):
  config = tmp_path / "config.json"
  config.write_text(json.dumps({"model": str(model_dir), "data": str(data_dir), "train": True, "fine_tune_type": "dora",
                                "num_layers": -1, "lora_parameters": {"rank": 2, "scale": 3.0, "keys": ["self_attn.o_proj"]},
                                "adapter_path": str(tmp_path / "a"), "format": "mlx", "iters": 50}))
  rc, out, err = run(capsys, "train", "-c", config, *TRAIN)  # the command line's --iters 3 wins over the file's 50
  assert rc == 0, err
  cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert cfg["fine_tune_type"] == "dora" and cfg["num_layers"] == 2
  assert cfg["lora_parameters"]["rank"] == 2 and cfg["lora_parameters"]["scale"] == 3.0 and cfg["lora_parameters"]["keys"] == ["self_attn.o_proj"]
  assert json.loads((tmp_path / "a" / "checkpoints" / "latest.json").read_text())["checkpoint"] == "step_000003"
  model = tl.load_adapter(load_pretrained(model_dir), tmp_path / "a")
  assert all(l.use_dora for l in tl.lora_layers(model).values()) and len(tl.lora_layers(model)) == 2

@pytest.mark.parametrize("argv, message", [
  (["train", "--model", "{model}", "--data", "{data}"], "nothing to do: pass --train"),
  (["train", "--data", "{data}", "--train"], "train needs --model"),
  (["train", "--model", "{tmp}/nope", "--data", "{data}", "--train"], "model not found: .*nope"),
  (["train", "--model", "{model}", "--data", "{tmp}", "--train"], "data file not found: .*train.jsonl"),
  (["train", "--model", "{model}", "--data", "{data}", "--train", "--targets", "qkv"], "matches no linear"),
  (["train", "-c", "{tmp}/bad.json"], r"unknown option\(s\) \['learning_rat'\]"),
  (["generate", "--model", "{model}", "--adapter-path", "{tmp}/none", "--prompt", "x"], "adapter directory not found"),
  (["convert", "--model", "{model}", "--adapter-path", "{tmp}", "--save-path", "{tmp}/o", "--format", "mlx"], "adapter_config.json"),
])
def test_errors_are_one_line_with_a_non_zero_exit(capsys, tmp_path, model_dir, data_dir, argv, message):
  (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1.0}))
  argv = [a.format(model=model_dir, data=data_dir, tmp=tmp_path) for a in argv]
  rc, out, err = run(capsys, *argv)
  assert rc == 1 and len(err.strip().splitlines()) == 1, err
  assert re.search(message, err), err
  assert not (tmp_path / "o").exists() and not (tmp_path / "adapters").exists()

def test_help_documents_every_flag_and_bad_flags_fail_in_one_line():
  for cmd in ("train", "fuse", "generate", "convert"):
    r = subprocess.run([sys.executable, "-m", "tinylora", cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--model" in r.stdout, r.stderr
  subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
  for cmd, sub in subparsers.items():
    assert all(a.help for a in sub._actions), f"{cmd}: undocumented {[a.option_strings for a in sub._actions if not a.help]}"
  r = subprocess.run([sys.executable, "-m", "tinylora", "train", "--rnak", "4"], capture_output=True, text=True)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--rnak" in r.stderr
  flags = subprocess.run([sys.executable, "-m", "tinylora", "train", "--help"], capture_output=True, text=True).stdout
  for f in ("--model", "--data", "--train", "--iters", "--batch-size", "--learning-rate", "--num-layers", "--adapter-path",
            "--max-seq-length", "--resume-adapter-file", "--grad-checkpoint", "--config", "--rank", "--alpha", "--targets",
            "--dora", "--format"):
    assert f in flags, f

def test_train_loss_on_assistant_replies_by_default(tmp_path):
  """`tinylora train` trains on the assistant replies, as the library and the example do; --loss-on picks, mlx-lm's
  --mask-prompt / --no-mask-prompt (and the config's mask_prompt) mean the last message / every token, and the command
  line wins over the config file."""
  from tinylora.cli import _train_args
  def parsed(*flags) -> str: return _train_args(_parser().parse_args(["train", "--model", "m", "--data", "d", "--train", *flags])).loss_on
  config = tmp_path / "c.json"
  config.write_text(json.dumps({"mask_prompt": False}))
  assert parsed() == "assistant" and parsed("--mask-prompt") == "last" and parsed("--no-mask-prompt") == "all"
  assert parsed("--loss-on", "last") == "last" and parsed("--loss-on", "all", "--mask-prompt") == "all"
  assert parsed("-c", str(config)) == "all" and parsed("-c", str(config), "--mask-prompt") == "last"
  config.write_text(json.dumps({"loss_on": "everything"}))
  with pytest.raises(LoraError, match="loss_on must be one of assistant, last, all"): parsed("-c", str(config))

def test_generate_on_a_gemma3_directory(capsys, tmp_path, model_dir):
  """Another family than llama (sandwich norms, q/k norms, a sliding layer) through `tinylora generate`: the library's
  greedy generation."""
  import shutil
  from tinylora.generate import generate
  cfg = dict(CONFIG, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16, query_pre_attn_scalar=16,
             sliding_window=4, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
  Tensor.manual_seed(1)
  save_pretrained(Model.from_config(cfg), tmp_path)
  for name in ("tokenizer.json", "tokenizer_config.json"): shutil.copy(model_dir / name, tmp_path / name)
  tok, model = load_tokenizer(tmp_path), load_pretrained(tmp_path)
  assert model.config.model_type == "gemma3_text"
  want = tok.decode(generate(model, tok.encode("the sky is"), 6, stop_tokens=[tok.eos_id]), skip_special_tokens=True)
  rc, out, err = run(capsys, "generate", "--model", tmp_path, "--prompt", "the sky is", "--max-tokens", 6)
  assert rc == 0 and out == want + "\n", err

def test_train_packed(capsys, tmp_path, model_dir, data_dir):
  """`tinylora train --pack`: packed training, validation and test batches (which the step's fixed shape requires)."""
  rc, out, err = run(capsys, "train", "--model", model_dir, "--data", data_dir, "--train", "--test", "--pack",
                     "--adapter-path", tmp_path / "adapters", *TRAIN)
  assert rc == 0, err
  assert "test loss" in out and (tmp_path / "adapters" / "adapter_config.json").exists()

@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_train_preference_modes(capsys, tmp_path, model_dir, mode):
  """`tinylora train --mode dpo|orpo` on TRL-style rows: trains, saves the adapter, and reports the reward margin and
  accuracy (and the test set's metrics)."""
  rows = [{"prompt": t.rsplit(" ", 1)[0] + " ", "chosen": t.rsplit(" ", 1)[1], "rejected": "red"} for t in TEXTS]
  for name in ("train", "valid", "test"): (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  rc, out, err = run(capsys, "train", "--model", model_dir, "--data", tmp_path, "--train", "--test", "--mode", mode,
                     "--adapter-path", tmp_path / "adapters", *TRAIN)
  assert rc == 0, err
  assert "reward margin" in out and "accuracy" in out and "rewards/margins" in out.splitlines()[-1]
  assert (tmp_path / "adapters" / "adapter_config.json").exists()

def test_optimizer_flags_and_mlx_optimizer_config(tmp_path):
  """--optimizer and --lr-schedule, and mlx-lm's optimizer_config ({name: {betas, eps, weight_decay}}) from -c: the
  chosen optimizer's entry becomes TrainConfig's optimizer_config and weight_decay; the command line wins."""
  from tinylora.cli import _optimizer_settings, _train_args
  from tinylora.train import TrainConfig
  config = tmp_path / "c.json"
  config.write_text(json.dumps({"optimizer": "adam", "lr_schedule": "linear",
                                "optimizer_config": {"adamw": {"betas": [0.9, 0.98], "weight_decay": 0.05}, "adam": {"eps": 1e-6}}}))
  def parsed(*flags): return _train_args(_parser().parse_args(["train", "--model", "m", "--data", "d", "--train", "-c", str(config), *flags]))
  a = parsed()
  assert (a.optimizer, a.lr_schedule) == ("adam", "linear") and _optimizer_settings(a.optimizer, a.optimizer_config) == {"optimizer_config": {"eps": 1e-6}}
  a = parsed("--optimizer", "adamw", "--lr-schedule", "constant")
  settings = _optimizer_settings(a.optimizer, a.optimizer_config)
  assert settings == {"optimizer_config": {"betas": [0.9, 0.98]}, "weight_decay": 0.05} and a.lr_schedule == "constant"
  assert TrainConfig(optimizer=a.optimizer, **settings).make_optimizer([Tensor.zeros(2, 2).contiguous()]).b2 == 0.98
  assert _optimizer_settings("sgd", {"momentum": 0.9}) == {"optimizer_config": {"momentum": 0.9}}
  with pytest.raises(SystemExit): _parser().parse_args(["train", "--optimizer", "lion"])
