"""`tinylora generate` streaming its tokens, `tinylora chat` (the multi-turn REPL), and `stream_generate` under them."""
import io, json
import numpy as np, pytest
from tinygrad import Tensor
from tinylora import save_pretrained
from tinylora.cli import main
from tinylora.errors import LoraError
from tinylora.generate import generate, stream_generate
from tinylora.models import Model

CONFIG = dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=300, rms_norm_eps=1e-5, max_position_embeddings=256,
              tie_word_embeddings=True)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
  pytest.importorskip("jinja2", reason="the optional 'jinja2' package is not installed")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  path = tmp_path_factory.mktemp("model")
  Tensor.manual_seed(0)
  save_pretrained(Model.from_config(CONFIG), path)
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the sky is blue", "grass is green", "user assistant system"] * 20, trainer)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
  return path

def test_stream_generate_yields_generates_tokens():
  Tensor.manual_seed(1)
  model = Model.from_config(CONFIG)
  stream = stream_generate(model, [5, 6, 7], 6)
  first = next(stream)  # a token is there before the rest are computed
  assert [first, *stream] == generate(model, [5, 6, 7], 6)
  sampled = list(stream_generate(model, [5, 6, 7], 6, temperature=1.0, seed=3))
  assert sampled == generate(model, [5, 6, 7], 6, temperature=1.0, seed=3)
  with pytest.raises(LoraError, match="temperature"): stream_generate(model, [1], 3, temperature=-1)  # checked at once

def test_generate_streams_to_stdout(capsys, model_dir, monkeypatch):
  from tinylora import load_pretrained, load_tokenizer
  written = []
  monkeypatch.setattr("sys.stdout", type("Out", (io.StringIO,), {"write": lambda self, s: written.append(s) or len(s)})())
  assert main(["generate", "--model", str(model_dir), "--prompt", "the sky", "--max-tokens", "8"]) == 0
  tok, model = load_tokenizer(model_dir), load_pretrained(model_dir)
  prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "the sky"}], add_generation_prompt=True))
  expected = tok.decode(generate(model, prompt, 8, stop_tokens=[tok.eos_id]), skip_special_tokens=True)
  assert "".join(written).rstrip("\n") == expected and len([w for w in written if w]) > 2  # printed in pieces

def test_chat_keeps_the_conversation(capsys, model_dir, monkeypatch):
  from tinylora import load_pretrained, load_tokenizer
  monkeypatch.setattr("sys.stdin", io.StringIO("the sky\n\ngrass\n/reset\ngrass\n/quit\nnever read\n"))
  assert main(["chat", "--model", str(model_dir), "--max-tokens", "5", "--system", "be blue"]) == 0
  replies = capsys.readouterr().out.replace("> ", "").splitlines()
  tok, model = load_tokenizer(model_dir), load_pretrained(model_dir)
  def answer(messages):
    ids = generate(model, tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)), 5, stop_tokens=[tok.eos_id])
    return tok.decode(ids, skip_special_tokens=True)
  system = [{"role": "system", "content": "be blue"}]
  first = answer(system + [{"role": "user", "content": "the sky"}])
  second = answer(system + [{"role": "user", "content": "the sky"}, {"role": "assistant", "content": first},
                            {"role": "user", "content": "grass"}])
  fresh = answer(system + [{"role": "user", "content": "grass"}])  # after /reset
  assert replies == [first, second, fresh]

def test_chat_needs_a_template(capsys, model_dir, tmp_path):
  import shutil
  shutil.copytree(model_dir, tmp_path / "m")
  (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  assert main(["chat", "--model", str(tmp_path / "m")]) == 1
  assert "no chat template" in capsys.readouterr().err
