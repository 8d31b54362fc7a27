#!/usr/bin/env bash
# Short-lived S3 credentials: a credential_process hands out keys that expire 20 s after it
# is asked. A backup in the daemon and a verify --read-data in the CLI, each slowed to
# ~25 s by the proxy, must ask it again while they run (the SDK's chain refreshes them;
# they are never resolved once and frozen) and complete. The CLI hands the daemon the
# profile, not the keys, when the keys expire.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/s3lib.sh"
jq_() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
start_s3
start_proxy
create_pool 1G
# Neither the daemon nor the CLI has keys of its own: only the profile's process.
KEY_ID=$AWS_ACCESS_KEY_ID
KEY_SECRET=$AWS_SECRET_ACCESS_KEY
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
start_daemon
cat >"$T/creds.sh" <<SH
#!/bin/sh
date +%s >>"$T/creds.calls"
exp=\$(date -u -d "+20 seconds" +%Y-%m-%dT%H:%M:%SZ)
printf '{"Version":1,"AccessKeyId":"%s","SecretAccessKey":"%s","Expiration":"%s"}\n' "$KEY_ID" "$KEY_SECRET" "\$exp"
SH
chmod +x "$T/creds.sh"
printf '[profile shortlived]\ncredential_process = %s\n' "$T/creds.sh" >"$T/aws-config"
export AWS_CONFIG_FILE=$T/aws-config AWS_PROFILE=shortlived AWS_SHARED_CREDENTIALS_FILE=$T/none
head -c 32 /dev/urandom >"$T/key"
export SNAPBLK_KEY_FILE=$T/key
S3=s3://snapblk-test/creds

snapblk repo init "$S3" --pack-size 1M >/dev/null || fail "repo init with process credentials"
snapblk volume create v --size 16M >/dev/null
head -c 8M /dev/urandom >"$T/data"; nbdcopy "$T/data" "$(uri v)"
snapblk snapshot create v@s >/dev/null

# calls_during START END: credential_process calls between two epoch seconds
calls_during() { awk -v a="$1" -v b="$2" '$1 > a + 3 && $1 <= b' "$T/creds.calls" | wc -l; }

log "a backup in the daemon, throttled to ~25 s"
fault throttle rate=320
t0=$(date +%s)
snapblk --json backup v@s --to "$S3" >"$T/b.json" || fail "backup with expiring credentials"
t1=$(date +%s)
log "backup took $((t1 - t0)) s; credential_process asked $(calls_during "$t0" "$t1") times after its first 3 s"
[ $((t1 - t0)) -ge 20 ] || fail "the backup was not slow enough to outlive its credentials ($((t1 - t0)) s)"
[ "$(calls_during "$t0" "$t1")" -ge 1 ] || fail "the credentials were not fetched again during the backup"

log "verify --read-data in the CLI, throttled"
t0=$(date +%s)
snapblk backup verify "$S3" --read-data >"$T/v.out" || { cat "$T/v.out"; fail "verify with expiring credentials"; }
t1=$(date +%s)
log "verify took $((t1 - t0)) s; credential_process asked $(calls_during "$t0" "$t1") times after its first 3 s"
[ $((t1 - t0)) -ge 20 ] || fail "verify was not slow enough ($((t1 - t0)) s)"
[ "$(calls_during "$t0" "$t1")" -ge 1 ] || fail "the credentials were not fetched again during verify"
fault pass

snapblk restore "$S3" v@s --as r >/dev/null || fail "restore"
qemu-img compare -q -f raw -F raw "$(uri v@s)" "$(uri r)" || fail "restored volume differs"
log "s3_credentials: all checks passed"
