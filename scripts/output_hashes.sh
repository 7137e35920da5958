#!/usr/bin/env bash
# Fingerprints of every output rtnq writes, to prove a refactor changed no byte:
#   bash scripts/output_hashes.sh .venv/bin/rtnq .venv/bin/python before.txt   # on the old tree
#   bash scripts/output_hashes.sh .venv/bin/rtnq .venv/bin/python after.txt    # on the new tree
#   diff before.txt after.txt
# Converts the built-in sample, an odd fp16 two-shard sample and the 2.2 GB benchmark shape (22 layers,
# 3 shards; cached under bench-cache/hashes-src) in every format with several selections, dequantizes
# two of them, and prints per file "name sha256[:16] norm=...". `norm` is the hash with the manifest
# version taken out of shard metadata and config.json (for comparing across a deliberate version bump);
# the manifest itself is compared after normalizing its version and kind names.
set -euo pipefail
# Absolute paths: the loop below runs commands from inside each output directory.
RTNQ=$(realpath "$1"); PY=$(realpath -s "$2"); OUTF=$(realpath "$3")
S=$(realpath -m "${RTNQ_HASHES_SRC:-bench-cache/hashes-src}"); W=$(mktemp -d "${TMPDIR:-/tmp}/rtnq-hashes.XXXX")
NORM=$(cd "$(dirname "$0")" && pwd)/output_norm.py
mkdir -p $S
[ -d $S/sample ] || $RTNQ sample $S/sample >/dev/null 2>&1
[ -d $S/odd ] || $RTNQ sample $S/odd --shards 2 --tied --odd-linear --dtype fp16 >/dev/null 2>&1
[ -d $S/big ] || $PY -c "
from rtnq import synthetic as t
t.write_checkpoint('$S/big', t.SampleSpec(**t.BENCH_1B, shards=3))
" 
: > $OUTF
run() { # name src args...
  local name=$1 src=$2; shift 2
  $RTNQ convert $S/$src $W/$name "$@" >/dev/null 2>&1
  (cd $W/$name && for f in $(ls | sort); do [ "$f" = rtnq_manifest.json ] && continue; echo "$name/$f $(sha256sum $f | cut -c1-16) norm=$($PY $NORM $f)"; done) >> $OUTF
  $PY -c "
import json,sys
m=json.load(open('$W/$name/rtnq_manifest.json'))
for e in m['tensors'].values():
    if e['kind'] in ('marlin','quantized'): e['kind']='Q'
m.pop('version'); m['totals']['tensors']=sorted(m['totals']['tensors'].values())
import hashlib; print('$name/manifest-normalized', hashlib.sha256(json.dumps(m,sort_keys=True).encode()).hexdigest()[:16])
" >> $OUTF
  if [ "$name" != "${name%-deq}" ]; then :; fi
}
for f in marlin gptq compressed-tensors; do
  run sample-$f sample --format $f
  run sample-keep-$f sample --format $f --keep-int8 layers.0,mlp
  run odd-$f odd --format $f --bits 8 --group-size 64 --skip layers.1+down
done
run odd-cw-marlin odd --group-size -1 --dtype bf16
$RTNQ dequantize $W/sample-keep-gptq $W/deq-gptq >/dev/null 2>&1
(cd $W/deq-gptq && for f in $(ls | sort); do echo "deq-gptq/$f $(sha256sum $f | cut -c1-16)"; done) >> $OUTF
$RTNQ dequantize $W/sample-keep-marlin $W/deq-marlin >/dev/null 2>&1
(cd $W/deq-marlin && for f in $(ls | sort); do echo "deq-marlin/$f $(sha256sum $f | cut -c1-16)"; done) >> $OUTF
rm -rf $W/*
for f in marlin gptq compressed-tensors; do
  run big-$f big --format $f --keep-int8 layers.0,mlp
  rm -rf $W/big-$f
done
run big-4 big
rm -rf $W
echo done >> $OUTF
