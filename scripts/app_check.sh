#!/usr/bin/env bash
# Run the real riffusion-app against our server and watch it play, in headless Chromium.
#
#   scripts/app_check.sh APP_DIR [--checkpoint DIR] [--runtime dynamic|static|onnx] [--steps N]
#                        [--plays N] [--timeout S] [--stall S] [--query 'k=v&...'] [--dev]
#                        [--screenshot FILE] [--work DIR]
#
# APP_DIR is a riffusion-app checkout (README: which commit was checked). The script installs the app's npm
# dependencies (npm ci) and playwright-core, starts `python -m riffusion.server` on CHECKPOINT (default: the
# built-in tiny random-weight release, made once with `python -m convert.demo` under WORK), builds and starts
# the app with RIFFUSION_FLASK_URL pointing at it, opens it in /usr/bin/chromium (Debian's `chromium`), presses
# play and counts the app's /api/server responses and the results it plays until PLAYS results have played,
# TIMEOUT seconds have passed or no request was answered for STALL seconds. It saves a screenshot, prints a
# summary and exits 0 only when PLAYS results played and every response was served. Every process it starts
# is stopped on exit. PYTHON (default .venv/bin/python, else python3) runs our code.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "app_check: $*" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || usage
case $1 in -h|--help) usage ;; esac
app=$1; shift
checkpoint="" runtime="" steps=2 plays=8 timeout=900 stall=150 query="" dev=0 screenshot="" work=""
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || [ "$1" = --dev ] || die "$1 needs a value"
    case $1 in
        --checkpoint) checkpoint=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --plays) plays=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --stall) stall=$2; shift 2 ;;
        --query) query=$2; shift 2 ;;
        --screenshot) screenshot=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --dev) dev=1; shift ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
for number in "$steps" "$plays" "$timeout" "$stall"; do
    [[ $number =~ ^[1-9][0-9]{0,5}$ ]] || die "--steps, --plays, --timeout and --stall take a positive integer, got '$number'"
done
case $runtime in ""|dynamic|static|onnx) ;; *) die "--runtime must be dynamic, static or onnx, got '$runtime'" ;; esac
[[ $query =~ ^[A-Za-z0-9_.=\&%+-]*$ ]] || die "--query holds characters a URL query does not need: '$query'"

[ -f "$app/package.json" ] && [ -f "$app/pages/api/server.js" ] \
    || die "$app: not a riffusion-app checkout (no package.json and pages/api/server.js)"
grep -q RIFFUSION_FLASK_URL "$app/pages/api/server.js" \
    || die "$app/pages/api/server.js does not read RIFFUSION_FLASK_URL: not the app version this script knows"
app=$(cd "$app" && pwd)
[ -x /usr/bin/chromium ] || die "/usr/bin/chromium is missing: apt-get install chromium"
command -v npm >/dev/null || die "npm is missing: install Node.js 18 or newer"
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
work=${work:-$(mktemp -d -t app-check.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
screenshot=${screenshot:-$work/riffusion-app.png}
export HF_HUB_OFFLINE=1 NEXT_TELEMETRY_DISABLED=1

pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do  # each was started with setsid: its id is its process group
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$work/chromium-profile"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start LOG COMMAND...: in its own session, so that cleanup stops it and all its children
    local log=$1; shift
    setsid "$@" >"$log" 2>&1 &
    pids+=("$!")
}

free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for URL SECONDS LOG: until URL answers, or fail showing the end of LOG
    local url=$1 seconds=$2 log=$3
    for _ in $(seq "$seconds"); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || { tail -20 "$log" >&2; die "the process writing $log exited"; }
        sleep 1
    done
    tail -20 "$log" >&2
    die "$url did not answer within $seconds s"
}

begin=$(date +%s)
if [ -z "$checkpoint" ]; then
    checkpoint=$work/demo/riffusion-tiny-paddle
    if [ ! -f "$checkpoint/manifest.json" ]; then
        echo "building the tiny random-weight release (python -m convert.demo) under $work/demo ..."
        "$python" -m convert.demo --out "$work/demo" >"$work/demo.log" 2>&1 \
            || { tail -20 "$work/demo.log" >&2; die "python -m convert.demo failed (log: $work/demo.log)"; }
    fi
fi

echo "installing the app's npm dependencies and playwright-core ..."
(cd "$app" && npm ci --no-audit --no-fund --loglevel=error) >"$work/npm.log" 2>&1 \
    || { tail -20 "$work/npm.log" >&2; die "npm ci failed in $app"; }
npm install --prefix "$work/driver" --no-audit --no-fund --loglevel=error playwright-core >>"$work/npm.log" 2>&1 \
    || { tail -20 "$work/npm.log" >&2; die "npm install playwright-core failed"; }

server_port=$(free_port)
server_args=(-m riffusion.server --checkpoint "$checkpoint" --port "$server_port")
[ -n "$runtime" ] && server_args+=(--runtime "$runtime")
if "$python" -m riffusion.server --help | grep -q -- --max-steps; then
    server_args+=(--max-steps "$steps")  # the app asks for its default 50; the server runs at most this many
    warm_steps=50
    step_note="server --max-steps $steps (the app asks for 50)"
