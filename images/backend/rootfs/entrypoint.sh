#!/bin/sh
# PID 1 of the backend test image: busybox httpd on $PORT (default 80).
# On SIGTERM/SIGINT it keeps serving for $STOP_DELAY seconds (default 0), answering
# with status $DRAIN_STATUS (default 503; 200 serves normally, like an app that finishes
# its work), so a load balancer's drain can be watched, then exits 0.
httpd -f -p "${PORT:-80}" -h /www &
httpd_pid=$!

stop() {
    trap '' TERM INT
    echo "${DRAIN_STATUS:-503}" > /run/draining
    sleep "${STOP_DELAY:-0}"
    kill "$httpd_pid"
    exit 0
}

trap stop TERM INT
wait "$httpd_pid"
