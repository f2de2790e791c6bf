#!/usr/bin/env bash
# Start/stop a REAL Slurm cluster on this machine, for tests and CI: one slurmctld and one slurmd per node,
# QFORGE_SLURM_NODES of them (default 2) on one host. Debian's slurm-wlm 22.05 allows several slurmd per host
# (`slurmd -N <node>`, a Port per node, %n in the pid/spool/log paths), so multi-node jobs run for real: srun
# starts one task per node, `scontrol show hostnames` lists every node.
#
# Usage:
#   tests/slurm/cluster.sh install        # apt-get install slurm-wlm + munge if missing
#   tests/slurm/cluster.sh start DIR      # fresh cluster rooted at DIR; last line printed is
#                                         #   export SLURM_CONF=DIR/slurm.conf
#   tests/slurm/cluster.sh status DIR     # exit 0 if the daemons are up and the node answers
#   tests/slurm/cluster.sh stop DIR       # cancel jobs, stop daemons by pid file (idempotent)
#
# Typical use:  eval "$(tests/slurm/cluster.sh start /tmp/qf-slurm | tail -n1)"
#
# Assumptions / limits:
#   * Debian/Ubuntu, running as root, no systemd needed (daemons are started by hand).
#   * Only ONE cluster may run at a time on a machine: all instances use the same node
#     names (qforge1, qforge2, ...). `start` refuses to run if the ports are already in use;
#     stop the other DIR first.
#   * Ports: QFORGE_SLURMCTLD_PORT (default 16817); QFORGE_SLURMD_PORTS, one per node, comma-separated
#     (default 16818,16819, ...).
#   * QFORGE_SLURM_CRED_EXPIRE (default 10 s) is AuthInfo cred_expire; Slurm also uses it
#     as the delay before a requeued job becomes eligible again (Slurm default: 120 s).
#   * QFORGE_SLURM_START_TIMEOUT (default 60 s) bounds the wait for the node to be idle.
#   * Munge: a private munged (own key/socket/pid/log under DIR/munge) is started when
#     munged supports --socket; otherwise a running system munged is reused (and started,
#     then later stopped, only if none is running).
#   * Finished jobs stay visible to `scontrol show job` for MinJobAge=300 s (no accounting,
#     so sacct is not available).
set -euo pipefail

CTLD_PORT="${QFORGE_SLURMCTLD_PORT:-16817}"
NODE_COUNT="${QFORGE_SLURM_NODES:-2}"
IFS=, read -r -a SLURMD_PORTS <<< "${QFORGE_SLURMD_PORTS:-$(seq -s, 16818 $(( 16817 + NODE_COUNT )))}"
if [ "${#SLURMD_PORTS[@]}" -lt "$NODE_COUNT" ]; then
    echo "cluster.sh: ERROR: QFORGE_SLURMD_PORTS names fewer ports than QFORGE_SLURM_NODES=$NODE_COUNT" >&2
    exit 1
fi
NODE_NAMES=()
for i in $(seq 1 "$NODE_COUNT"); do NODE_NAMES+=("qforge$i"); done
CRED_EXPIRE="${QFORGE_SLURM_CRED_EXPIRE:-10}"
START_TIMEOUT="${QFORGE_SLURM_START_TIMEOUT:-60}"
HOST="$(hostname -s)"

