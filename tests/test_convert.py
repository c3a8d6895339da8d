"""`tinylora convert`, the one converter: an adapter loaded onto its base model (every tensor checked) and saved in
another format, and errors as one line."""
import json, subprocess, sys
import numpy as np, pytest
from tinygrad import Tensor
import tinylora as tl
from tinylora import load_pretrained, save_pretrained
from tinylora.cli import main
from tinylora.models import Model

CFG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32}

def test_convert_peft_to_mlx_and_back(tmp_path, capsys):
  Tensor.manual_seed(0)
  save_pretrained(Model.from_config(CFG), tmp_path / "base")
  m = tl.inject(load_pretrained(tmp_path / "base"), tl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
  tokens = Tensor([[1, 5, 9, 3]])
  ref = m(tokens).numpy()
  tl.save_adapter(m, tmp_path / "peft")
  assert main(["convert", "--model", str(tmp_path / "base"), "--adapter-path", str(tmp_path / "peft"), "--save-path",
               str(tmp_path / "mlx"), "--format", "mlx"]) == 0
  assert "(peft) ->" in capsys.readouterr().out
  assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0
  out = subprocess.run([sys.executable, "-m", "tinylora", "convert", "--model", str(tmp_path / "base"), "--adapter-path",
                        str(tmp_path / "mlx"), "--format", "peft", "--save-path", str(tmp_path / "back")],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  back = tl.load_adapter(load_pretrained(tmp_path / "base"), tmp_path / "back")
  np.testing.assert_array_equal(back(tokens).numpy(), ref)

def test_convert_a_llama_cpp_adapter_to_peft(tmp_path, capsys):
  """A .gguf adapter is detected as llama.cpp's (here tinylora's own, ranks that differ folded into B) and converts."""
  Tensor.manual_seed(0)
  save_pretrained(Model.from_config(CFG), tmp_path / "base")
  m = tl.inject(load_pretrained(tmp_path / "base"), tl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                                  rank_pattern={"down_proj": 2}, init_lora_weights=False))
  tokens = Tensor([[1, 5, 9, 3]])
  ref = m(tokens).numpy()
  tl.save_adapter(m, tmp_path / "a.gguf", format="gguf")
  assert main(["convert", "--model", str(tmp_path / "base"), "--adapter-path", str(tmp_path / "a.gguf"), "--save-path",
               str(tmp_path / "peft"), "--format", "peft"]) == 0
  assert "(gguf) ->" in capsys.readouterr().out
  back = tl.load_adapter(load_pretrained(tmp_path / "base"), tmp_path / "peft")
  np.testing.assert_allclose(back(tokens).numpy(), ref, atol=1e-5)

@pytest.mark.parametrize("args, message", [
  (lambda t: ["--model", str(t / "nowhere"), "--adapter-path", str(t / "peft"), "--format", "mlx", "--save-path", str(t / "o")],
   "model not found"),
  (lambda t: ["--model", str(t / "base"), "--adapter-path", str(t / "base"), "--format", "mlx", "--save-path", str(t / "o")],
   "adapter_config.json"),
  (lambda t: ["--model", str(t / "base"), "--adapter-path", str(t / "peft"), "--format", "mlx", "--save-path", str(t / "o")],
   "mlx-lm adapts the same keys in the last num_layers blocks"),
], ids=["no model", "not an adapter", "not expressible in mlx"])
def test_errors_are_one_line(tmp_path, capsys, args, message):
  Tensor.manual_seed(0)
  save_pretrained(Model.from_config(CFG), tmp_path / "base")
  m = tl.inject(load_pretrained(tmp_path / "base"), tl.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]))
  tl.save_adapter(m, tmp_path / "peft")
  assert main(["convert", *args(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("tinylora convert: error: ") and message in err and len(err.splitlines()) == 1
  assert not (tmp_path / "o").exists()

def test_format_choices_come_from_the_registry(capsys):
  with pytest.raises(SystemExit): main(["convert", "--model", "m", "--adapter-path", "a", "--save-path", "o", "--format", "onnx"])
  assert "choose from 'peft', 'mlx', 'gguf'" in capsys.readouterr().err
