"""Send the requests HELM sends to two servers and check that they answer the same (docker/check_images.sh).

    python3 docker/compare_servers.py http://127.0.0.1:18080 http://127.0.0.1:18081 [--any_finish]

The first URL is the reference (the server run outside Docker), the second the one under test (the image). Each
request must succeed on both; deterministic ones (greedy, or sampled with a seed) must give the same JSON, apart from
request_time. The stop-sequence requests must also stop where SmolLM2-135M-Instruct stops (--any_finish: another
model). Standard library only: it runs on any host Python.
"""

import argparse
import json
import urllib.error
import urllib.request

GREEDY = 1e-7  # what HELM sends for temperature 0
PASSAGE = ("But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, fair "
           "sun, and kill the envious moon, who is already sick and pale with grief.")
MMLU = ("The following are multiple choice questions (with answers) about astronomy.\n\nWhich star is closest to "
        "Earth?\nA. Sirius\nB. Vega\nC. The Sun\nD. Polaris\nAnswer: C\n\nWhich planet is the largest?\nA. Mars\n"
        "B. Jupiter\nC. Venus\nD. Mercury\nAnswer:")


def helm(prompt: str, max_new_tokens: int, stop: list, echo: bool = False, top_k_per_token: int = 5) -> dict:
    """A /process body as HELM's client writes it (greedy)."""
    return {"prompt": prompt, "temperature": GREEDY, "num_return_sequences": 1, "max_new_tokens": max_new_tokens,
            "top_p": 1, "echo_prompt": echo, "top_k_per_token": top_k_per_token, "stop_sequences": stop}


# (name, path, body, compare the answers?, the finish_reason SmolLM2-135M-Instruct gives, so the stop cases stop)
REQUESTS = [
    # the organisers' own check before a run: sampled without a seed, so only its shape is checked
    ("organisers' check", "/process", {"prompt": "The capital of France is "}, False, None),
    # multiple choice as HELM scores it: the answer echoed with its logprobs and no new token, or one token
    ("echo, 0 new tokens", "/process", helm("Question: What is the capital of France?\nAnswer: Paris", 0, [], True),
     True, "length"),
    ("MMLU 1 token, stop \\n", "/process", helm(MMLU, 1, ["\n"]), True, "length"),
    ("stop \\n", "/process", helm("The capital of France is ", 40, ["\n"]), True, "stop"),
    ("stop '.'", "/process", helm("The sea is", 60, ["."], top_k_per_token=2), True, "stop"),
    ("GSM8K-style, stop \\n\\n", "/process",
     helm("Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:", 400, ["\n\n"],
          top_k_per_token=1), True, "stop"),
    ("sampled with a seed", "/process",
     {"prompt": "Once upon a time", "temperature": 0.7, "max_new_tokens": 16, "top_k": 50, "seed": 1234}, True, None),
    ("tokenize with truncation", "/tokenize", {"text": PASSAGE, "truncation": True, "max_length": 16}, True, None),
    ("tokenize without", "/tokenize", {"text": PASSAGE, "truncation": False}, True, None),
]


def call(base: str, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k != "request_time"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def first_difference(a, b, where="$"):
    if type(a) is not type(b):
        return f"{where}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}.{key}: only in {'the reference' if key in a else 'the image'}"
            found = first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
    elif isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
    elif a != b:
        return f"{where}: {a!r} != {b!r}"
    return None


def sane(path: str, body: dict, answer: dict) -> str:
    """What must hold of an answer whatever the reference says, so two broken servers never look equal."""
    if path == "/tokenize":
        limit = body["max_length"] if body.get("truncation") else None
        tokens = answer.get("tokens") or []
        ok = tokens and (limit is None or len(tokens) == limit)
        return "" if ok else f"{len(tokens)} tokens (max_length {limit})"
    if not isinstance(answer.get("text"), str) or not all("top_logprob" in t for t in answer.get("tokens", [])):
        return "no text, or a token without top_logprob"
    if body.get("echo_prompt") and not answer["text"].startswith(body["prompt"]):
        return "the echoed text does not start with the prompt"
    if any(s and s in answer["text"] for s in body.get("stop_sequences") or []):
        return "a stop sequence was left in the text"
    return ""


def main(reference: str, image: str, any_finish: bool = False) -> int:
    failures = 0

    def report(ok: bool, name: str, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"  {'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")

    def both(method: str, path: str, body=None):
        (status_a, a), (status_b, b) = call(reference, method, path, body), call(image, method, path, body)
        if status_a != 200 or status_b != 200:
            return None, None, f"HTTP {status_a} (reference), {status_b} (image): {str(a)[:200]} / {str(b)[:200]}"
        return a, b, None

    for name, path, body, compare, finish in REQUESTS:
        a, b, problem = both("POST", path, body)
        if not problem:
            problem = sane(path, body, b) or sane(path, body, a)
        if not problem and finish and not any_finish and a.get("finish_reason") != finish:
            problem = f"finish_reason {a.get('finish_reason')!r}, not {finish!r}: the request no longer tests its case"
        if not problem and compare:
            problem = first_difference(without_times(a), without_times(b))
        shown = f"{a.get('finish_reason', '')} {json.dumps(a.get('text', a.get('tokens')))[:60]}".strip() if a else ""
        report(not problem, name, problem or shown)
        if name == "tokenize with truncation" and a:  # then /decode of those ids, as HELM's truncation loop does
            da, db, problem = both("POST", "/decode", {"tokens": a["tokens"]})
            if not problem:
                problem = first_difference(without_times(da), without_times(db))
            if not problem and not (da["text"].strip() and PASSAGE.startswith(da["text"].strip())):
                problem = f"{da['text']!r} does not begin the passage"
            report(not problem, "decode", problem or json.dumps(da["text"])[:60])
    a, b, problem = both("GET", "/health")
    if not problem:  # the work counters depend on the length of the unseeded sample; the rest must agree
        work = ("decode_steps", "prefills", "scoring_batches")
        problem = first_difference(*({k: v for k, v in h.items() if k not in work} for h in (a, b)))
        problem = problem or ("" if a["status"] == "ok" else f"status {a['status']!r}")
    report(not problem, "health", problem or "")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference")
    parser.add_argument("image")
    parser.add_argument("--any_finish", action="store_true")
    args = parser.parse_args()
    raise SystemExit(main(args.reference, args.image, args.any_finish))
