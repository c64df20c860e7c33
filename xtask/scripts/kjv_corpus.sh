#!/usr/bin/env bash
# Writes the King James Bible (public domain) as plain prose, one chapter a paragraph, to $1.
# The text comes from Debian's `bible-kjv` / `bible-kjv-text` packages, so no network beyond the
# Debian archive is needed. Used to train the bundled model (see make_models.py).
set -euo pipefail
out=${1:?usage: kjv_corpus.sh OUT.txt}
if ! command -v bible >/dev/null; then
    apt-get update -qq && apt-get install -y -qq bible-kjv >/dev/null
fi
mkdir -p "$(dirname "$out")"
# -l0: no line wrapping. Verse lines look like "  12 And God said, ..."; chapter headers like "Genesis 1".
bible -l0 'Gen1:1-Rev22:21' | python3 -c '
import re, sys
paras, cur = [], []
for line in sys.stdin:
    line = line.rstrip("\n")
    m = re.match(r"^\s+\d+ (.*)$", line)
    if m:
        cur.append(m.group(1).strip())
    elif cur:
        paras.append(" ".join(cur)); cur = []
if cur:
    paras.append(" ".join(cur))
sys.stdout.write("\n".join(paras) + "\n")
' > "$out"
wc -c "$out"
