#!/bin/sh
# One HTTP request: nc (see /entrypoint.sh) runs this per connection, the socket as stdin and
# stdout. Any path answers 200 with the container's name; ?ms=N on any path (as in the tests'
# /cgi-bin/slow?ms=N) waits N milliseconds first; while the container drains, 503 at once
# unless DRAIN_STATUS=200. The path /health (exactly; any query ignored, and so are ?ms and
# DELAY_MS) answers at once as the mode in /run/health says (see /health.sh): none or ok, 200
# "ok"; a status 100 to 599, that status with the body "health NNN" (no body for 1xx, 204 and
# 304); hang, no reply until the client closes (600 s at most; nc runs each connection in a
# process of its own, so the others are served meanwhile, and a stop ends it with PID 1);
# close, the connection closes without a reply; anything else, 500 "bad /run/health". While
# draining, /health answers 503 like every path. The request line and headers are a client's:
# they are only matched with `case` and cut with parameter expansion, never evaluated, and
# globbing is off so that splitting the query can't expand to file names.
set -f
cr=$'\r'

answer() { # STATUS BODY: the whole reply; the connection closes after it
    case $1 in 1??' '* | 204' '* | 304' '*) # statuses that never have a body
        printf 'HTTP/1.0 %s\r\nConnection: close\r\n\r\n' "$1"
        exit 0 ;;
    esac
    printf 'HTTP/1.0 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n' \
        "$1" "$((${#2} + 1))"
    printf 'Connection: close\r\n\r\n'
    [ "$method" = HEAD ] || printf '%s\n' "$2"
    exit 0
}

health() { # the reply to /health, as the mode in /run/health says
    mode=ok
    # Written by /health.sh, but any process in the container may write it: at most 9 bytes
    # are read, and a byte no mode has (a NUL, which the shell would drop) becomes '?'.
    [ ! -e /run/health ] || mode=$(head -c 9 /run/health 2> /dev/null | tr -c 'a-z0-9\n' '?')
    case $mode in
        ok) answer '200 OK' ok ;;
        hang) timeout 600 cat > /dev/null ;; # the client's close is the end of our input
        close) ;;
        [1-5][0-9][0-9])
            case $mode in
                200) reason=OK ;;
                204) reason='No Content' ;;
                404) reason='Not Found' ;;
                500) reason='Internal Server Error' ;;
                502) reason='Bad Gateway' ;;
                503) reason='Service Unavailable' ;;
                504) reason='Gateway Timeout' ;;
                *) reason=Health ;;
            esac
            answer "$mode $reason" "health $mode" ;;
        *) answer '500 Internal Server Error' 'bad /run/health' ;;
    esac
    exit 0
}

lookup_name() { # sets $name and caches it in /run/name; fails while there is none to find
    # Docker's embedded DNS (127.0.0.11, on user-defined networks only) answers a container's
    # own address with "<container name>.<network name>". Asked on the first request, not at
    # start, when it may not know the container yet.
    grep -qx 'nameserver 127.0.0.11' /etc/resolv.conf || return 1
    for ip in $(ip -o -4 addr show scope global | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p'); do
        found=$(timeout 2 nslookup "$ip" 127.0.0.11 2> /dev/null |
            sed -n '/name = /{s/.*name = //p;q}')
        found=${found%.}
        # Drop ".<network name>" (a network name with dots would leave its first part).
        case $found in *.*) found=${found%.*} ;; *) continue ;; esac
        case $found in '' | *[!A-Za-z0-9_.-]*) continue ;; esac
        printf '%s\n' "$found" > "/run/name.$$" && mv -f "/run/name.$$" /run/name
        name=$found
        return 0
    done
    return 1
}

IFS=' ' read -r -t 10 method target version || exit 0
case ${version%"$cr"} in HTTP/1.[01]) ;; *)
    answer '400 Bad Request' 'expected a request line "METHOD /path HTTP/1.x"' ;;
esac
case $target in /*) ;; *) answer '400 Bad Request' 'the path must start with /' ;; esac

# Read the whole request (closing a socket with unread bytes resets the connection).
length=0
headers=0
while read -r -t 10 line; do
    line=${line%"$cr"}
    [ -n "$line" ] || break
    headers=$((headers + 1))
    [ "$headers" -le 100 ] || answer '431 Request Header Fields Too Large' 'over 100 headers'
    case $line in
        [Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]:*)
            length=${line#*:}
            length=${length#"${length%%[! ]*}"}
            case $length in '' | *[!0-9]* | ??????????*)
                answer '400 Bad Request' 'Content-Length must be 1 to 9 digits' ;;
            esac ;;
    esac
done
[ "$length" = 0 ] || timeout 10 head -c "$length" > /dev/null

if [ -e /run/draining ] && read -r draining < /run/draining && [ "$draining" != 200 ]; then
    answer '503 Service Unavailable' 'draining'
fi
case $target in /health | /health\?*) health ;; esac

ms=${DELAY_MS:-0} # DELAY_MS: a backend slow on every path (least_time tests)
case $target in *\?*) query=${target#*\?} ;; *) query= ;; esac
IFS='&'
for param in $query; do
    case $param in ms=*) ms=${param#ms=} ;; esac
done
unset IFS
case $ms in '' | *[!0-9]*) answer '400 Bad Request' 'ms must be digits' ;; esac
ms=${ms#"${ms%%[!0]*}"} # no leading zeros: $((...)) would read them as octal
[ "${#ms}" -le 6 ] || answer '400 Bad Request' 'ms must be at most 999999'
[ -z "$ms" ] || usleep "$((ms * 1000))"

[ -s /run/name ] && read -r name < /run/name || lookup_name || name=$(hostname)
answer '200 OK' "$name"
