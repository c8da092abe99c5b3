# Sourced by the benchmarks/h200_*.sh scripts: their OUTDIR argument, and `bench`.
# Each part writes OUTDIR/<part>.json and .log; a part that runs past its limit is cut, not the rest.
set -u
out=${1:?output directory}; shift
mkdir -p "$out"
bench() {  # bench NAME LIMIT_S ARGS...
    local name=$1 limit=$2; shift 2
    echo "== $name: seqpack-bench $*" | tee "$out/$name.log"
    timeout "$limit" python -m seqpack.bench "$@" --json "$out/$name.json" >>"$out/$name.log" 2>&1
    echo "rc=$?" >>"$out/$name.log"
    grep -E "^\||agreement|FAILED|stall|Error" "$out/$name.log" | head -40
}
