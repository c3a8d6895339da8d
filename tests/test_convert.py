import json, subprocess, sys
import numpy as np, pytest
from tinygrad import Tensor
import tinylora as tl
from tinylora.convert import convert, main
from tinylora.models import Model, load_pretrained, save_pretrained

CFG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32}

def test_convert_peft_to_mlx_and_back(tmp_path):
  Tensor.manual_seed(0)
  save_pretrained(Model.from_config(CFG), tmp_path / "base")
  m = tl.inject(load_pretrained(tmp_path / "base"), tl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
  tokens = Tensor([[1, 5, 9, 3]])
  ref = m(tokens).numpy()
  tl.save_adapter(m, tmp_path / "peft")
  assert convert(tmp_path / "base", tmp_path / "peft", tmp_path / "mlx", "mlx") == "peft"
  assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0
  out = subprocess.run([sys.executable, "-m", "tinylora.convert", "--model", str(tmp_path / "base"), "--adapter",
                        str(tmp_path / "mlx"), "--to", "peft", "--out", str(tmp_path / "back")], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  back = tl.load_adapter(load_pretrained(tmp_path / "base"), tmp_path / "back")
  np.testing.assert_array_equal(back(tokens).numpy(), ref)

@pytest.mark.parametrize("args, message", [
  (lambda t: ["--model", str(t / "nowhere"), "--adapter", str(t / "peft"), "--to", "mlx", "--out", str(t / "o")],
   "model directory not found"),
  (lambda t: ["--model", str(t / "base"), "--adapter", str(t / "base"), "--to", "mlx", "--out", str(t / "o")],
   "adapter_config.json"),
  (lambda t: ["--model", str(t / "base"), "--adapter", str(t / "peft"), "--to", "mlx", "--out", str(t / "o")],
   "mlx-lm adapts the same keys in the last num_layers blocks"),
], ids=["no model", "not an adapter", "not expressible in mlx"])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
  Tensor.manual_seed(0)
  save_pretrained(Model.from_config(CFG), tmp_path / "base")
  m = tl.inject(load_pretrained(tmp_path / "base"), tl.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]))
  tl.save_adapter(m, tmp_path / "peft")
  assert main(args(tmp_path)) == 1
  err = capsys.readouterr().err
  assert err.startswith("python -m tinylora.convert: error: ") and message in err and len(err.splitlines()) == 1
  assert not (tmp_path / "o").exists()
