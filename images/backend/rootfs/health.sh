#!/bin/sh
# Sets what /health answers (see /reply.sh): `docker exec CONTAINER /health.sh MODE`, where
# MODE is ok (200 "ok"), an HTTP status 100 to 599 (that status), hang (no reply until the
# client closes) or close (closes without a reply); the entrypoint calls it for $HEALTH. The
# mode is written to a temporary file and renamed, so a request never reads half of one.
case $# in 1) ;; *) set -- "$*" ;; esac # none or several words: refused below, as given
case $1 in ok | hang | close | [1-5][0-9][0-9]) ;; *)
    echo "health.sh: the mode must be ok, hang, close or an HTTP status 100 to 599, not '$1'" >&2
    exit 2 ;;
esac
printf '%s\n' "$1" > "/run/health.$$" && mv -f "/run/health.$$" /run/health
