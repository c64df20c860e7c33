#!/bin/bash
# On the GPU machine (issue 21): flexgen-serve's batch API and online chat on the block schedule.
#   batch  a 2,000-line job (make_jobs.py: prompts 64-512 tokens, max_new 16-128, a third greedy,
#          a third sampled, a third with stop strings) on OPT-6.7B dummy weights with the bundled
#          tokenizer, all on the GPU (S4, 64x1): `flexgen-run batch` on the job, then the same
#          lines uploaded to flexgen-serve through /v1/files and /v1/batches; generated tokens/s of
#          each (the server's from the batch's start to its completion) and their ratio (goal >= 0.9).
#   chat   64 concurrent streaming chat clients on OPT-30B with 4-bit weights on the CPU (S1c,
#          32x2): tokens/s, time to first token, and the block fill the server reports.
# Usage: OUT=DIR gpu_serve.sh batch|chat [BIN_DIR]     (default BIN_DIR .gpu/bin)
# To try it without a GPU: DEVICE=cpu ARGS="--model crates/flexgen-model/models/opt-kjv …" N=40.
B=${2:-.gpu/bin}; OUT=${OUT:-/tmp/serve}; mkdir -p "$OUT"
KJV=crates/flexgen-model/models/opt-kjv
PORT=8765
start_server() { # args…: starts flexgen-serve, waits until /health answers
  "$B/flexgen-serve" --port $PORT --device ${DEVICE:-cuda} "$@" > "$OUT/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 600); do
    curl -sf localhost:$PORT/health > /dev/null && return 0
    kill -0 $SERVER 2>/dev/null || { echo "server died:"; tail -5 "$OUT/server.log"; return 1; }
    sleep 0.5
  done
  echo "server not up after 300 s"; return 1
}
case "$1" in
batch)
  S4=${ARGS:-"--model opt-6.7b --dummy random --tokenizer $KJV --percent 100 0 100 0 100 0 --gpu-batch-size 64 --num-gpu-batches 1"}
  python3 xtask/scripts/make_jobs.py $KJV/tokenizer.json ${N:-2000} "$OUT/job.jsonl" --seed 1 $JOB_ARGS | tee "$OUT/job.shape"
  python3 - "$OUT/job.jsonl" "$OUT/openai.jsonl" <<'PY'
import json, sys
with open(sys.argv[2], "w") as out:
    for l in open(sys.argv[1]):
        r = json.loads(l)
        body = {"model": "opt-6.7b", "prompt": r["prompt"], "max_tokens": r["max_new_tokens"],
                "temperature": r.get("temperature", 0)}
        if "stop" in r:
            body["stop"] = r["stop"]
        out.write(json.dumps({"custom_id": r["id"], "method": "POST", "url": "/v1/completions",
                              "body": body}) + "\n")
PY
  echo "=== flexgen-run batch"
  rm -f "$OUT/run.out"
  "$B/flexgen-run" batch $S4 --device ${DEVICE:-cuda} --input "$OUT/job.jsonl" --output "$OUT/run.out" --seed 3 -q 2>&1 | tee "$OUT/run.log" | grep -E "generation:|tok" | tail -3
  echo "=== flexgen-serve batch API"
  start_server $S4 --state-dir "$OUT/state" --batch-wait-ms 50 --max-prompt-tokens ${MAX_PROMPT:-600} --max-tokens-limit 128 || exit 1
  python3 - localhost:$PORT "$OUT/openai.jsonl" "$OUT/run.log" <<'PY'
import json, re, sys, time, urllib.request
base, path = "http://" + sys.argv[1], sys.argv[2]
def req(method, url, body=None, ctype="application/json"):
    r = urllib.request.Request(base + url, data=body, method=method, headers={"Content-Type": ctype})
    with urllib.request.urlopen(r, timeout=600) as resp:
        return resp.read()
