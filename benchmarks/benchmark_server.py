"""Throughput of the challenge server under HELM-like load, against the same server taking one request at a time.

    # a running server (e.g. the Docker image)
    python benchmarks/benchmark_server.py --url http://localhost:8080
    # in process: a random-weight model of a registered config on the GPU (no checkpoint has to travel)
    python benchmarks/benchmark_server.py --random_model Mistral-7B-v0.1 --precision bf16
    # in process: a real checkpoint
    python benchmarks/benchmark_server.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    # against the hardware's bounds and transformers' fastest generation, one table: benchmarks/serve_table.py

Four measurements, each over HTTP (in process: uvicorn on a free local port):
- scoring: `requests` 1-token greedy requests (HELM's MMLU shape) with distinct prompts, then with prompts that share
  a few-shot prefix (as one MMLU subject does): requests/s one at a time vs all at once.
- generation: `requests` 128-token greedy generations: generated tokens/s one at a time vs all at once.
Prints one JSON line per measurement and a Markdown table (written to --out too).
"""

import asyncio
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

from jsonargparse.typing import PositiveInt
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def random_checkpoint(name: str, folder: Path, n_layer: Optional[int] = None) -> Path:
    """model_config.json + a word-level tokenizer with exactly vocab_size entries ('▁w0' ...), so any id the random
    model emits decodes; the weights are made on the device by `build_random_model` (nothing written to disk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from model import Config

    config = Config.from_name(name, **({"n_layer": n_layer} if n_layer else {}))
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json(folder / "model_config.json")
    vocab = {f"\u2581w{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="\u2581w0"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))  # no EOS: full-length outputs
    return folder


def build_random_model(folder: Path, device: str, dtype):
    import torch

    from model import GPT, Config

    config = Config.from_json(folder / "model_config.json")
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)  # norms
        for name, b in model.named_parameters():
            if name.endswith(".bias"):
                b.zero_()
    return model.eval()


def start_server(service):
    import uvicorn

    from generate.server import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the in-process server did not start")
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}", server, thread


async def timed(url: str, bodies, concurrent: bool) -> tuple:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        async def one(body):
            r = await client.post("/process", json=body)
            r.raise_for_status()
            return r.json()

        t0 = time.perf_counter()
        if concurrent:
            out = await asyncio.gather(*(one(b) for b in bodies))
        else:
            out = [await one(b) for b in bodies]
        return time.perf_counter() - t0, out


def words(rng, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(n))


def main(
    url: Optional[str] = None,
    checkpoint_dir: Optional[str] = None,
    random_model: Optional[str] = None,
    n_layer: Optional[int] = None,
    precision: str = "auto",
    device: str = "auto",
    requests: int = 30,
    sequential_requests: Optional[int] = None,
    prompt_words: int = 512,
    shared_prefix_words: int = 450,
    generation_prompt_words: int = 128,
    new_tokens: int = 128,
    max_batch_size: int = 32,
    decode: str = "auto",
    repeats: PositiveInt = 3,
    out: str = "out/benchmark_server.md",
) -> list:
    """Measure requests/s (1-token scoring) and tokens/s (128-token generation), concurrent vs one at a time.

    Args:
        url: a running server; otherwise one is started in process from --checkpoint_dir or --random_model.
        checkpoint_dir: in process: a checkpoint folder or registered name.
        random_model: in process: random weights of this registered config (e.g. Mistral-7B-v0.1, SmolLM2-135M), built
            on the device, with a word-level stand-in tokenizer of the same vocabulary size.
        n_layer: with --random_model: fewer layers (quick checks).
        precision: in process: bf16, fp16, fp32 or auto (bf16 on a GPU).
        device: in process: cuda, cpu or auto.
        requests: requests sent at once (HELM uses 30).
        sequential_requests: how many of them to time one at a time (default: all); rates are per request/token.
        prompt_words: scoring prompt length in words (random words; about one token each with real tokenizers).
        shared_prefix_words: of those, how many every scoring prompt shares in the shared-prefix measurement.
        generation_prompt_words: generation prompt length in words.
        new_tokens: tokens per generation (no stop: random models run to the limit).
        max_batch_size: in process: the engine's slots / rows per batch.
        decode: in process: the engine's decode step (auto, eager, static, graphs, compiled; see generate/engine.py).
        repeats: runs of each measurement; the table gives the median and the range (how 30 concurrent requests fall
            into batches depends on when each arrives, so single runs move).
        out: Markdown table destination.
    """
    import torch

    from generate.base import pick_device
    from generate.engine import Engine
    from generate.server import Service, load_service
    from tokenizer import Tokenizer

    server = thread = None
    if url is None:
        dev = pick_device(device)
        if precision == "auto":
            precision = "bf16" if dev == "cuda" else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        t0 = time.perf_counter()
        if random_model:
            folder = random_checkpoint(random_model, Path(tempfile.mkdtemp()) / "random", n_layer)
            model = build_random_model(folder, dev, dtype)
            engine = Engine(model, Tokenizer(folder), max_seq_length=2048, max_batch_size=max_batch_size,
                            decode=decode)
            service = Service(engine, None, name=f"{random_model} (random weights)")
        elif checkpoint_dir:
            service = load_service(checkpoint_dir, precision=precision, device=dev, max_batch_size=max_batch_size,
                                   decode=decode)
        else:
            raise SystemExit("give --url, --checkpoint_dir or --random_model")
        print(f"model ready in {time.perf_counter() - t0:.1f}s on {dev} ({precision})", file=sys.stderr)
        url, server, thread = start_server(service)
        label = service.name
        device_name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        vocab = service.tokenizer.vocab_size
    else:
        import httpx

        health = httpx.get(url.rstrip("/") + "/health", timeout=30).json()
        label, device_name, vocab = health.get("model", url), "remote", 1000
    rng = random.Random(0)
    n_seq = sequential_requests or requests
    distinct = [{"prompt": words(rng, prompt_words, vocab), "max_new_tokens": 1, "temperature": 0} for _ in range(requests)]
    prefix = words(rng, shared_prefix_words, vocab)
    shared = [{"prompt": prefix + " " + words(rng, prompt_words - shared_prefix_words, vocab), "max_new_tokens": 1,
               "temperature": 0} for _ in range(requests)]
    gen = [{"prompt": words(rng, generation_prompt_words, vocab), "max_new_tokens": new_tokens, "temperature": 0}
           for _ in range(requests)]
    rows = []
    try:
        asyncio.run(timed(url, distinct[:2] + gen[:2], True))  # warm-up: kernels, caches, both code paths
        for kind, bodies in (("scoring, distinct prompts", distinct), ("scoring, shared 5-shot-like prefix", shared),
                             ("generation, %d new tokens" % new_tokens, gen)):
            unit = "tokens/s" if kind.startswith("generation") else "requests/s"
            rates = {}
            for concurrent in (False, True):
                runs = [asyncio.run(timed(url, bodies if concurrent else bodies[:n_seq], concurrent))
                        for _ in range(repeats)]
                rates[concurrent] = sorted((sum(len(o["tokens"]) for o in out) if unit == "tokens/s" else len(out)) / t
                                           for t, out in runs)
                outputs = runs[0][1]
                if not concurrent:
                    seq_out = outputs
            same = all(a["text"] == b["text"] for a, b in zip(seq_out, outputs))  # greedy: batching changes nothing
            seq_rate, con_rate = median(rates[False]), median(rates[True])
            row = {"measurement": kind, "unit": unit, "one_at_a_time": round(seq_rate, 2),
                   f"{requests}_concurrent": round(con_rate, 2), "speedup": round(con_rate / seq_rate, 2),
                   "one_at_a_time_range": [round(rates[False][0], 2), round(rates[False][-1], 2)],
                   "concurrent_range": [round(rates[True][0], 2), round(rates[True][-1], 2)],
                   "same_outputs": same, "model": label, "device": device_name}
            if torch.cuda.is_available() and server is not None:
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            print(json.dumps(row))
            rows.append(row)
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=30)
    table = [f"Server throughput: {label} on {device_name}; {requests} concurrent requests vs one at a time "
             f"({n_seq} timed), prompts {prompt_words} words (generation {generation_prompt_words}); the median of "
             f"{repeats} runs each (range in brackets).", "",
             "| measurement | unit | one at a time | %d concurrent | speedup | same outputs |" % requests,
             "|---|---|---|---|---|---|"]
    for r in rows:
        (a, b), (c, d) = r["one_at_a_time_range"], r["concurrent_range"]
        table.append(f"| {r['measurement']} | {r['unit']} | {r['one_at_a_time']} ({a}-{b}) | "
                     f"{r[f'{requests}_concurrent']} ({c}-{d}) | {r['speedup']}x | {r['same_outputs']} |")
    text = "\n".join(table) + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
