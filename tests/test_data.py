"""What the loss sees (`loss_on`): every assistant turn of a chat, found from the chat template's own renderings, on
SmolLM2's ChatML template and a SentencePiece-style [INST] template, with tools passed through; the last message only;
or every token. The masked spans must be exactly each assistant reply plus its end token."""
import json
import pytest
from tinylora import load_tokenizer
from tinylora.data import encode_example, make_batch
from tinylora.errors import LoraError
from tinylora.tokenizer import ByteTokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick fox"}, {"role": "user", "content": "brown fox?"},
        {"role": "assistant", "content": "hello"}]
# SmolLM2-135M-Instruct's template (ChatML with a default system prompt)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
           "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
# Mistral v0.1 / Llama 2 style: the reply follows "[/INST]" and ends with eos; no generation prompt of its own
INST = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
        "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
# ChatML with tools, tool calls and tool results, as Qwen-style templates render them
TOOLS = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}{% for m in messages %}"
         "<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}"
         "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

def trained_text(tok, tokens: list[int], weights: list[int]) -> list[str]:
  """The decoded runs of consecutive trained tokens."""
  runs, run = [], []
  for t, w in zip(tokens + [None], weights + [0]):
    if w: run.append(t)
    elif run: runs, run = runs + [tok.decode(run)], []
  return runs

def hf_tokenizer(tmp_path, template: str, sentencepiece: bool = False, eos: str = "<|im_end|>"):
  tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
  pytest.importorskip("jinja2", reason="the optional 'jinja2' package is not installed")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=sentencepiece))
  if sentencepiece:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    alphabet = []
  else:
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
  tok.train_from_iterator(["hello world", "the quick brown fox?", "Be brief.", "[INST] [/INST] system user assistant",
                           "Tools: get_weather city Paris", '{"name": "x"} tool_call'] * 20, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": eos, "chat_template": template}))
  return load_tokenizer(tmp_path)

def test_every_assistant_turn_is_the_default():
  tok = ByteTokenizer()
  tokens, weights = encode_example({"messages": CHAT}, tok)
  assert tokens == tok.encode(tok.apply_chat_template(CHAT))  # byte tokens: pieces join to the whole
  assert trained_text(tok, tokens, weights) == ["the quick fox<|eos|>", "hello<|eos|>"]
  assert trained_text(tok, *encode_example({"messages": CHAT}, tok, "last")) == ["hello<|eos|>"]
  assert encode_example({"messages": CHAT}, tok, "all") == (tokens, [1] * len(tokens))

def test_smollm2_template(tmp_path):
  tok = hf_tokenizer(tmp_path, SMOLLM2)
  tokens, weights = encode_example({"messages": CHAT}, tok)
  assert trained_text(tok, tokens, weights) == ["the quick fox<|im_end|>", "hello<|im_end|>"]
  assert tok.decode(tokens) == tok.apply_chat_template(CHAT)
  # each reply follows the tokens generation sees: its prompt rendered with the generation prompt, tokenized alone
  prompt = tok.encode(tok.apply_chat_template(CHAT[:2], add_generation_prompt=True))
  assert tokens[:len(prompt)] == prompt and weights[len(prompt) - 1:len(prompt) + 1] == [0, 1]
  # the batch's mask selects exactly those targets
  _, targets, mask = make_batch([(tokens, weights)], len(tokens) - 1)
  assert tok.decode(targets[0][mask[0] == 1].tolist()) == "the quick fox<|im_end|>hello<|im_end|>"
  assert trained_text(tok, *encode_example({"messages": CHAT}, tok, "last")) == ["hello<|im_end|>"]
  # the default system prompt the template adds is not trained either
  no_system = encode_example({"messages": CHAT[1:]}, tok)
  assert trained_text(tok, *no_system) == ["the quick fox<|im_end|>", "hello<|im_end|>"]

def test_sentencepiece_style_template(tmp_path):
  tok = hf_tokenizer(tmp_path, INST, sentencepiece=True, eos="</s>")
  chat = [m for m in CHAT if m["role"] != "system"]
  tokens, weights = encode_example({"messages": chat}, tok)
  runs, run = [], []
  for t, w in zip(tokens + [None], weights + [0]):
    if w: run.append(t)
    elif run: runs, run = runs + [run], []
  assert runs == [tok.encode("the quick fox</s>"), tok.encode("hello</s>")]  # each reply tokenized as generation makes it
  eos = tok.eos_id
  assert [t for t, w in zip(tokens, weights) if w].count(eos) == 2 and tokens.count(eos) == 2  # each reply's own end token

def test_tools_pass_through_the_template(tmp_path):
  tok = hf_tokenizer(tmp_path, TOOLS)
  tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": {"type": "string"}}}}]
  call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
  chat = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": None, "tool_calls": [call]},
          {"role": "tool", "content": "brown fox"}, {"role": "assistant", "content": "the quick fox"}]
  tokens, weights = encode_example({"messages": chat, "tools": tools}, tok)
  assert "get_weather" in tok.decode([t for t, w in zip(tokens, weights) if not w]).split("Tools:")[1]  # tools rendered, not trained
  assert trained_text(tok, tokens, weights) == ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
                                                "the quick fox<|im_end|>"]
  with pytest.raises(LoraError, match="'tools' must be a list"): encode_example({"messages": chat, "tools": "x"}, tok)
  with pytest.raises(LoraError, match="no place for tools"): encode_example({"messages": CHAT, "tools": tools}, ByteTokenizer())

