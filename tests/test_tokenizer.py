"""The built-in byte tokenizer and HF tokenizer.json loading (skipped without the optional `tokenizers` package)."""
import json, sys
import pytest
from hypothesis import given, strategies as st
from tinylora.data import encode_example, make_batch
from tinylora.errors import LoraError
from tinylora import load_tokenizer
from tinylora.tokenizer import ByteTokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ü"}]

@given(st.text())
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  assert tok.decode(tok.encode(text)) == text  # special-token strings come back as themselves
  if not any(s in text for s in ByteTokenizer.SPECIALS): assert tok.encode(text) == list(text.encode())

def test_byte_ids_and_specials():
  tok = ByteTokenizer()
  assert tok.encode("aé") == [97, 0xC3, 0xA9]
  assert tok.encode("a", add_special_tokens=True) == [tok.bos_id, 97]
  assert tok.encode("x<|eos|><|pad|>") == [120, tok.eos_id, tok.pad_id]
  assert tok.decode([104, 105, tok.eos_id]) == "hi<|eos|>"
  assert tok.decode([104, 105, tok.eos_id], skip_special_tokens=True) == "hi"
  assert tok.decode([0xC3]) == "\ufffd"
  assert tok.vocab_size == 259 and len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
  with pytest.raises(LoraError, match="token id 300"): tok.decode([300])

def test_byte_chat_template():
  tok = ByteTokenizer()
  text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
  assert text == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi ü<|eos|>\n<|assistant|>\n"
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2 and tok.decode(ids) == text
  assert not tok.apply_chat_template(MESSAGES).endswith("<|assistant|>\n")
  with pytest.raises(LoraError, match="message 0"): tok.apply_chat_template([{"role": "user"}])

def test_missing_tokenizers_package_is_explained(tmp_path, monkeypatch):
  (tmp_path / "tokenizer.json").write_text("{}")
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match=r"pip install tinylora\[tokenizers\]"): load_tokenizer(tmp_path)

def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"): load_tokenizer(tmp_path)

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant', 'system'] %}"
                 "{{ raise_exception('unknown role ' + m.role) }}{% endif %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")

@pytest.fixture
def hf_dir(tmp_path):
  tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
  pytest.importorskip("jinja2", reason="the optional 'jinja2' package is not installed")
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["hello world", "the quick brown fox", "Be brief. Hi ü"] * 20, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
    "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}, "chat_template": CHAT_TEMPLATE}))
  return tmp_path

def test_hf_tokenizer(hf_dir):
  tok = load_tokenizer(hf_dir)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2) and tok.vocab_size >= 259
  ids = tok.encode("hello world ü")
  assert tok.bos_id not in ids and tok.decode(ids) == "hello world ü"
  assert tok.encode("hello", add_special_tokens=True)[0] == tok.bos_id
  assert tok.decode(tok.encode("hi</s>"), skip_special_tokens=True) == "hi"
  assert load_tokenizer(hf_dir / "tokenizer.json").encode("hello") == tok.encode("hello")

def test_hf_chat_template(hf_dir):
  tok = load_tokenizer(hf_dir)
  text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
  assert text == "<s>[system] Be brief.</s>\n[user] Hi ü</s>\n[assistant] "
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2
  with pytest.raises(LoraError, match="unknown role tool"): tok.apply_chat_template([{"role": "tool", "content": "x"}])

def test_hf_tokenizer_without_chat_template(hf_dir):
  (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<unk>"}))
  tok = load_tokenizer(hf_dir)
  assert tok.bos_id is None and tok.eos_id == 2 and tok.pad_id == 0
  with pytest.raises(LoraError, match="no chat_template"): tok.apply_chat_template(MESSAGES)

def test_chat_prompt_masking_with_a_bpe_tokenizer(hf_dir):
  """The generation prompt ends in a space that BPE would merge into the reply's first word: the example is the
  prompt's tokens then the reply's (as generation sees them), and exactly the prompt's tokens are masked."""
  tok = load_tokenizer(hf_dir)
  chat = MESSAGES + [{"role": "assistant", "content": "brown fox"}]
  prompt_text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
  full_text = tok.apply_chat_template(chat)
  assert full_text.startswith(prompt_text) and prompt_text.endswith(" ")
  prompt, whole = tok.encode(prompt_text), tok.encode(full_text)
  assert whole[:len(prompt)] != prompt  # tokenized whole, the prompt's last token would not be the prompt's
  tokens, weights = encode_example({"messages": chat}, tok)
  n = weights.index(1)
  assert n == len(prompt) and tokens[:n] == prompt
  assert tok.decode(tokens[n:]) == "brown fox</s>\n"
  _, targets, mask = make_batch([(tokens, weights)], len(tokens) - 1)
  assert tok.decode(targets[0][mask[0] == 1].tolist()) == "brown fox</s>"  # the loss sees the reply and its end, nothing else
  assert encode_example({"messages": chat}, tok, "all") == (whole, [1] * len(whole))

def test_chat_template_whose_conversation_does_not_start_with_its_prompt(hf_dir):
  """A template may render past turns differently from the prompt (e.g. dropping reasoning): the conversation is then
  tokenized whole and the prompt is the tokens the two renderings share."""
  config = json.loads((hf_dir / "tokenizer_config.json").read_text())
  config["chat_template"] = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}[assistant] {% endif %}",
                                                  "{% if add_generation_prompt %}[assistant]: {% endif %}")
  (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
  tok = load_tokenizer(hf_dir)
  chat = MESSAGES + [{"role": "assistant", "content": "hello"}]
  whole, prompt = tok.encode(tok.apply_chat_template(chat)), tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True))
  tokens, weights = encode_example({"messages": chat}, tok)
  n = weights.index(1)
  assert tokens == whole and tokens[:n] == prompt[:n] and n < len(prompt) and tokens[n] != prompt[n]
