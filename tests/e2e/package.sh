#!/usr/bin/env bash
# The Debian package (issue 14, acceptance 1): packaging/build-deb.sh builds it from the
# release binary; lintian (pedantic) reports nothing that is not overridden with a reason;
# `dpkg -i` installs every file where the unit and the docs say; the installed man pages,
# completions, unit (systemd-analyze verify) and config (a daemon starts from it) work from
# the installed paths; `dpkg --purge` leaves nothing behind.
source "$(dirname "$0")/lib.sh"

if dpkg-query -W -f='${Status}' snapblk 2>/dev/null | grep -q installed; then
    fail "a snapblk package is already installed on this machine; not touching it"
fi
command -v lintian >/dev/null || fail "lintian not installed (scripts/setup.sh installs it)"

log "build the package"
deb=$(SNAPBLK_BIN="$SNAPBLK_BIN" bash "$(dirname "$0")/../../packaging/build-deb.sh" "$T/deb")
[ -f "$deb" ] || fail "no package built"
dpkg-deb -f "$deb" Depends | grep -q "libc6" || fail "no dependency on libc6: $(dpkg-deb -f "$deb" Depends)"

log "lintian --pedantic: nothing but explained overrides"
TMPDIR="$T" lintian --pedantic --fail-on error,warning,info,pedantic "$deb" >"$T/lintian.out" 2>&1 \
    || { cat "$T/lintian.out"; fail "lintian"; }
grep -v "^running with root privileges" "$T/lintian.out" | grep -q . && { cat "$T/lintian.out"; fail "lintian printed tags"; }

log "dpkg -i: every file where the unit and the docs say"
defer "dpkg --purge snapblk"
dpkg -i "$deb" >"$T/dpkg.out" 2>&1 || { cat "$T/dpkg.out"; fail "dpkg -i"; }
for f in /usr/bin/snapblk /lib/systemd/system/snapblk.service /lib/udev/rules.d/99-snapblk.rules \
    /etc/snapblk/snapblk.toml /usr/share/man/man1/snapblk.1.gz /usr/share/man/man1/snapblk-backup.1.gz \
    /usr/share/bash-completion/completions/snapblk /usr/share/zsh/vendor-completions/_snapblk \
    /usr/share/fish/vendor_completions.d/snapblk.fish /usr/share/doc/snapblk/copyright; do
    [ -f "$f" ] || fail "$f not installed"
done
dpkg -L snapblk >"$T/files"
grep -q "^/etc/snapblk/snapblk.toml$" "$T/files" || fail "config not in the package's file list"
dpkg-query -W -f='${Conffiles}' snapblk | grep -q /etc/snapblk/snapblk.toml || fail "config is not a conffile"
grep -q "ExecStart=/usr/bin/snapblk daemon --config /etc/snapblk/snapblk.toml" /lib/systemd/system/snapblk.service \
    || fail "the unit does not start the installed binary with the installed config"
grep -q 'PROGRAM="/usr/bin/snapblk udev-name' /lib/udev/rules.d/99-snapblk.rules || fail "udev rule path"
/usr/bin/snapblk --version | grep -q "^snapblk " || fail "installed binary --version"

log "man pages and completions from the installed paths"
[ "$(man -w snapblk)" = /usr/share/man/man1/snapblk.1.gz ] || fail "man -w snapblk: $(man -w snapblk)"
MANWIDTH=80 man snapblk-backup 2>/dev/null | grep -q -- "--to" || fail "man snapblk-backup"
MANWIDTH=80 man snapblk-daemon 2>/dev/null | grep -q -- "--metrics-listen" || fail "man snapblk-daemon"
bash -c 'source /usr/share/bash-completion/completions/snapblk && complete -p snapblk' | grep -q snapblk \
    || fail "bash completion does not register"
grep -q "compdef snapblk" /usr/share/zsh/vendor-completions/_snapblk || fail "zsh completion"
grep -q "complete -c snapblk" /usr/share/fish/vendor_completions.d/snapblk.fish || fail "fish completion"

log "the installed unit verifies; the installed config starts a daemon"
systemd-analyze verify /lib/systemd/system/snapblk.service >"$T/verify.out" 2>&1 \
    || { cat "$T/verify.out"; fail "systemd-analyze verify"; }
grep -v "^$" "$T/verify.out" | grep -q . && { cat "$T/verify.out"; fail "systemd-analyze verify printed warnings"; }
create_pool 1G
/usr/bin/snapblk --meta "$META" --data "$DATA" --socket "$SNAPBLK_SOCKET" daemon \
    --config /etc/snapblk/snapblk.toml --nbd-socket "$NBD_SOCK" >>"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 100); do
    /usr/bin/snapblk volume list >/dev/null 2>&1 && break
    sleep 0.1
done
/usr/bin/snapblk volume create v --size 16M >/dev/null || fail "the installed daemon does not answer"
qemu-io -f raw -c "write -P 0x5a 0 1M" "$(uri v)" >/dev/null || fail "NBD from the installed daemon"
stop_daemon

log "dpkg -r keeps the config, --purge removes everything"
dpkg -r snapblk >/dev/null 2>&1 || fail "dpkg -r"
[ -e /usr/bin/snapblk ] && fail "binary left after dpkg -r"
[ -f /etc/snapblk/snapblk.toml ] || fail "dpkg -r removed the conffile"
dpkg --purge snapblk >/dev/null 2>&1 || fail "dpkg --purge"
while read -r f; do
    [ -d "$f" ] && continue
    [ -e "$f" ] && fail "$f left after purge"
done <"$T/files"
log "package: ok"