def test_prompt_completion_and_text():
  tok = ByteTokenizer()
  tokens, weights = encode_example({"prompt": "ab", "completion": "cd"}, tok)
  assert tokens == [97, 98, 99, 100, tok.eos_id] and weights == [0, 0, 1, 1, 1]
  assert encode_example({"prompt": "ab", "completion": "cd"}, tok, "last") == (tokens, weights)
  assert encode_example({"prompt": "ab", "completion": "cd"}, tok, "all") == (tokens, [1] * 5)
  assert encode_example({"text": "ab"}, tok) == ([97, 98, tok.eos_id], [1, 1, 1])

def test_bad_chats(tmp_path):
  tok = ByteTokenizer()
  with pytest.raises(LoraError, match="no assistant message"): encode_example({"messages": CHAT[:2]}, tok)
  with pytest.raises(LoraError, match="loss_on must be one of"): encode_example({"messages": CHAT}, tok, "prompt")
  with pytest.raises(LoraError, match="message 1"): encode_example({"messages": [CHAT[1], {"role": "assistant"}]}, tok)
  silent = hf_tokenizer(tmp_path, "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}\n{% endif %}{% endfor %}")
  with pytest.raises(LoraError, match=r"message 2 \(assistant\) renders to no tokens"): encode_example({"messages": CHAT}, silent)
  # a template that renders the last turn differently (as reasoning templates do) cannot place an earlier turn
  marked = SMOLLM2.replace("message['content'] + '<|im_end|>'", "message['content'] + ('!' if loop.last else '') + '<|im_end|>'")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": marked}))
  marked_tok = load_tokenizer(tmp_path)
  with pytest.raises(LoraError, match="message 2: the chat template renders this turn differently"):
    encode_example({"messages": CHAT}, marked_tok)
  # the last turn alone is found by the tokens both renderings share (from where they first differ)
  (last,) = trained_text(marked_tok, *encode_example({"messages": CHAT}, marked_tok, "last"))
  assert last.endswith("<|im_start|>assistant\nhello!<|im_end|>\n") and "quick" not in last

def test_make_batch_checks_weights():
  with pytest.raises(LoraError, match="3 tokens but 2 loss weights"): make_batch([([1, 2, 3], [0, 1])], 4)
