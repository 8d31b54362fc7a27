# In the VM: the packaged unit (packaging/snapblk.service, every hardening option on) run
# by a real systemd. systemd runs as PID 1 of a new PID and mount namespace (container
# mode: the guest's own init is virtme's), with the packaged config. Checks: `systemctl
# start` returns only after READY=1 and the daemon then serves its control socket; status
# text names the volumes; the hardening is in force (NoNewPrivs, a private /tmp); with
# WatchdogSec=3s the service outlives many watchdog periods without a restart (WATCHDOG=1
# arrives); an ublk device attached through the service carries ext4; `systemctl stop`
# ends it cleanly (result success, the device detached); after a second start, kill -9
# makes systemd restart it (Restart=on-failure) and the new daemon takes the attached
# device back; the data is the same and fsck is clean.
# (Man pages are checked by tests/e2e/package.sh; verify here skips them.)
# Note: systemd's boot runs systemd-tmpfiles, which empties /tmp: nothing of this test
# lives there.
VM_T_DIR=/srv source "$(dirname "$0")/lib.sh"
SRC=$(cd "$(dirname "$0")/../.." && pwd)
SD=
cleanup() {
    [ -n "$SD" ] || return 0
    inns umount /srv/mnt 2>/dev/null || true
    inns systemctl stop snapblk 2>/dev/null || true
    inns systemctl exit 2>/dev/null || kill -9 "$SD" 2>/dev/null || true
}
trap cleanup EXIT
# Runs a command in systemd's namespaces (where its /run, and the service's sockets, are).
inns() { nsenter -t "$SD" -m -p -- "$@"; }
sdfail() {
    inns systemctl status --no-pager snapblk 2>&1 | tail -20 || true
    inns journalctl --no-pager -b -u snapblk 2>&1 | tail -30 || true
    fail "$@"
}
prop() { inns systemctl show -P "$1" snapblk; }

modprobe ublk_drv
log "installing the binary, unit and config where the package puts them"
install -m 0755 "$BIN" /usr/bin/snapblk
install -D -m 0644 "$SRC/packaging/snapblk.service" /etc/systemd/system/snapblk.service
install -D -m 0644 "$SRC/packaging/snapblk.toml" /etc/snapblk/snapblk.toml
mkdir -p /etc/systemd/system/snapblk.service.d
cat >/etc/systemd/system/snapblk.service.d/vm-test.conf <<'EOF'
[Service]
WatchdogSec=3s
Environment=RUST_LOG=warn,snapblk=info
EOF
printf '[Unit]\nDescription=snapblk VM test (nothing else)\n' >/etc/systemd/system/snapblk-vm-test.target
mkdir -p /var/lib/snapblk
/usr/bin/snapblk pool create --meta /var/lib/snapblk/meta --data /var/lib/snapblk/data.img --size 1G >/dev/null

log "starting systemd (container mode) in new PID and mount namespaces"
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
unshare --pid --fork --mount-proc -- env container=snapblk-vm \
    /lib/systemd/systemd --system --unit=snapblk-vm-test.target --log-target=console \
    >"$T/systemd.log" 2>&1 &
ushare=$!
st=
for _ in $(seq 1 600); do
    SD=$(pgrep -P "$ushare" -x systemd || true)
    if [ -n "$SD" ]; then
        st=$(inns systemctl is-system-running 2>/dev/null || true)
        case $st in running|degraded) break ;; esac
    fi
    sleep 0.5
done
case $st in running|degraded) ;; *) SD= ;; esac
[ -n "$SD" ] || { tail -30 "$T/systemd.log"; fail "systemd did not start"; }
log "systemd $(inns systemctl --version | head -1) is up: $(inns systemctl is-system-running || true)"
inns systemd-analyze verify --man=no /etc/systemd/system/snapblk.service || sdfail "systemd-analyze verify"

log "systemctl start snapblk (Type=notify: returns after READY=1)"
timeout 300 nsenter -t "$SD" -m -p -- systemctl start snapblk || sdfail "systemctl start snapblk failed"
[ "$(prop ActiveState)" = active ] || sdfail "not active after start: $(prop ActiveState)"
# READY=1 came after the control socket served: it answers at once.
inns /usr/bin/snapblk --socket /run/snapblk/control.sock pool info >/dev/null || sdfail "active, but the control socket does not answer"
pid=$(prop MainPID)
[ "$(prop WatchdogUSec)" = 3s ] || sdfail "WatchdogUSec=$(prop WatchdogUSec)"
# (MainPID is a pid of systemd's PID namespace.)
inns grep -q "^NoNewPrivs:[[:space:]]*1" "/proc/$pid/status" || sdfail "NoNewPrivileges not in force"
[ "$(inns readlink "/proc/$pid/ns/mnt")" != "$(inns readlink /proc/1/ns/mnt)" ] || sdfail "no private mount namespace (PrivateTmp/ProtectHome)"
snap() { inns /usr/bin/snapblk --socket /run/snapblk/control.sock "$@"; }

log "an ublk device through the service: ext4"
snap volume create v --size 256M >/dev/null
dev=$(snap attach v)
[ -b "$dev" ] || sdfail "$dev is not a block device"
inns mkfs.ext4 -q "$dev"
inns mkdir -p /srv/mnt
inns mount "$dev" /srv/mnt
inns sh -c 'head -c 16M /dev/urandom >/srv/mnt/f && sha256sum /srv/mnt/f >/srv/sum && sync'
inns umount /srv/mnt
sleep 2
status=$(prop StatusText)
log "status text: $status"
case $status in *volume*) ;; *) sdfail "status text does not name the volumes: $status" ;; esac

log "watchdog: 12 s = 4 timeouts of 3 s"
sleep 12
[ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" = "$pid" ] && [ "$(prop NRestarts)" = 0 ] \
    || sdfail "the watchdog killed or restarted the service (pid $(prop MainPID), restarts $(prop NRestarts))"

log "systemctl stop: clean, the device detached"
timeout 300 nsenter -t "$SD" -m -p -- systemctl stop snapblk || sdfail "systemctl stop failed"
[ "$(prop ActiveState)" = inactive ] || sdfail "not inactive after stop: $(prop ActiveState)"
[ "$(prop Result)" = success ] || sdfail "stop result: $(prop Result)"
[ -e "$dev" ] && sdfail "$dev is still there after a clean stop (ublk_on_stop = detach)"

log "second start: same data, fsck clean"
timeout 300 nsenter -t "$SD" -m -p -- systemctl start snapblk || sdfail "second start failed"
dev=$(snap attach v)
pid=$(prop MainPID)
log "kill -9 of the daemon: Restart=on-failure, the new daemon takes the device back"
inns systemctl kill -s KILL snapblk
for _ in $(seq 1 120); do
    [ "$(prop NRestarts)" = 1 ] && [ "$(prop ActiveState)" = active ] && break
    sleep 0.5
done
[ "$(prop NRestarts)" = 1 ] && [ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" != "$pid" ] \
    || sdfail "not restarted after a crash (restarts $(prop NRestarts), state $(prop ActiveState))"
snap list | grep -q "$dev" || sdfail "the restarted daemon did not take $dev back"
inns fsck.ext4 -fn "$dev" >/dev/null || sdfail "fsck after the restart"
inns mount -o ro "$dev" /srv/mnt
inns sha256sum -c /srv/sum >/dev/null || sdfail "the file changed across stop/start"
inns umount /srv/mnt
snap detach "$dev" >/dev/null
timeout 300 nsenter -t "$SD" -m -p -- systemctl stop snapblk || sdfail "final stop failed"
log "systemd: all checks passed"