else
    query=${query:+$query&}numInferenceSteps=$steps
    warm_steps=$steps
    step_note="app ?numInferenceSteps=$steps (this server has no --max-steps)"
fi
echo "starting our server: $python ${server_args[*]}"
start "$work/server.log" "$python" "${server_args[@]}"
wait_for "http://127.0.0.1:$server_port/" 300 "$work/server.log"

# The first request pays one-time costs (runtime sessions, the inverse mel basis); on a slow machine that
# alone can pass the app's 60 s window, after which the app's page stops for good. Pay them here.
warm_body='{"alpha": 0.25, "num_inference_steps": '$warm_steps', "seed_image_id": "og_beat", "mask_image_id": null,
  "start": {"prompt": "warm up", "seed": 1, "denoising": 0.75, "guidance": 7},
  "end": {"prompt": "warm up", "seed": 2, "denoising": 0.75, "guidance": 7}}'
for round in first second; do
    warm_s=$(curl -sS -o /dev/null -w '%{http_code} %{time_total}' -H 'Content-Type: application/json' \
        --data "$warm_body" "http://127.0.0.1:$server_port/run_inference/") || die "warm-up request failed"
    [ "${warm_s%% *}" = 200 ] || die "warm-up request answered HTTP ${warm_s%% *} (server log: $work/server.log)"
    echo "$round request sent directly: ${warm_s#* } s"
done
warm_note="one request sent directly, after the first: ${warm_s#* } s"

app_port=$(free_port)
export RIFFUSION_FLASK_URL=http://127.0.0.1:$server_port/run_inference/
if [ "$dev" = 1 ]; then
    echo "starting the app's dev server on :$app_port ..."
    start "$work/app.log" bash -c "cd '$app' && exec node_modules/.bin/next dev -p $app_port -H 127.0.0.1"
else
    echo "building the app (next build) ..."
    (cd "$app" && node_modules/.bin/next build) >"$work/app-build.log" 2>&1 \
        || { tail -30 "$work/app-build.log" >&2; die "next build failed (log: $work/app-build.log)"; }
    start "$work/app.log" bash -c "cd '$app' && exec node_modules/.bin/next start -p $app_port -H 127.0.0.1"
fi
wait_for "http://127.0.0.1:$app_port/about" 300 "$work/app.log"

url="http://127.0.0.1:$app_port/${query:+?$query}"
echo "driving $url in headless Chromium until $plays results have played (time limit $timeout s) ..."
driver_start=$(date +%s)
set +e
NODE_PATH=$work/driver/node_modules APP_URL=$url PLAYS=$plays TIMEOUT_S=$timeout STALL_S=$stall \
    SCREENSHOT=$screenshot PROFILE_DIR=$work/chromium-profile REQUEST_LOG=$work/requests.jsonl \
    SUMMARY_JSON=$work/summary.json node "$repo/scripts/app_check_driver.cjs"
driver_status=$?
set -e
[ "$driver_status" = 0 ] || die "the browser driver failed (status $driver_status); server log: $work/server.log"

"$python" - "$work/summary.json" "$work/server.log" "$(( $(date +%s) - driver_start ))" "$(( $(date +%s) - begin ))" \
    "$step_note" "$screenshot" "$work" "$plays" "$warm_note" <<'EOF'
import json, re, sys

summary_file, server_log, browse_s, total_s, steps, screenshot, work, plays, warm = sys.argv[1:]
summary = json.load(open(summary_file))
log = open(server_log, errors="replace").read()
codes = re.findall(r'"POST /run_inference/? HTTP/1\.\d" (\d{3})', log)
tracebacks = log.count("Traceback (most recent call last)")
print(f"""
riffusion-app check ({steps}; {warm})
  stopped because:       {summary['stopped']}
  app /api/server calls: {summary['responses']} answered, {summary['served']} served with a spectrogram and MP3, \
{summary['served_in_a_row']} in a row from the first
  failures:              {len(summary['failures'])}""")
for reason in summary["failures"][:5]:
    print(f"                         - {reason}")
print(f"""  results played:        {summary['results_played']}
  page errors:           {len(summary['page_errors'])}{''.join(chr(10) + ' ' * 25 + '- ' + e[:200] for e in summary['page_errors'][:5])}
  console errors:        {len(summary['console_errors'])}{''.join(chr(10) + ' ' * 25 + '- ' + e[:200] for e in summary['console_errors'][:3])}
  our server:            {len(codes)} POSTs logged (2 of them the warm-up) ({', '.join(f'{codes.count(c)} x {c}' for c in sorted(set(codes)))}), {tracebacks} tracebacks
  time:                  {browse_s} s in the browser, {total_s} s in all
  screenshot:            {screenshot}
  logs:                  {work}/server.log, app.log, requests.jsonl""")
ok = summary["results_played"] >= int(plays) and not summary["failures"] and not summary["page_errors"]
sys.exit(0 if ok else 1)
EOF
