#!/usr/bin/env bash
# GPU acceptance checks for a GPU node, in one command (CPU-only CI cannot run them):
#
#   bash tools/gpu_check.sh OUTDIR [STAGE ...]      STAGE: env tests bench_dcgan bench_gan (default: all)
#
#   env          what the node has: nvidia-smi, torch/CUDA/cuDNN, DALI (GPU decode needs it)
#   tests        the tests that only run with CUDA: fp16 GradScaler + gradient penalty, resume onto the GPU,
#                bf16, channels_last, DALI mixed (nvJPEG) decode vs CPU decode, more ranks than GPUs
#   bench_gan    tools/bench_train.py at the paper's size (128 px, width 64, batch 64) for WGAN-GP-AC:
#                fp32 (TF32) vs bf16, each also with NCHW layout, lazy penalty every 4 steps, strict fp32
#   bench_dcgan  the same for DCGAN (the loader-bound case), with the loader's images/s beside training's
#
# Results in OUTDIR: env.txt, pytest.log, bench_train-gan.json, bench_train-dcgan.json, and a log per stage.
# Python: $PYTHON, else .venv/bin/python, else python3. Exit status: the number of stages that failed.
set -uo pipefail
OUTDIR=${1:?usage: bash tools/gpu_check.sh OUTDIR [env tests bench_gan bench_dcgan]}
shift
STAGES=${*:-env tests bench_dcgan bench_gan}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
failed=0

stage() {  # stage NAME COMMAND...: run, log to OUTDIR/NAME.log, count failures
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    if "$@" >"$OUTDIR/$name.log" 2>&1; then
        echo "== $name: ok ($((SECONDS - t0)) s)"
    else
        echo "== $name: FAILED ($((SECONDS - t0)) s); last lines of $OUTDIR/$name.log:"
        tail -n 25 "$OUTDIR/$name.log"
        failed=$((failed + 1))
    fi
}

bench() {  # bench MODEL OUTFILE VARIANT...
    local model=$1 out=$2
    shift 2
    local variants=()
    for v in "$@"; do variants+=(--variant "$v"); done
    "$PYTHON" tools/bench_train.py --skip-cpu --models "$model" --size 128 --width 64 --batch 64 \
        --warmup 5 --steps 20 --repeats 1 --out "$out" "${variants[@]}"
}

for s in $STAGES; do
    case $s in
        env)
            {
                nvidia-smi || echo "nvidia-smi: not found"
                "$PYTHON" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("bf16 supported", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
try:
    import nvidia.dali as dali
    print("DALI", dali.__version__)
except Exception as e:  # the loader falls back to webdataset + PIL without it
    print("DALI not importable:", type(e).__name__, e)
EOF
            } >"$OUTDIR/env.txt" 2>&1
            cat "$OUTDIR/env.txt"
            ;;
        tests)
            stage pytest "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_train.py tests/test_checkpoint.py \
                tests/test_loader.py tests/test_generate.py \
                -k "cuda or gpu or fp16 or bf16 or channels_last or mixed_decode or device_rule or more_ranks"
            ;;
        bench_gan)
            stage bench_gan bench wgan_gp_ac "$OUTDIR/bench_train-gan.json" \
                nchw=channels_last=false lazy4=model.gp_every=4 strict=tf32=false
            ;;
        bench_dcgan)
            stage bench_dcgan bench dcgan "$OUTDIR/bench_train-dcgan.json" nchw=channels_last=false
            ;;
        *)
            echo "unknown stage $s (env tests bench_gan bench_dcgan)" >&2
            failed=$((failed + 1))
            ;;
    esac
done
echo "== gpu_check: $failed stage(s) failed; results in $OUTDIR"
exit "$failed"
