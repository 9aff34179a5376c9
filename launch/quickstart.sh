#!/usr/bin/env bash
# README command one: the whole system end to end on one CPU machine, in a few minutes.
#
#   bash launch/quickstart.sh
#
# 1. creates/reuses the venv and installs the project (launch/setup.sh; torch pinned, CPU build);
# 2. starts an embedded SeaweedFS S3 server on loopback (stopped on exit, whatever happens);
# 3. builds the small real corpus (text, photos, MP4 videos, interleaved docs), trains the BPE
#    tokenizer on it, and ingests it into S3 (shards + indexes + manifest);
# 4. trains the `tiny` config on 4 CPU ranks (torchrun) with PP2 x V2 x DP2, EP2 and DEP:
#    an uninterrupted reference run, then a run that checkpoints to S3, is killed with SIGKILL
#    after a seeded random step, and is resumed from the newest complete S3 checkpoint
#    (launch/resume_check.py); prints the per-step loss table (resumed steps must match the
#    reference bit for bit) and exits non-zero if they do not;
# 5. writes the training plot (`mmpt plot`).
# Everything lands in $MMPT_QUICKSTART_DIR (default runs/quickstart), recreated on each run.
# Knobs: MMPT_QUICKSTART_STEPS (default 30), MMPT_QUICKSTART_KILL_AFTER (default 12),
# MMPT_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)
say() { echo "[quickstart $(( $(date +%s) - t_start ))s] $*"; }

say "1/5 venv + install (launch/setup.sh)"
bash launch/setup.sh
venv="${MMPT_VENV:-.venv}"  # launch/setup.sh honours the same variable
py="$venv/bin/python"
mmpt="$venv/bin/mmpt"

work="${MMPT_QUICKSTART_DIR:-runs/quickstart}"
steps="${MMPT_QUICKSTART_STEPS:-30}"
kill_after="${MMPT_QUICKSTART_KILL_AFTER:-12}"
rm -rf "$work"
mkdir -p "$work"
work="$(cd "$work" && pwd)"

say "2/5 embedded SeaweedFS S3 server"
port=$("$py" -c "from data.embedded_s3 import free_port; print(free_port())")
"$py" -m data.embedded_s3 --dir "$work/s3" --port "$port" --bucket mmpt-data \
  > "$work/seaweedfs.log" 2>&1 &
s3_pid=$!
stop_s3() {
  if kill -0 "$s3_pid" 2>/dev/null; then
    kill -TERM "$s3_pid" 2>/dev/null || true  # it stops SeaweedFS (SIGKILL after a grace period)
    wait "$s3_pid" 2>/dev/null || true
    say "SeaweedFS stopped"
  fi
}
trap stop_s3 EXIT
for _ in $(seq 1 120); do
  [ -f "$work/s3/s3.env" ] && break
  kill -0 "$s3_pid" 2>/dev/null || { cat "$work/seaweedfs.log" >&2; exit 1; }
  sleep 0.5
done
[ -f "$work/s3/s3.env" ] || { echo "SeaweedFS did not come up; log:" >&2; cat "$work/seaweedfs.log" >&2; exit 1; }
# shellcheck disable=SC1091
source "$work/s3/s3.env"  # AWS_ENDPOINT_URL + loopback development credentials
say "S3 at $AWS_ENDPOINT_URL, bucket s3://mmpt-data"

say "3/5 corpus, tokenizer, ingest into S3"
"$py" -m data.corpus "$work/corpus"
"$py" -m data.train_tokenizer "$work/corpus" "$work/tokenizer" --vocab-size 2048
dataset="s3://mmpt-data/quickstart/dataset"
"$mmpt" ingest --corpus "$work/corpus" --tokenizer "$work/tokenizer/tokenizer.json" \
  --out "$dataset" --shard-size 1MB --no-progress --prune  # a rerun replaces the old dataset

say "4/5 train tiny on 4 ranks (PP2 x V2 x DP2, EP2, DEP): reference, SIGKILL, resume from S3"
"$py" -m launch.resume_check --config configs/tiny.toml --nproc 4 --out "$work/runs" \
  --kill-after "$kill_after" --seed 0 --checkpoint-dir "s3://mmpt-data/quickstart/checkpoints" \
  --parallel.pp=2 --parallel.virtual_stages=2 --parallel.dp=2 --parallel.ep=2 \
  --parallel.microbatches=2 --parallel.dep=true \
  --data.manifest="$dataset" --data.tokenizer="$work/tokenizer/tokenizer.json" \
  --data.seq_len=128 --data.global_batch_size=8 --data.image_max_pixels=50176 \
  --data.video_max_pixels=12544 --data.video_max_frames=8 \
  --train.steps="$steps" --checkpoint.every=5 --checkpoint.keep_last=2

say "5/5 plot"
"$mmpt" plot "$work/runs/reference"
say "done in $(( $(date +%s) - t_start )) s. Runs, logs and the plot: $work/runs (reference/training.png);"
say "metrics: */metrics.jsonl, TensorBoard: tensorboard --logdir $work/runs"
