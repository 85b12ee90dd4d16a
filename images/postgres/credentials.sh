#!/usr/bin/env bash
# The credentials writer of the PostgreSQL tier (components/container.py: credentials_store).
#   serve  copy the secret files the stack uploaded to the inbox into the store (the volume
#          the nodes mount read-only at /etc/transvidio/secrets), drop any file the stack no
#          longer has, write .generation (a digest of them all), then wait to be stopped;
#   check  healthy when the store holds exactly the inbox's files.
# Every file is replaced by a rename: a reader sees the old content or the new, never half.
set -euo pipefail

INBOX=/etc/transvidio/credentials
STORE=/srv/credentials

generation() { (cd "$1" && find . -maxdepth 1 -type f ! -name '.*' -printf '%f\n' | sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1); }

case "${1:-}" in
serve)
    umask 077
    for file in "$INBOX"/*; do
        name=${file##*/}
        cp "$file" "$STORE/.$name.new"
        chmod 0400 "$STORE/.$name.new"
        mv -f "$STORE/.$name.new" "$STORE/$name"
    done
    for file in "$STORE"/*; do
        [ -e "$file" ] || continue
        [ -e "$INBOX/${file##*/}" ] || rm -f "$file"
    done
    generation "$INBOX" >"$STORE/.generation.new"
    mv -f "$STORE/.generation.new" "$STORE/.generation"
    printf '%s credentials: store at generation %s\n' "$(date -u +%FT%TZ)" "$(cat "$STORE/.generation")" >&2
    trap 'exit 0' TERM INT
    while :; do
        sleep 3600 &
        wait $!
    done
    ;;
check)
    # Runs every few seconds: the inbox's digest once, and no process to read .generation.
    wanted=$(generation "$INBOX")
    [ -s "$STORE/.generation" ] && [ "$(<"$STORE/.generation")" = "$wanted" ] && [ "$(generation "$STORE")" = "$wanted" ]
    ;;
*)
    echo "usage: credentials.sh serve|check" >&2
    exit 64
    ;;
esac
