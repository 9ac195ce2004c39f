#!/usr/bin/env bash
# Private local dev/test stack for ecoworker on a Debian machine without Docker:
# RabbitMQ + PostgreSQL + an S3 stand-in (moto), all on 127.0.0.1, on ports of
# their own, with every bit of state under one directory.
#
# usage: services.sh up | down [--purge] | env [--export] | status | pids
#                    restart-rabbit | stop-rabbit | start-rabbit
#                    stop-pg [fast|immediate|smart] | start-pg
#
# Settings (environment; explicit value > value saved by the last `up` > default):
#   ECOWORKER_STACK_DIR        state dir                      (/tmp/ecoworker-stack)
#   ECOWORKER_AMQP_PORT        RabbitMQ AMQP listener          (56720)
#   ECOWORKER_RABBIT_DIST_PORT Erlang distribution port        (56721; CLI uses +1..+10)
#   ECOWORKER_EPMD_PORT        private epmd                    (43690)
#   ECOWORKER_PG_PORT          PostgreSQL                      (54320)
#   ECOWORKER_S3_PORT          moto S3 server                  (59000)
#   ECOWORKER_MOTO_VENV        virtualenv holding moto         (/opt/ecoworker-moto-venv)
#   ECOWORKER_MOTO_SPEC        pip requirement for moto        ('moto[server]>=5,<6')
#
# `up` writes STATE/env (KEY=value lines; `set -a; . STATE/env; set +a` in bash).
# Nothing outside the state dir (and the moto venv) is created, and `down` only
# stops processes this script started for this state dir.
# shellcheck disable=SC2016  # single-quoted $vars below belong to generated wrapper scripts
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
STATE=${ECOWORKER_STACK_DIR:-/tmp/ecoworker-stack}
case "$STATE" in /*) ;; *) STATE="$PWD/$STATE" ;; esac
STATE=${STATE%/}
case "$STATE" in "" | /*/..* | /..*) echo "services.sh: unusable state dir '$STATE'" >&2; exit 2 ;; esac
CONFIG="$STATE/config"

# Ports: explicit env > saved config (from the last `up` of this state dir) > default.
_saved() { if [ -f "$CONFIG" ]; then sed -n "s/^$1=//p" "$CONFIG" | tail -n1; fi; }
_setting() { # NAME DEFAULT
    local v=${!1:-}
    [ -n "$v" ] || v=$(_saved "$1")
    [ -n "$v" ] || v=$2
    printf '%s' "$v"
}
AMQP_PORT=$(_setting ECOWORKER_AMQP_PORT 56720)
DIST_PORT=$(_setting ECOWORKER_RABBIT_DIST_PORT 56721)
EPMD_PORT=$(_setting ECOWORKER_EPMD_PORT 43690)
PG_PORT=$(_setting ECOWORKER_PG_PORT 54320)
S3_PORT=$(_setting ECOWORKER_S3_PORT 59000)
MOTO_VENV=${ECOWORKER_MOTO_VENV:-/opt/ecoworker-moto-venv}
MOTO_SPEC=${ECOWORKER_MOTO_SPEC:-moto[server]>=5,<6}
MOTO_PYTHON=${ECOWORKER_MOTO_PYTHON:-/usr/bin/python3}

for p in "$AMQP_PORT" "$DIST_PORT" "$EPMD_PORT" "$PG_PORT" "$S3_PORT"; do
    case "$p" in '' | *[!0-9]*) echo "services.sh: bad port '$p'" >&2; exit 2 ;; esac
    if [ "$p" -lt 1024 ] || [ "$p" -gt 65535 ]; then
        echo "services.sh: port $p out of range 1024-65535" >&2; exit 2
    fi
    case "$p" in 5672 | 5432 | 15672 | 25672 | 4369)
        echo "services.sh: port $p is a system default; pick another" >&2; exit 2 ;;
    esac
done