die() { echo "cluster.sh: ERROR: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

abs_dir() {
    [ -n "${1:-}" ] || die "missing DIR argument"
    mkdir -p "$1"
    (cd "$1" && pwd -P)
}

pid_alive() {  # pidfile -> 0 if the process in it is running
    local f="$1" pid
    [ -s "$f" ] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

kill_pidfile() {  # pidfile name -> TERM, wait up to 15 s, then KILL
    local f="$1" name="$2" pid i
    [ -s "$f" ] || return 0
    pid="$(tr -dc '0-9' <"$f")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 75); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) did not exit on TERM; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    rm -f "$f"
}

port_in_use() {  # port -> 0 if something listens on 127.0.0.1:port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

show_logs() {
    local d="$1" f
    for f in "$d"/log/slurmctld.log "$d"/log/slurmd-*.log "$d"/munge/munged.log; do
        [ -f "$f" ] || continue
        echo "----- tail -n 40 $f -----" >&2
        tail -n 40 "$f" >&2 || true
    done
}

cmd_install() {
    if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
        log "slurm already installed: $(slurmctld -V 2>/dev/null || true)"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -E"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    command -v slurmctld >/dev/null 2>&1 || die "slurmctld still missing after apt-get install"
    log "installed: $(slurmctld -V)"
}

start_munge() {  # DIR -> echoes the munge socket path
    local d="$1" m="$1/munge" sock i
    if munged --help 2>&1 | grep -q -- '--socket'; then
        mkdir -p "$m"
        chmod 0755 "$m"  # socket must be reachable by job users; key itself is 0400
        if [ ! -s "$m/munge.key" ]; then
            if command -v mungekey >/dev/null 2>&1; then
                mungekey --create --keyfile="$m/munge.key" --force >/dev/null 2>&1 ||
                    dd if=/dev/urandom of="$m/munge.key" bs=1 count=1024 status=none
            else
                dd if=/dev/urandom of="$m/munge.key" bs=1 count=1024 status=none
            fi
        fi
        chmod 0400 "$m/munge.key"
        sock="$m/munge.socket"
        munged --force --socket="$sock" --key-file="$m/munge.key" \
            --pid-file="$m/munged.pid" --log-file="$m/munged.log" \
            --seed-file="$m/munged.seed" >>"$m/munged.start.log" 2>&1 ||
            { cat "$m/munged.start.log" >&2; die "munged failed to start"; }
        echo own >"$d/munge.mode"
    else
        # Old munged without --socket: reuse the system one (start it if needed).
        sock="/run/munge/munge.socket.2"
        if pgrep -x munged >/dev/null 2>&1; then
            echo system >"$d/munge.mode"
        else
            [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; chmod 0400 /etc/munge/munge.key; }
            mkdir -p /run/munge
            munged --force || die "munged failed to start"
            echo started-system >"$d/munge.mode"
        fi
    fi
    for i in $(seq 1 50); do
        [ -S "$sock" ] && break
        sleep 0.1
    done
    [ -S "$sock" ] || die "munge socket $sock did not appear"
    if command -v munge >/dev/null 2>&1; then
        munge -n --socket="$sock" | unmunge --socket="$sock" >/dev/null 2>&1 ||
            die "munge self-test failed on $sock"
    fi
    echo "$sock"
}

write_conf() {  # DIR sock
    local d="$1" sock="$2" cpus avail_mb mem_mb
    cpus="$(nproc)"
    avail_mb="$(awk '/^MemAvailable:/ {print int($2/1024)}' /proc/meminfo)"
    [ -n "$avail_mb" ] || avail_mb="$(awk '/^MemFree:/ {print int($2/1024)}' /proc/meminfo)"
    mem_mb=$(( avail_mb - 1024 ))
    [ "$mem_mb" -ge 256 ] || mem_mb=256
    cat >"$d/slurm.conf" <<EOF
# Generated by tests/slurm/cluster.sh: a throwaway test cluster, ${NODE_COUNT} slurmd on one host.
ClusterName=qforge
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORTS[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${sock},cred_expire=${CRED_EXPIRE}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Fast scheduling passes so requeued/held jobs restart within seconds, not minutes.
SchedulerParameters=bf_interval=1,sched_interval=2
PreemptMode=OFF
PreemptType=preempt/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
MessageTimeout=10
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
Waittime=0
OverTimeLimit=0
StateSaveLocation=${d}/state
SlurmdSpoolDir=${d}/spool/%n
SlurmctldPidFile=${d}/slurmctld.pid
SlurmdPidFile=${d}/slurmd-%n.pid
SlurmctldLogFile=${d}/log/slurmctld.log
SlurmdLogFile=${d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
    local i
    for i in "${!NODE_NAMES[@]}"; do
        echo "NodeName=${NODE_NAMES[$i]} NodeAddr=127.0.0.1 NodeHostname=${HOST} Port=${SLURMD_PORTS[$i]}" \
            "CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN" >>"$d/slurm.conf"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODE_NAMES[*]}") Default=YES MaxTime=INFINITE State=UP" \
        >>"$d/slurm.conf"
}

node_state() {  # DIR -> "idle" once every node is idle, else the states sinfo reports (or nothing)
    local listing states
    listing="$(SLURM_CONF="$1/slurm.conf" timeout 15 sinfo -h -N -o '%N %T' 2>/dev/null || true)"
    states="$(echo "$listing" | awk 'NF {print $2}' | sort -u | tr '\n' ' ')"
    states="${states% }"
    if [ "$states" = idle ] && [ "$(echo "$listing" | awk 'NF' | wc -l)" -ge "$NODE_COUNT" ]; then
        echo idle
    else
        echo "$states"
    fi
}

cmd_start() {
    local d t0 sock i state
    command -v slurmctld >/dev/null 2>&1 || die "slurm is not installed; run: $0 install"
    d="$(abs_dir "${1:-}")"
    if pid_alive "$d/slurmctld.pid" || pid_alive "$d/slurmd-${NODE_NAMES[0]}.pid"; then
        die "a cluster is already running in $d (run: $0 stop $d)"
    fi
    for p in "$CTLD_PORT" "${SLURMD_PORTS[@]:0:$NODE_COUNT}"; do
        port_in_use "$p" && die "port $p already in use: another cluster (other DIR?) is running; stop it first or set QFORGE_SLURMCTLD_PORT/QFORGE_SLURMD_PORT"
    done
    t0=$(date +%s)
    rm -rf "$d/state" "$d/spool" "$d/log"
    mkdir -p "$d/state" "$d/log" "$d/conf"
    for n in "${NODE_NAMES[@]}"; do mkdir -p "$d/spool/$n"; done
    sock="$(start_munge "$d")"
    write_conf "$d" "$sock"
    cp "$d/slurm.conf" "$d/conf/slurm.conf"
    export SLURM_CONF="$d/slurm.conf"
    slurmctld -f "$d/slurm.conf" -i >>"$d/log/slurmctld.stdout" 2>&1 ||
        { show_logs "$d"; die "slurmctld failed to start"; }
    for n in "${NODE_NAMES[@]}"; do
        slurmd -f "$d/slurm.conf" -N "$n" >>"$d/log/slurmd-$n.stdout" 2>&1 ||
            { show_logs "$d"; die "slurmd of node $n failed to start"; }
    done
    state=""
    for i in $(seq 1 $(( START_TIMEOUT * 2 ))); do
        state="$(node_state "$d")"
        case "$state" in
            idle) break ;;
        esac
        if [ $(( i % 10 )) = 0 ]; then
            pid_alive "$d/slurmctld.pid" || { show_logs "$d"; die "slurmctld died during startup"; }
            for n in "${NODE_NAMES[@]}"; do
                pid_alive "$d/slurmd-$n.pid" || { show_logs "$d"; die "slurmd of node $n died during startup"; }
            done
        fi
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        show_logs "$d"
        die "nodes ${NODE_NAMES[*]} not idle after ${START_TIMEOUT}s (state: '${state:-no answer}')"
    fi
    log "cluster up in $(( $(date +%s) - t0 ))s: $(slurmctld -V), nodes ${NODE_NAMES[*]} idle, dir $d"
    echo "export SLURM_CONF=$d/slurm.conf"
}

leftover_pids() {  # DIR -> pids of slurmstepd / job scripts belonging to this cluster
    # slurmd chdirs to its log dir, so its slurmstepds run with cwd DIR/log; batch
    # scripts run as DIR/spool/jobNNNNN/slurm_script.
    local d="$1" p
    for p in /proc/[0-9]*; do
        if [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] &&
            [ "$(readlink "$p/cwd" 2>/dev/null)" = "$d/log" ]; then
            echo "${p#/proc/}"
        elif tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF "$d/spool/"; then
            echo "${p#/proc/}"
        fi
    done 2>/dev/null
}

cmd_stop() {
    local d pids i
    [ -n "${1:-}" ] || die "missing DIR argument"
    [ -d "$1" ] || { log "nothing to stop: $1 does not exist"; return 0; }
    d="$(cd "$1" && pwd -P)"
    if pid_alive "$d/slurmctld.pid" && [ -f "$d/slurm.conf" ]; then
        # Cancel jobs so slurmstepd/job processes go away cleanly.
        SLURM_CONF="$d/slurm.conf" timeout 15 scancel --quiet --full -w "$(IFS=,; echo "${NODE_NAMES[*]}")" \
            2>/dev/null || true
        for i in $(seq 1 20); do
            [ -z "$(SLURM_CONF="$d/slurm.conf" timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    for f in "$d"/slurmd-*.pid; do
        [ -e "$f" ] && kill_pidfile "$f" slurmd
    done
    kill_pidfile "$d/slurmctld.pid" slurmctld
    # Leftover slurmstepd / job processes of this cluster (found by cwd/script path plus their
    # descendants, killed by pid). Only matters if jobs could not be cancelled above.
    pids="$(leftover_pids "$d" | grep -vx "$$" || true)"
    if [ -n "$pids" ]; then
        pids="$(ps -e -o pid=,ppid= | awk -v roots="$pids" '
            BEGIN { n = split(roots, r, /[ \n]+/); for (i = 1; i <= n; i++) if (r[i] != "") keep[r[i]] = 1 }
            { par[$1] = $2 }
            END { do { changed = 0; for (p in par) if (!(p in keep) && (par[p] in keep)) { keep[p] = 1; changed = 1 } } while (changed)
                  for (p in keep) print p }')"
    fi
    if [ -n "$pids" ]; then
        log "killing leftover processes: $(echo $pids)"
        kill -KILL $pids 2>/dev/null || true
    fi
    if [ -f "$d/munge.mode" ]; then
        case "$(cat "$d/munge.mode")" in
            own) kill_pidfile "$d/munge/munged.pid" munged ;;
            started-system) kill_pidfile /run/munge/munged.pid munged ;;
        esac
        rm -f "$d/munge.mode"
    fi
    log "stopped cluster in $d"
}

cmd_status() {
    local d rc=0 state
    [ -n "${1:-}" ] || die "missing DIR argument"
    [ -d "$1" ] || { echo "not running ($1 does not exist)"; return 3; }
    d="$(cd "$1" && pwd -P)"
    if pid_alive "$d/slurmctld.pid"; then echo "slurmctld: running (pid $(cat "$d/slurmctld.pid"))"; else echo "slurmctld: not running"; rc=3; fi
    for n in "${NODE_NAMES[@]}"; do
        if pid_alive "$d/slurmd-$n.pid"; then echo "slurmd $n: running (pid $(cat "$d/slurmd-$n.pid"))"
        else echo "slurmd $n: not running"; rc=3; fi
    done
    if [ -f "$d/munge.mode" ] && [ "$(cat "$d/munge.mode")" = own ]; then
        if pid_alive "$d/munge/munged.pid"; then echo "munged: running (pid $(cat "$d/munge/munged.pid"))"; else echo "munged: not running"; rc=3; fi
    fi
    if [ "$rc" = 0 ]; then
        state="$(node_state "$d")"
        echo "nodes ${NODE_NAMES[*]}: ${state:-no answer}"
        [ -n "$state" ] || rc=3
        echo "export SLURM_CONF=$d/slurm.conf"
    fi
    return "$rc"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    status) cmd_status "${2:-}" ;;
    *) echo "usage: $0 {install|start DIR|stop DIR|status DIR}" >&2; exit 2 ;;
esac
