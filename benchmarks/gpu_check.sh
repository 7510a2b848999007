#!/usr/bin/env bash
# The GPU figures issues 13, 15, 16 and 29 still need, in five device calls (each may run 600 s).
# Run ON the device machine from the project root after `source .gpu/setup.sh` (see
# ../shared/gpu/README.md); results land in $OUT (or /tmp/gpu_check).
#   bash benchmarks/gpu_check.sh decode   (~8 minutes)
#     1. decode_engine.py --shape gpt2: the padded, CUDA-graph (slots) and transformers'
#        continuous-batching engines against static-batch `generate`, batch 1/16/64, 128 tokens
#        (issue 16: >= 8x at 64, <= 5 ms per token at 1), the capture time, and 256 requests
#        of different lengths refilled as rows finish against batches run to their end
#     2. the GPU test of the captured graphs, in float32 and in bf16 (the dtype serving uses):
#        the same tokens as the padded engine, logprobs as close as the dtype allows. Until
#        it has passed on a device, serve.cuda_graphs and generate.cuda_graphs stay off
#     3. serve_throughput.py --gpu: one replica, 1/16/64 clients, streamed and whole, against
#        static-batch generate (issue 16's serving targets)
#   bash benchmarks/gpu_check.sh generate (~4 minutes)
#     4. generate_throughput.py --gpu: one actor at batch 1/16/64 against static generate
#   bash benchmarks/gpu_check.sh train    (~9 minutes)
#     5. the GPU tests: bf16 training with ddp and fsdp (MixedPrecisionPolicy) on one worker, and
#        data_wait counting only the part of a wait the GPU was idle
#     6. train_throughput.py --gpu --compile on (issue 13: ours/plain and MFU, small and large
#        corpus; the small one reads its cached blocks from the object store)
#     7. train_throughput.py --strategy fsdp on the visible GPUs (with one GPU fsdp shards
#        nothing: it measures FSDP2's overhead against DDP there, not the memory saving)
#   bash benchmarks/gpu_check.sh profile  (~5 minutes)
#     8. train_throughput.py --gpu --profile, eager and compiled: the same 5 steps of ours and
#        of the plain loop under torch.profiler; gpu_busy says whether ours keeps the GPU as
#        busy as plain does, and the traces in $OUT say what it waited for where it does not
#   bash benchmarks/gpu_check.sh loss     (~2 minutes)
#     9. loss_memory.py --shape qwen0.5b: peak GPU memory and tokens/s of train.loss_impl plain
#        against chunked on a Qwen2.5-0.5B-shaped model at 8 x 2,048 tokens, bf16 autocast
#        (issue 29: >= 8 GB less peak memory, >= 1.0x tokens/s; fused is not implemented yet)
# Each step has its own time limit, so one that hangs does not lose the others. Each pipes
# into tail, so pipefail is what makes a failed (or timed-out) step fail this script: the
# steps still all run, and the exit status says whether any failed.
set -u -o pipefail
failed=0
fail() { echo "!! the step above failed (exit $1)"; failed=1; }
part=${1:-decode}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
el() { echo "== $SECONDS s: $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$part" = decode ]; then
  el decode engines
  timeout 240 python3 benchmarks/decode_engine.py --shape gpt2 --batch-sizes 1,16,64 \
    --engines padded,slots,hf-cb --max-tokens 128 --refill 256 --out "$OUT/decode_gpu.json" \
    2>&1 | tail -17 || fail $?
  el captured graphs test
  timeout 150 python3 -m pytest -q tests/unit/decode/test_graphs.py -k cuda 2>&1 | tail -3 || fail $?
  el serving, 1/16/64 clients, graphs on
  timeout 230 python3 benchmarks/serve_throughput.py --gpu --graphs on \
    --out "$OUT/serve_gpu.json" 2>&1 | tail -10 || fail $?
elif [ "$part" = generate ]; then
  el batch generation, batch 1/16/64
  timeout 300 python3 benchmarks/generate_throughput.py --gpu --out "$OUT/generate_gpu.json" \
    2>&1 | tail -6 || fail $?
elif [ "$part" = train ]; then
  el gpu tests
  timeout 150 python3 -m pytest -q -x tests/integration/test_train.py tests/unit/train/test_train.py \
    -k gpu 2>&1 | tail -3 || fail $?
  el train throughput, compiled
  timeout 240 python3 benchmarks/train_throughput.py --gpu --steps 100 --compile on \
    --out "$OUT" 2>&1 | tail -6 || fail $?
  el fsdp against ddp
  timeout 120 python3 benchmarks/train_throughput.py --strategy fsdp --steps 60 \
    --out-json "$OUT/fsdp_gpu.json" 2>&1 | tail -9 || fail $?
elif [ "$part" = profile ]; then
  el profiled steps, ours and plain, eager then compiled
  timeout 400 python3 benchmarks/train_throughput.py --gpu --steps 60 --compile both --profile \
    --out "$OUT" 2>&1 | tail -12 || fail $?
elif [ "$part" = loss ]; then
  el loss memory, plain against chunked
  timeout 300 python3 benchmarks/loss_memory.py --shape qwen0.5b \
    --out "$OUT/loss_memory_gpu.json" 2>&1 | tail -12 || fail $?
else
  echo "usage: bash benchmarks/gpu_check.sh decode|generate|train|profile|loss" >&2
  exit 2
fi
el done
exit $failed
