#!/bin/sh
# PID 1 of the backend test image: an HTTP server on $PORT (default 80) where every path
# answers with the container's name (see /reply.sh). On SIGTERM/SIGINT it keeps serving for
# $STOP_DELAY seconds (default 0), answering with status $DRAIN_STATUS (default 503; 200
# serves normally, like an app that finishes its work), so a load balancer's drain can be
# watched, then exits 0.

# /run is in the container's own layer, kept across `docker stop` + `docker start`: a marker
# left by the last stop would drain the restarted container for good, and the name may have
# changed since (docker rename).
rm -f /run/draining /run/name

# Debian's busybox has no tcpsvd or inetd, and its httpd runs scripts only under /cgi-bin/,
# so nc is the accept loop: -ll keeps accepting and hands each connection to a new /reply.sh;
# every further -l adds one to the listen backlog (16 in all).
nc -llllllllllllllll -p "${PORT:-80}" -e /reply.sh &
server=$!

stop() {
    trap '' TERM INT
    echo "${DRAIN_STATUS:-503}" > /run/draining
    sleep "${STOP_DELAY:-0}"
    kill "$server"
    exit 0
}

trap stop TERM INT
wait "$server"
echo "backend: the server (nc) exited with status $?; the container stops" >&2
exit 1
