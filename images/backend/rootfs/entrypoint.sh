#!/bin/sh
# PID 1 of the backend test image: busybox httpd on $PORT (default 80).
# On SIGTERM/SIGINT it answers every request with 503 for $STOP_DELAY seconds
# (default 0), so a load balancer's drain can be watched, then exits 0.
httpd -f -p "${PORT:-80}" -h /www &
httpd_pid=$!

stop() {
    trap '' TERM INT
    touch /run/draining
    sleep "${STOP_DELAY:-0}"
    kill "$httpd_pid"
    exit 0
}

trap stop TERM INT
wait "$httpd_pid"
