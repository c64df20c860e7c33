"""flexgen-serve through the real `openai` Python client (issue 21), driven by tests/openai.rs.

    openai_client.py BASE_URL basic            completions, chat, chat streamed
    openai_client.py BASE_URL submit N         uploads N batch lines, creates a batch, prints its id
    openai_client.py BASE_URL finish ID N      waits for the batch; every custom_id exactly once
    openai_client.py BASE_URL load N           N concurrent completions: all answered, none 5xx

Each phase prints one JSON line of what it saw and exits non-zero on a failed check.
"""

import asyncio
import io
import json
import sys
import time

import openai

MODEL = "opt-kjv"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def client(base):
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)


def basic(base):
    c = client(base)
    models = [m.id for m in c.models.list()]
    check(MODEL in models, f"{MODEL} listed in {models}")
    r = c.completions.create(model=MODEL, prompt=["In the beginning", "Jesus wept"],
                             max_tokens=8, temperature=0)
    check(len(r.choices) == 2 and all(ch.text for ch in r.choices), f"two completions: {r}")
    check(r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, f"usage: {r.usage}")
    chat = c.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                     messages=[{"role": "user", "content": "Who made light?"}])
    whole = chat.choices[0].message.content
    check(chat.choices[0].message.role == "assistant" and whole, f"chat: {chat}")
    chunks = list(c.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Who made light?"}]))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check(len(chunks) >= 2, f"several chunks: {len(chunks)}")
    check(streamed == whole, f"streamed text {streamed!r} equals the whole reply {whole!r}")
    print(json.dumps({"models": models, "completion": r.choices[0].text, "chat": whole,
                      "stream_chunks": len(chunks)}))


def submit(base, n):
    c = client(base)
    lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": MODEL, "prompt": f"Verse {i}: In the beginning",
                                  "max_tokens": 12, "temperature": 0}})
             for i in range(n)]
    f = c.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    check(b.status in ("validating", "in_progress"), f"a new batch: {b}")
    print(json.dumps({"file": f.id, "batch": b.id}))


def finish(base, batch_id, n):
    c = client(base)
    t0 = time.time()
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            break
        check(time.time() - t0 < 600, f"the batch finishes: {b}")
        time.sleep(0.5)
    check(b.status == "completed", f"completed: {b}")
    out = c.files.content(b.output_file_id).text
    ids = [json.loads(l)["custom_id"] for l in out.splitlines() if l.strip()]
    want = {f"line-{i}" for i in range(n)}
    check(len(ids) == n and set(ids) == want, f"{n} lines, every custom_id once: got {len(ids)}, "
          f"{len(set(ids))} distinct, missing {sorted(want - set(ids))[:5]}")
    check(b.request_counts.completed == n and b.request_counts.failed == 0,
          f"counts: {b.request_counts}")
    print(json.dumps({"batch": b.id, "lines": len(ids), "distinct": len(set(ids))}))


async def load(base, n):
    c = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
    statuses = {}

    async def one(i):
        try:
            r = await c.completions.create(model=MODEL, prompt=f"Psalm {i}", max_tokens=4,
                                           temperature=0)
            key = 200 if r.choices and r.choices[0].text is not None else "empty"
        except openai.APIStatusError as e:
            key = e.status_code
        except openai.APIConnectionError as e:
            key = f"connection: {e}"
        statuses[key] = statuses.get(key, 0) + 1

    t0 = time.time()
    await asyncio.gather(*(one(i) for i in range(n)))
    secs = time.time() - t0
    print(json.dumps({"requests": n, "statuses": {str(k): v for k, v in statuses.items()},
                      "seconds": round(secs, 2)}))
    check(statuses.get(200, 0) == n, f"all {n} answered 200: {statuses}")


def main():
    base, phase = sys.argv[1], sys.argv[2]
    if phase == "basic":
        basic(base)
    elif phase == "submit":
        submit(base, int(sys.argv[3]))
    elif phase == "finish":
        finish(base, sys.argv[3], int(sys.argv[4]))
    elif phase == "load":
        asyncio.run(load(base, int(sys.argv[3])))
    else:
        check(False, f"unknown phase {phase}")


if __name__ == "__main__":
    main()
