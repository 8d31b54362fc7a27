#!/usr/bin/env bash
# What an admin installs next to the binary (issue 14): `--version` names the commit, shell
# completions are valid scripts that know the subcommands, and the man pages (one per
# command, generated from the same definitions as the CLI) render without warnings.
source "$(dirname "$0")/lib.sh"

snapblk --version | grep -qE "^snapblk [0-9.]+ \(commit [0-9a-f]{12}(-dirty)?\)$" \
    || fail "--version: $(snapblk --version)"

snapblk completions bash > "$T/snapblk.bash"
bash -n "$T/snapblk.bash" || fail "bash completion is not valid bash"
( set +u; source "$T/snapblk.bash"; COMP_WORDS=(snapblk pol); COMP_CWORD=1; _snapblk snapblk pol snapblk; printf '%s\n' "${COMPREPLY[@]}" ) \
    | grep -qx policy || fail "bash completion does not complete 'pol' to 'policy'"
snapblk completions zsh | grep -q "#compdef snapblk" || fail "zsh completion"
snapblk completions fish | grep -q "complete -c snapblk" || fail "fish completion"
snapblk completions bash | head -1 >/dev/null # a closed pipe is not an error

snapblk manpages "$T/man" >/dev/null
n=$(ls "$T/man" | wc -l)
[ "$n" -ge 40 ] || fail "only $n man pages"
for p in snapblk.1 snapblk-volume-create.1 snapblk-policy-set.1 snapblk-group-create.1; do
    [ -f "$T/man/$p" ] || fail "no $p"
done
ls "$T/man" | grep -q -- "-help" && fail "pages for clap's help subcommands"
command -v man >/dev/null || fail "man is not installed (scripts/setup.sh installs man-db)"
for p in "$T"/man/*.1; do
    out=$(MANWIDTH=80 man --warnings -l "$p" 2>&1 >/dev/null) || fail "man $p"
    [ -z "$out" ] || fail "man warns about $(basename "$p"): $out"
    # apropos/whatis need "name - description" (a command without a doc comment has none).
    lexgrog "$p" | grep -q ' - ' || fail "$(basename "$p") has no NAME description (a doc comment on its command)"
done
MANWIDTH=80 man -l "$T/man/snapblk-policy-set.1" 2>/dev/null | grep -q -- "--keep-hourly" \
    || fail "policy set page lacks its options"
log "cli_docs: ok"
