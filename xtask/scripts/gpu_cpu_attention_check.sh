# CPU attention deferred (k >= 2): tokens against the CPU executor, logits against transformers.
B=.gpu/bin; fail=0
for m in tiny-random-opt tiny-random-llama tiny-random-qwen2; do $B/executor_check crates/flexgen-model/test_data/$m | grep -E "CPU attention|within|exceed" ; done
for M in "crates/flexgen-model/models/opt-kjv" "crates/flexgen-model/test_data/tiny-random-qwen2"; do
  A="--model $M --max-new-tokens 16 --ignore-eos --prompt Hello --prompt 'the quick brown fox' --prompt a --prompt 'to be or not to be'"
  eval $B/flexgen-run $A > /tmp/ref.txt 2>/dev/null
  for pol in "100 0 0 100 100 0" "100 0 50 50 100 0" "0 100 25 75 100 0"; do for split in "2 2" "1 4" "4 1"; do set -- $split
    eval $B/flexgen-run $A --device cuda --percent $pol --cpu-cache-compute true --gpu-batch-size $1 --num-gpu-batches $2 > /tmp/g.txt 2>/tmp/g.err || { echo "FAIL $M $pol $split"; tail -2 /tmp/g.err; fail=1; continue; }
    cmp -s /tmp/ref.txt /tmp/g.txt && echo "OK $(basename $M) [$pol $split]" || { echo "DIFF $(basename $M) [$pol $split]"; fail=1; }
  done; done
done
echo "cpu attention check fail=$fail"
