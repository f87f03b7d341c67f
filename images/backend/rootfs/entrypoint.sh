#!/bin/sh
# PID 1 of the backend test image: an HTTP server on $PORT (default 80) where every path
# answers with the container's name (see /reply.sh). It starts listening $LISTEN_DELAY_MS
# milliseconds after the container starts (default 0), like an app that warms up first. On
# SIGTERM/SIGINT it keeps serving for $STOP_DELAY seconds (default 0), answering with status
# $DRAIN_STATUS (default 503; 200 serves normally, like an app that finishes its work), so a
# load balancer's drain can be watched, then exits 0. GET /health answers as the health mode
# says: $HEALTH at start (ok, hang, close or a status 100 to 599; unset or empty: ok), then
# whatever `docker exec CONTAINER /health.sh MODE` sets (see /health.sh and /reply.sh).

# /run is in the container's own layer, kept across `docker stop` + `docker start`: a marker
# left by the last stop would drain the restarted container for good, the name may have
# changed since (docker rename), and a restart starts in the health mode its $HEALTH says.
rm -f /run/draining /run/name /run/health

server=
stop() {
    trap '' TERM INT
    echo "${DRAIN_STATUS:-503}" > /run/draining
    sleep "${STOP_DELAY:-0}"
    [ -z "$server" ] || kill "$server"
    exit 0
}

trap stop TERM INT

delay=${LISTEN_DELAY_MS:-0}
case $delay in '' | *[!0-9]* | ???????*)
    echo "backend: LISTEN_DELAY_MS must be 1 to 6 digits (milliseconds), not '$delay'" >&2
    exit 2 ;;
esac
if [ -n "${HEALTH:-}" ] && ! /health.sh "$HEALTH" 2> /dev/null; then
    echo "backend: HEALTH must be ok, hang, close or an HTTP status 100 to 599, not '$HEALTH'" >&2
    exit 2
fi
if [ "$delay" -gt 0 ]; then
    usleep "$((delay * 1000))" & # in the background, so that a stop signal ends the wait
    wait "$!"
fi

# Debian's busybox has no tcpsvd or inetd, and its httpd runs scripts only under /cgi-bin/,
# so nc is the accept loop: -ll keeps accepting and hands each connection to a new /reply.sh;
# every further -l adds one to the listen backlog (16 in all).
nc -llllllllllllllll -p "${PORT:-80}" -e /reply.sh &
server=$!
wait "$server"
echo "backend: the server (nc) exited with status $?; the container stops" >&2
exit 1