data = open(path, "rb").read()
b = "----flexgen"
form = (f"--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"job.jsonl\"\r\n"
        "Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
f = json.loads(req("POST", "/v1/files", form, f"multipart/form-data; boundary={b}"))
t0 = time.time()
bt = json.loads(req("POST", "/v1/batches", json.dumps({"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"}).encode()))
while bt["status"] not in ("completed", "failed", "cancelled"):
    time.sleep(0.1)
    bt = json.loads(req("GET", "/v1/batches/" + bt["id"]))
secs = time.time() - t0
out = [json.loads(l) for l in req("GET", f"/v1/files/{bt['output_file_id']}/content").decode().splitlines() if l.strip()]
tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
ids = {o["custom_id"] for o in out}
serve_tps = tokens / secs
m = re.search(r"([\d.]+) generated tokens/s while generating", open(sys.argv[3]).read())
run_tps = float(m.group(1)) if m else float("nan")
print(f"serve batch: {bt['status']}, {len(out)} lines, {len(ids)} ids, {tokens} generated tokens in {secs:.1f} s: {serve_tps:.1f} tok/s")
print(f"flexgen-run batch: {run_tps:.1f} generated tok/s while generating; serve/run ratio {serve_tps / run_tps:.3f} (goal >= 0.9)")
PY
  curl -s localhost:$PORT/metrics | grep -E "^flexgen_" | head -20
  kill $SERVER; wait $SERVER 2>/dev/null
  ;;
chat)
  # A word-level tokenizer over the whole vocabulary (t0 … t50271), so that every token of the
  # dummy model prints text (the bundled tokenizer has 4,096 tokens).
  python3 - "$OUT/wordlevel" <<'PY'
import os, sys
from tokenizers import Tokenizer, models, pre_tokenizers
os.makedirs(sys.argv[1], exist_ok=True)
t = Tokenizer(models.WordLevel({f"t{i}": i for i in range(50272)}, unk_token="t3"))
t.pre_tokenizer = pre_tokenizers.Whitespace()
t.save(os.path.join(sys.argv[1], "tokenizer.json"))
PY
  S1C=${ARGS:-"--model opt-30b --dummy random --tokenizer $OUT/wordlevel/tokenizer.json --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --compress-weight"}
  start_server $S1C --batch-wait-ms ${WAIT_MS:-500} --max-queue 1000 --max-prompt-tokens 128 --max-tokens-limit 32 || exit 1
  python3 - localhost:$PORT ${CLIENTS:-64} <<'PY'
import http.client, json, sys, threading, time
host, port = sys.argv[1].split(":"); n = int(sys.argv[2])
res = [None] * n
go = threading.Barrier(n)
def client(i):
    go.wait()
    t0 = time.time()
    c = http.client.HTTPConnection(host, int(port), timeout=900)
    body = {"model": "opt-30b", "stream": True, "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell me about verse {i} of the book of Genesis."}]}
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    first = None; pieces = 0; status = r.status
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        d = json.loads(line[6:])
        if "error" in d:
            status = "error"; break
        if d["choices"][0]["delta"].get("content"):
            pieces += 1
            if first is None:
                first = time.time() - t0
    res[i] = (status, first, pieces, time.time() - t0)
ts = [threading.Thread(target=client, args=(i,)) for i in range(n)]
t0 = time.time()
[t.start() for t in ts]; [t.join() for t in ts]
wall = time.time() - t0
ok = [r for r in res if r and r[0] == 200 and r[1] is not None]
ttft = sorted(r[1] for r in ok)
pieces = sum(r[2] for r in ok)
print(f"chat: {len(ok)}/{n} clients streamed; {pieces} text chunks in {wall:.1f} s: {pieces / wall:.1f} chunks/s")
if ttft:
    print(f"time to first token: median {ttft[len(ttft)//2]:.2f} s, p90 {ttft[int(len(ttft)*0.9)]:.2f} s, max {ttft[-1]:.2f} s")
PY
  curl -s localhost:$PORT/metrics | grep -E "^flexgen_" | head -20
  kill $SERVER; wait $SERVER 2>/dev/null
  ;;
*) echo "usage: OUT=DIR $0 batch|chat [BIN_DIR]"; exit 2 ;;
esac