RABBIT_NODE="ecoworker-${AMQP_PORT}@localhost"
RMQ_DIR="$STATE/rabbitmq"
RMQ_HOME="$RMQ_DIR/home"
RMQ_PIDFILE="$RMQ_DIR/rabbit.pid"
RMQ_LAUNCHER_PIDFILE="$RMQ_DIR/launcher.pid"
RMQ_LOG_DIR="$RMQ_DIR/log"
RMQ_BIN=/usr/lib/rabbitmq/bin
PG_DIR="$STATE/pg"
PGDATA="$PG_DIR/data"
PG_LOG="$PG_DIR/postgres.log"
MOTO_DIR="$STATE/moto"
MOTO_PIDFILE="$MOTO_DIR/moto.pid"
MOTO_LOG="$MOTO_DIR/moto.log"
BIN_DIR="$STATE/bin"
ENV_FILE="$STATE/env"
MARKER="$STATE/.ecoworker-stack"

cd /   # runuser'd postgres/rabbitmq processes must be able to stat their cwd

# ---------------------------------------------------------------- helpers
_now_us() { local t=${EPOCHREALTIME//[.,]/}; printf '%s' "$t"; }
T_START=$(_now_us)
_secs() { # START_US -> "1.2s"
    local d=$(( ($(_now_us) - $1) / 100000 ))
    printf '%d.%ds' $((d / 10)) $((d % 10))
}
log() { printf '[services] %s\n' "$*"; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }
tail_log() { # FILE...
    local f
    for f in "$@"; do
        [ -f "$f" ] || continue
        printf -- '----- tail of %s -----\n' "$f" >&2
        tail -n 30 "$f" >&2 || true
    done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pid_alive() { [ -n "${1:-}" ] && [ -d "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
pid_cmdline() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null || true; }
pid_environ() { { tr '\0' '\n' <"/proc/$1/environ"; } 2>/dev/null || true; }
read_pid() { if [ -f "$1" ]; then head -n1 "$1" | tr -dc '0-9'; fi; }
wait_gone() { # PID TIMEOUT_S
    local i
    for ((i = 0; i < $2 * 10; i++)); do pid_alive "$1" || return 0; sleep 0.1; done
    return 1
}
kill_wait() { # PID NAME: TERM, wait 10 s, KILL
    pid_alive "$1" || return 0
    kill -TERM "$1" 2>/dev/null || true
    if ! wait_gone "$1" 10; then
        log "$2 (pid $1) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$1" 2>/dev/null || true
        wait_gone "$1" 5 || true
    fi
}
need_root() { [ "$(id -u)" = 0 ] || die "must run as root (uses runuser/apt-get)"; }

pg_bindir() {
    local d
    d=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null |
        grep -E '^[0-9]+$' | sort -n | tail -n1 || true)
    [ -n "$d" ] && [ -x "/usr/lib/postgresql/$d/bin/initdb" ] && printf '/usr/lib/postgresql/%s/bin' "$d"
}

# ---------------------------------------------------------------- packages
ensure_packages() {
    local missing=()
    [ -x "$RMQ_BIN/rabbitmq-server" ] && command -v epmd >/dev/null || missing+=(rabbitmq-server)
    [ -n "$(pg_bindir || true)" ] || missing+=(postgresql)
    [ -x "$MOTO_PYTHON" ] || missing+=(python3)
    if [ "$MOTO_PYTHON" = /usr/bin/python3 ]; then # Debian's venv needs python3-venv's wheels
        dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'ok installed' ||
            missing+=(python3-venv)
    fi
    command -v tesseract >/dev/null || missing+=(tesseract-ocr)
    [ ${#missing[@]} -eq 0 ] && return 0
    local t
    t=$(_now_us)
    log "installing ${missing[*]} (apt)"
    apt-get update -qq >"$STATE/apt.log" 2>&1 || { tail_log "$STATE/apt.log"; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >>"$STATE/apt.log" 2>&1 || { tail_log "$STATE/apt.log"; die "apt-get install failed"; }
    log "apt install done ($(_secs "$t"))"
}

# moto conflicts with the project's botocore pin: it lives in its own venv.
ensure_moto_venv() {
    [ -f "$MOTO_VENV/.ecoworker-ok" ] && [ -x "$MOTO_VENV/bin/moto_server" ] && return 0
    local t lockdir
    t=$(_now_us)
    lockdir=$(dirname "$MOTO_VENV")
    mkdir -p "$lockdir"
    exec 9>"$MOTO_VENV.lock"
    flock 9
    if ! { [ -f "$MOTO_VENV/.ecoworker-ok" ] && [ -x "$MOTO_VENV/bin/moto_server" ]; }; then
        log "creating moto venv $MOTO_VENV ($MOTO_SPEC)"
        rm -rf "$MOTO_VENV"
        {
            "$MOTO_PYTHON" -m venv "$MOTO_VENV" &&
                "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check "$MOTO_SPEC"
        } >"$STATE/moto-venv.log" 2>&1 || {
            grep -v "is ignored: it is neither a file nor a directory" "$STATE/moto-venv.log" \
                >"$STATE/moto-venv.err" || true
            tail_log "$STATE/moto-venv.err"
            die "could not create moto venv"
        }
        touch "$MOTO_VENV/.ecoworker-ok"
        log "moto venv ready ($(_secs "$t"))"
    fi
    exec 9>&-
}

# ---------------------------------------------------------------- layout
init_state() {
    mkdir -p "$STATE" "$BIN_DIR" "$MOTO_DIR"
    chmod 755 "$STATE"
    touch "$MARKER"
    {
        echo "ECOWORKER_AMQP_PORT=$AMQP_PORT"
        echo "ECOWORKER_RABBIT_DIST_PORT=$DIST_PORT"
        echo "ECOWORKER_EPMD_PORT=$EPMD_PORT"
        echo "ECOWORKER_PG_PORT=$PG_PORT"
        echo "ECOWORKER_S3_PORT=$S3_PORT"
    } >"$CONFIG"
}

check_reachable() { # the service users must be able to reach the state dir
    local u
    for u in postgres rabbitmq; do
        runuser -u "$u" -- test -x "$STATE" ||
            die "user $u cannot reach $STATE (a parent dir is not world-traversable; use e.g. /tmp/...)"
    done
}

# ---------------------------------------------------------------- rabbitmq
RMQ_ENV=(
    "HOME=$RMQ_HOME"
    "PATH=$RMQ_BIN:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    "LANG=C.UTF-8" "LC_ALL=C.UTF-8"
    "ERL_EPMD_PORT=$EPMD_PORT" "ERL_EPMD_ADDRESS=127.0.0.1"
    "RABBITMQ_CONF_ENV_FILE=$RMQ_DIR/rabbitmq-env.conf"
    "RABBITMQ_NODENAME=$RABBIT_NODE"
    "RABBITMQ_CONFIG_FILE=$RMQ_DIR/rabbitmq.conf"
    "RABBITMQ_ADVANCED_CONFIG_FILE=$RMQ_DIR/advanced.config"
    "RABBITMQ_ENABLED_PLUGINS_FILE=$RMQ_DIR/enabled_plugins"
    "RABBITMQ_MNESIA_BASE=$RMQ_DIR/mnesia"
    "RABBITMQ_LOG_BASE=$RMQ_LOG_DIR"
    "RABBITMQ_PID_FILE=$RMQ_PIDFILE"
    "RABBITMQ_DIST_PORT=$DIST_PORT"
    "RABBITMQ_CTL_DIST_PORT_MIN=$((DIST_PORT + 1))"
    "RABBITMQ_CTL_DIST_PORT_MAX=$((DIST_PORT + 10))"
    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
    "RABBITMQ_CTL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
)

rabbit_prepare() {
    getent hosts localhost >/dev/null || die "'localhost' does not resolve (needed for node $RABBIT_NODE)"
    mkdir -p "$RMQ_HOME" "$RMQ_DIR/mnesia" "$RMQ_LOG_DIR"
    cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
# generated by services.sh
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
loopback_users = none
consumer_timeout = 3600000
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
EOF
    echo '[].' >"$RMQ_DIR/enabled_plugins"
    : >"$RMQ_DIR/rabbitmq-env.conf" # shadows /etc/rabbitmq/rabbitmq-env.conf
    if [ ! -s "$RMQ_HOME/.erlang.cookie" ]; then
        (umask 077; od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$RMQ_HOME/.erlang.cookie")
    fi
    chown -R rabbitmq:rabbitmq "$RMQ_DIR"
    chmod 750 "$RMQ_DIR"
    chmod 400 "$RMQ_HOME/.erlang.cookie"
    write_rabbitmqctl_wrapper
}

write_rabbitmqctl_wrapper() {
    mkdir -p "$BIN_DIR"
    {
        echo '#!/bin/bash'
        echo "# generated by services.sh: rabbitmqctl for node $RABBIT_NODE (private HOME/cookie/epmd)"
        echo 'cd / || exit 1'
        echo 'as=(); [ "$(id -u)" != 0 ] || as=(runuser -u rabbitmq --)'
        printf 'exec "${as[@]}" env -i'
        printf ' %q' "${RMQ_ENV[@]}"
        printf ' %q -n %q "$@"\n' "$RMQ_BIN/rabbitmqctl" "$RABBIT_NODE"
    } >"$BIN_DIR/rabbitmqctl.tmp"
    chmod 755 "$BIN_DIR/rabbitmqctl.tmp"
    mv -f "$BIN_DIR/rabbitmqctl.tmp" "$BIN_DIR/rabbitmqctl"
}

rabbit_pid() { # pid of the running beam of this node, or nothing
    local pid
    pid=$(read_pid "$RMQ_PIDFILE")
    # the beam's cmdline does not name the data dir, its environment does
    pid_alive "$pid" && pid_environ "$pid" | grep -qxF "RABBITMQ_MNESIA_BASE=$RMQ_DIR/mnesia" &&
        printf '%s' "$pid"
    return 0
}

rabbit_launch() { # start the node in the background (no waiting)
    if [ -n "$(rabbit_pid)" ]; then RABBIT_WAS_UP=1; return 0; fi
    RABBIT_WAS_UP=0
    port_open "$AMQP_PORT" && die "port $AMQP_PORT is taken by another process"
    port_open "$DIST_PORT" && die "port $DIST_PORT is taken by another process"
    rabbit_prepare
    rm -f "$RMQ_PIDFILE"
    : >"$RMQ_LOG_DIR/startup.log"
    chown rabbitmq:rabbitmq "$RMQ_LOG_DIR/startup.log"
    RABBIT_T0=$(_now_us)
    setsid runuser -u rabbitmq -- env -i "${RMQ_ENV[@]}" "$RMQ_BIN/rabbitmq-server" \
        </dev/null >>"$RMQ_LOG_DIR/startup.log" 2>&1 &
    echo $! >"$RMQ_LAUNCHER_PIDFILE"
}

rabbit_wait() {
    [ "${RABBIT_WAS_UP:-0}" = 1 ] && { log "rabbitmq  already running (node $RABBIT_NODE, amqp $AMQP_PORT)"; return 0; }
    local launcher i
    launcher=$(read_pid "$RMQ_LAUNCHER_PIDFILE")
    # The AMQP listener is started late in boot; wait for it first (cheap), then
    # confirm with await_startup (each CLI call costs ~1 s of CPU).
    for ((i = 0; i < 1200; i++)); do
        port_open "$AMQP_PORT" && break
        pid_alive "$launcher" || {
            tail_log "$RMQ_LOG_DIR/startup.log" "$RMQ_LOG_DIR/$RABBIT_NODE.log"
            die "rabbitmq exited during startup"
        }
        sleep 0.1
    done
    port_open "$AMQP_PORT" || {
        tail_log "$RMQ_LOG_DIR/startup.log" "$RMQ_LOG_DIR/$RABBIT_NODE.log"
        die "rabbitmq: AMQP port $AMQP_PORT not accepting after 120 s"
    }
    timeout 90 "$BIN_DIR/rabbitmqctl" -q await_startup --timeout 60 >"$RMQ_LOG_DIR/await.log" 2>&1 || {
        tail_log "$RMQ_LOG_DIR/await.log" "$RMQ_LOG_DIR/$RABBIT_NODE.log"
        die "rabbitmqctl await_startup failed"
    }
    log "rabbitmq  up   node $RABBIT_NODE amqp 127.0.0.1:$AMQP_PORT ($(_secs "$RABBIT_T0"))"
}

epmd_pids() { # epmd daemons started with our ERL_EPMD_PORT
    local d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [ "$({ cat "$d/comm"; } 2>/dev/null)" = epmd ] || continue
        pid_environ "$pid" | grep -qx "ERL_EPMD_PORT=$EPMD_PORT" && echo "$pid"
    done
    return 0
}

rabbit_stop() {
    local pid launcher
    pid=$(rabbit_pid)
    launcher=$(read_pid "$RMQ_LAUNCHER_PIDFILE")
    if [ -n "$pid" ]; then
        write_rabbitmqctl_wrapper
        local t
        t=$(_now_us)
        if ! timeout 60 "$BIN_DIR/rabbitmqctl" -q stop "$RMQ_PIDFILE" >"$RMQ_LOG_DIR/stop.log" 2>&1; then
            log "rabbitmqctl stop failed; signalling pid $pid"
            kill_wait "$pid" rabbitmq
        fi
        wait_gone "$pid" 30 || kill_wait "$pid" rabbitmq
        log "rabbitmq  stopped ($(_secs "$t"))"
    fi
    pid_alive "$launcher" && pid_cmdline "$launcher" | grep -q -- "$RMQ_DIR" && kill_wait "$launcher" "rabbitmq launcher"
    rm -f "$RMQ_LAUNCHER_PIDFILE"
    return 0
}

epmd_stop() {
    local p
    for p in $(epmd_pids); do
        ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || true
        wait_gone "$p" 3 || kill_wait "$p" epmd
        log "epmd      stopped (port $EPMD_PORT)"
    done
}

# ---------------------------------------------------------------- postgres
PGBIN=""
pg_prepare() {
    PGBIN=$(pg_bindir) || die "no PostgreSQL server binaries under /usr/lib/postgresql"
    mkdir -p "$PG_DIR"
    chown postgres:postgres "$PG_DIR"
    chmod 700 "$PG_DIR"
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        rm -rf "$PGDATA"
        runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" --auth=trust -U postgres \
            --encoding=UTF8 --no-locale --no-sync >"$PG_DIR/initdb.log" 2>&1 || {
            tail_log "$PG_DIR/initdb.log"; die "initdb failed"
        }
        echo "include 'ecoworker.conf'" >>"$PGDATA/postgresql.conf"
    fi
    cat >"$PGDATA/ecoworker.conf" <<EOF
# generated by services.sh (rewritten on every start)
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 200
EOF
    chown postgres:postgres "$PGDATA/ecoworker.conf"
    write_pg_ctl_wrapper
}

write_pg_ctl_wrapper() {
    [ -n "$PGBIN" ] || PGBIN=$(pg_bindir) || die "no PostgreSQL server binaries"
    mkdir -p "$BIN_DIR"
    {
        echo '#!/bin/bash'
        echo "# generated by services.sh: pg_ctl for $PGDATA, e.g. 'stop -m immediate', 'start'"
        printf 'cd %q || exit 1\n' "$PG_DIR"
        echo 'as=(); [ "$(id -u)" != 0 ] || as=(runuser -u postgres --)'
        printf 'exec "${as[@]}" %q -D %q -l %q "$@"\n' "$PGBIN/pg_ctl" "$PGDATA" "$PG_LOG"
    } >"$BIN_DIR/pg_ctl.tmp"
    chmod 755 "$BIN_DIR/pg_ctl.tmp"
    mv -f "$BIN_DIR/pg_ctl.tmp" "$BIN_DIR/pg_ctl"
}

pg_pid() {
    local pid
    pid=$(read_pid "$PGDATA/postmaster.pid")
    pid_alive "$pid" && pid_cmdline "$pid" | grep -q -- "$PGDATA" && printf '%s' "$pid"
    return 0
}

pg_start() {
    local t
    t=$(_now_us)
    if [ -n "$(pg_pid)" ]; then
        write_pg_ctl_wrapper
        log "postgres  already running (127.0.0.1:$PG_PORT)"
        return 0
    fi
    port_open "$PG_PORT" && die "port $PG_PORT is taken by another process"
    pg_prepare
    rm -f "$PGDATA/postmaster.pid" # stale (e.g. after a reboot): our postmaster is not running
    "$BIN_DIR/pg_ctl" start -w -t 60 -s >"$PG_DIR/pg_ctl.out" 2>&1 || {
        tail_log "$PG_DIR/pg_ctl.out" "$PG_LOG"; die "PostgreSQL did not start"
    }
    local i
    for ((i = 0; i < 300; i++)); do
        "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
        sleep 0.1
    done
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || { tail_log "$PG_LOG"; die "pg_isready failed"; }
    if [ "$("$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAXc \
        "SELECT 1 FROM pg_database WHERE datname = 'ecoworker'")" != 1 ]; then
        "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres ecoworker ||
            die "createdb ecoworker failed"
    fi
    log "postgres  up   127.0.0.1:$PG_PORT db ecoworker ($(_secs "$t"))"
}

pg_stop() { # MODE
    local pid t
    pid=$(pg_pid)
    [ -n "$pid" ] || return 0
    t=$(_now_us)
    write_pg_ctl_wrapper
    "$BIN_DIR/pg_ctl" stop -m "${1:-fast}" -w -t 60 -s >"$PG_DIR/pg_ctl.out" 2>&1 || {
        log "pg_ctl stop failed; signalling postmaster $pid"
        kill -QUIT "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || kill_wait "$pid" postgres
    }
    log "postgres  stopped (${1:-fast}, $(_secs "$t"))"
}

# ---------------------------------------------------------------- moto (S3)
moto_pid() {
    local pid
    pid=$(read_pid "$MOTO_PIDFILE")
    pid_alive "$pid" && pid_cmdline "$pid" | grep -q -- "moto_server.* -p $S3_PORT" && printf '%s' "$pid"
    return 0
}

moto_launch() {
    MOTO_WAS_UP=0
    if [ -n "$(moto_pid)" ]; then MOTO_WAS_UP=1; return 0; fi
    port_open "$S3_PORT" && die "port $S3_PORT is taken by another process"
    MOTO_T0=$(_now_us)
    setsid nohup "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" \
        </dev/null >"$MOTO_LOG" 2>&1 &
    echo $! >"$MOTO_PIDFILE"
}

moto_wait() {
    [ "${MOTO_WAS_UP:-0}" = 1 ] && { log "s3 (moto) already running (127.0.0.1:$S3_PORT)"; return 0; }
    local pid i
    pid=$(read_pid "$MOTO_PIDFILE")
    for ((i = 0; i < 600; i++)); do
        if "$MOTO_VENV/bin/python" - "$S3_PORT" 2>/dev/null <<'EOF'
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2).read()
EOF
        then
            log "s3 (moto) up   http://127.0.0.1:$S3_PORT ($(_secs "$MOTO_T0"))"
            return 0
        fi
        pid_alive "$pid" || { tail_log "$MOTO_LOG"; die "moto_server exited during startup"; }
        sleep 0.1
    done
    tail_log "$MOTO_LOG"
    die "moto_server not answering on port $S3_PORT after 60 s"
}

moto_stop() {
    local pid
    pid=$(moto_pid)
    [ -n "$pid" ] || { rm -f "$MOTO_PIDFILE"; return 0; }
    kill_wait "$pid" moto
    rm -f "$MOTO_PIDFILE"
    log "s3 (moto) stopped"
}

# ---------------------------------------------------------------- env file
write_env() {
    {
        echo "RABBITMQ_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT/"
        echo "POSTGRES_DSN=postgresql://postgres@127.0.0.1:$PG_PORT/ecoworker"
        echo "S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT"
        echo "AWS_ACCESS_KEY_ID=testing"
        echo "AWS_SECRET_ACCESS_KEY=testing"
        echo "AWS_DEFAULT_REGION=us-east-1"
        echo "ECOWORKER_RABBIT_NODE=$RABBIT_NODE"
        echo "ECOWORKER_RABBITMQCTL=$BIN_DIR/rabbitmqctl"
        echo "ECOWORKER_PG_CTL=$BIN_DIR/pg_ctl"
        echo "ECOWORKER_STACK_DIR=$STATE"
        echo "ECOWORKER_SERVICES_SH=$SELF"
    } >"$ENV_FILE.tmp"
    mv -f "$ENV_FILE.tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------- commands
preflight_ports() { # fail before starting anything if a port we need is taken
    local p taken=()
    if [ -z "$(rabbit_pid)" ]; then
        for p in "$AMQP_PORT" "$DIST_PORT"; do port_open "$p" && taken+=("$p"); done
    fi
    if [ -z "$(pg_pid)" ]; then port_open "$PG_PORT" && taken+=("$PG_PORT"); fi
    if [ -z "$(moto_pid)" ]; then port_open "$S3_PORT" && taken+=("$S3_PORT"); fi
    [ ${#taken[@]} -eq 0 ] || die "port(s) ${taken[*]} already in use by other processes (override with ECOWORKER_*_PORT)"
}

cmd_up() {
    need_root
    init_state
    ensure_packages
    check_reachable
    preflight_ports
    rabbit_launch        # slowest: boots while the rest is set up
    ensure_moto_venv
    moto_launch
    pg_start
    moto_wait
    rabbit_wait
    write_env
    log "stack up in $(_secs "$T_START"); env: $ENV_FILE"
}

cmd_down() {
    local purge=0
    [ "${1:-}" = --purge ] && purge=1
    if [ ! -e "$MARKER" ]; then
        log "nothing to stop ($STATE is not a stack dir)"
        return 0
    fi
    need_root
    moto_stop
    rabbit_stop
    epmd_stop
    pg_stop fast
    rm -f "$ENV_FILE"
    if [ "$purge" = 1 ]; then
        rm -rf -- "$STATE"
        log "purged $STATE"
    fi
    log "stack down ($(_secs "$T_START"))"
}

cmd_pids() { # "name pid" for every live process of this stack
    local p
    p=$(rabbit_pid); [ -n "$p" ] && echo "rabbitmq $p"
    p=$(read_pid "$RMQ_LAUNCHER_PIDFILE"); pid_alive "$p" && echo "rabbitmq-launcher $p"
    for p in $(epmd_pids); do echo "epmd $p"; done
    p=$(pg_pid); [ -n "$p" ] && echo "postgres $p"
    p=$(moto_pid); [ -n "$p" ] && echo "moto $p"
    return 0
}

cmd_status() {
    local rc=0 p
    p=$(rabbit_pid)
    if [ -n "$p" ] && port_open "$AMQP_PORT"; then
        printf '%-9s running  pid %-7s amqp://127.0.0.1:%s node %s\n' rabbitmq "$p" "$AMQP_PORT" "$RABBIT_NODE"
    else printf '%-9s stopped\n' rabbitmq; rc=3; fi
    p=$(pg_pid)
    if [ -n "$p" ] && port_open "$PG_PORT"; then
        printf '%-9s running  pid %-7s 127.0.0.1:%s\n' postgres "$p" "$PG_PORT"
    else printf '%-9s stopped\n' postgres; rc=3; fi
    p=$(moto_pid)
    if [ -n "$p" ] && port_open "$S3_PORT"; then
        printf '%-9s running  pid %-7s http://127.0.0.1:%s\n' s3-moto "$p" "$S3_PORT"
    else printf '%-9s stopped\n' s3-moto; rc=3; fi
    return $rc
}

cmd_env() {
    [ -f "$ENV_FILE" ] || die "no env file at $ENV_FILE (run: services.sh up)"
    if [ "${1:-}" = --export ]; then sed 's/^/export /' "$ENV_FILE"; else cat "$ENV_FILE"; fi
}

usage() {
    sed -n '6,8p' "$SELF" | sed 's/^# //' >&2
    exit 2
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case "$cmd" in
    up) cmd_up ;;
    down) cmd_down "$@" ;;
    env) cmd_env "$@" ;;
    status) cmd_status ;;
    pids) cmd_pids ;;
    stop-rabbit) need_root; rabbit_stop ;;
    start-rabbit) need_root; rabbit_launch; rabbit_wait ;;
    restart-rabbit) need_root; rabbit_stop; rabbit_launch; rabbit_wait ;;
    stop-pg) need_root; pg_stop "${1:-fast}" ;;
    start-pg) need_root; pg_start ;;
    *) usage ;;
    esac
}

main "$@"
