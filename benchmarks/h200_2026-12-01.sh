#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md's 2026-12-01 tables (H200, torch 2.11, transformers 5.17).
# Usage: PYTHONPATH=src bash benchmarks/h200_2026-12-01.sh OUTDIR [PART ...]
source "$(dirname "$0")/bench_parts.sh"  # OUTDIR, then the parts: "$@"
parts=${*:-gptoss qwen35 fsdp2}
for part in $parts; do
    case $part in
    # issue 10: gpt-oss's sinks on the varlen kernel; its padded mode runs the model's eager attention
    gptoss) bench gpt-oss-20b_l6_b16 300 --model gpt-oss-20b --layers 6 --batch-size 16 --modes padding,hf-packing,seqpack ;;
    # issue 11: a Gated DeltaNet hybrid; hf-packing is marked NOT EXACT (no fla kernels there)
    qwen35) bench qwen3.5-4b_b16 200 --model qwen3.5-4b --batch-size 16 --modes padding-no-cudnn,hf-packing,seqpack ;;
    nemotron) bench nemotron-h-8b_b8 200 --model nemotron-h-8b --batch-size 8 --modes padding-no-cudnn,seqpack ;;
    # issue 12: FSDP2 at world size 1 against no wrapper, and the token-budget sampler's step times
    fsdp2)
        bench llama-3.2-1b_b16_one 100 --model llama-3.2-1b --batch-size 16 --modes seqpack
        bench llama-3.2-1b_b16_fsdp2_ws1 120 --model llama-3.2-1b --batch-size 16 --modes seqpack --nproc 1 --shard fsdp2
        bench llama-3.2-1b_budget3200 100 --model llama-3.2-1b --token-budget 3200 --modes seqpack ;;
    qwen35b8) bench qwen3.5-4b_b8 200 --model qwen3.5-4b --batch-size 8 --modes padding-no-cudnn,hf-packing,seqpack ;;
    # issue 15: long sequences (synthetic log-normal lengths over GSM8K text), 20 timed steps
    long) bench llama-3.2-1b_long_b4 200 --model llama-3.2-1b --data long --batch-size 4 --modes padding-no-cudnn,seqpack ;;
    # issue 14: a VLM with one synthetic image per example (bench/media.py), vision tower whole
    vlm) bench qwen2.5-vl-7b_l4_b8 110 --model qwen2.5-vl-7b --layers 4 --batch-size 8 --steps 5 --warmup 2 --modes padding-no-cudnn,seqpack ;;
    gemma2) bench gemma-2-2b_b16_explain 200 --model gemma-2-2b --batch-size 16 --modes seqpack --explain ;;
    # issue 15, all three modes on long data (synthetic log-normal lengths over GSM8K text, cut at 8,192)
    long3) bench llama-3.2-1b_long_b4_3modes 200 --model llama-3.2-1b --data long --batch-size 4 --modes padding-no-cudnn,hf-packing,seqpack ;;
    mistral_long) bench mistral-7b_long_b2 250 --model mistral-7b --data long --batch-size 2 --modes padding-no-cudnn,hf-packing,seqpack ;;
    # issue 11 with flash-linear-attention installed (its Gated DeltaNet kernels; no causal-conv1d):
    # run with the fla wheels on PYTHONPATH (see BENCHMARKS.md)
    qwen35fla) bench qwen3.5-4b_b8_fla 200 --model qwen3.5-4b --batch-size 8 --modes padding-no-cudnn,hf-packing,seqpack ;;
    # issue 15: what stalls mistral-7b's long-data step 18 (866 tokens, after 18 longer batches):
    # recompiles / allocator retries (--explain), then a profile of that step alone
    stall)
        TORCH_LOGS=recompiles bench mistral-7b_long_b2_explain 120 --model mistral-7b --data long --batch-size 2 --modes seqpack --explain
        timeout 120 python benchmarks/profile_step.py --model mistral-7b --data long --batch-size 2 --modes seqpack \
            --warmup 18 --steps 1 --rows 30 --stacks >"$out/profile_mistral-7b_long_step18.txt" 2>&1
        grep -E "=====|x cuda|x aten" "$out/profile_mistral-7b_long_step18.txt" | head -20 ;;
    # issue 11: where a Qwen3.5 step's host time goes (the host syncs by stack)
    qwen35prof)
        timeout 120 python benchmarks/profile_step.py --model qwen3.5-4b --layers 8 --batch-size 8 \
            --modes padding-no-cudnn,seqpack --rows 40 --stacks >"$out/profile_qwen3.5-4b_l8_b8.txt" 2>&1
        grep -E "=====|x cuda|x aten" "$out/profile_qwen3.5-4b_l8_b8.txt" | head -30 ;;
    # issue 15: memory per token against sequence length, and the longest sequence on 80 GB
    memslope)
        timeout 230 python benchmarks/memory_slope.py --device cuda --time-limit 200 --lengths 8192,16384,32768 \
            --models llama-3.2-1b,mistral-7b,qwen3-8b,gemma-3-4b,qwen2.5-vl-7b,qwen3.5-4b,nemotron-h-8b \
            --json "$out/memory_slope.json" >"$out/memory_slope.log" 2>&1
        tail -30 "$out/memory_slope.log" ;;
    llama16) bench llama-3.2-1b_b16_nonstrict 100 --model llama-3.2-1b --batch-size 16 --modes seqpack ;;
    *) echo "unknown part $part" ;;
    esac
done
