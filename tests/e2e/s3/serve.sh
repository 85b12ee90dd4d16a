#!/bin/sh
# moto on loopback, nginx in front; the container ends when either does.
set -eu
/usr/bin/moto_server -H 127.0.0.1 -p 5000 &
moto=$!
nginx -c /etc/transvidio-e2e/nginx.conf &
nginx=$!
while kill -0 "$moto" 2>/dev/null && kill -0 "$nginx" 2>/dev/null; do
    sleep 1
done
kill "$moto" "$nginx" 2>/dev/null || true
exit 1
