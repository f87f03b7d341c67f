-- controlplane's dynamic data plane: a balancer that takes each service's backends from the
-- state file the controller writes, so a change of backends costs no reload.
-- The rendered config embeds this chunk as `controlplane = (function() <chunk> end)()`, so it
-- is no file and requires nothing but what lua-nginx-module ships (issue 15).
--
-- The controller writes two files (each a staging file renamed over the path): the base
-- (state_path), every service, and the delta over it (delta_path), every service touched
-- since that base, so one changed service costs one line to write. Worker 0 polls both.
--
-- Two shared dicts. Routing (`routes`), written only by the loader (one worker at a time)
-- and only with safe_set and safe_add, so that nothing is ever evicted from it (a full dict
-- refuses, and the loader says so and tries again):
--   version                 "<format>|<version>" of the base applied last
--   delta                   the version of the delta applied over it (none since the base)
--   loading                 set while a worker loads: the lock that keeps loaders one
--   gen                     counts the loader's writes, and ejections (incr: in place, so it
--                           evicts nothing): a worker that sees it change forgets what it
--                           kept of host names and ejections (the one key read every request)
--   names                   the service names applied ("\n"-joined)
--   r:<svc>                 the service's rev: read when routing changed
--   d:<svc>                 its rev followed by its JSON: read only when the rev changed
--   h:<host>, n:<svc>       the service a host name routes to; the service's host names
--                           (the state line's field), to take them back when they change
-- Counters (`dict`), which may evict each other but never a route (a service name never
-- holds ':' or '|'):
--   x:<svc>                 until when some peer of the service may be ejected
--   c:|f:|e:|w:<svc>|<addr>|<container>  per peer: in flight (where a method or max_conns
--                           reads it), failures, ejected, EWMA (its time in the flags)
--
-- Traffic figures (issue 17), when configure is given `stats`: each worker counts in plain
-- tables of its own (nothing shared is written a request) and sends its counts, cumulative
-- since it started, to the controller's UDP listener every second (see send_figures).

local balancer = require "ngx.balancer"
local cjson = require "cjson.safe"
local ffi = require "ffi"
local get_request = require("resty.core.base").get_request

local ngx = ngx
local ngx_var = ngx.var
local log = ngx.log
local ERR, WARN, INFO = ngx.ERR, ngx.WARN, ngx.INFO
local crc32 = ngx.crc32_long
local clock_now = ngx.now
local byte, char, sub, find, match, gmatch, format =
    string.byte, string.char, string.sub, string.find, string.match, string.gmatch, string.format
local floor, ceil, exp, ln, random, min, max =
    math.floor, math.ceil, math.exp, math.log, math.random, math.min, math.max
local concat, sort = table.concat, table.sort
local type, tostring, tonumber, pairs, ipairs, next, pcall =
    type, tostring, tonumber, pairs, ipairs, next, pcall
local null = cjson.null
local cast, uintptr = ffi.cast, ffi.typeof("uintptr_t")

local M = {}

local MORE_TRIES = 2 -- retries after the first try: three tries, as the reload data plane
-- A refused connect uses up no try, up to every live peer once and MAX_TRIES in all (the
-- config's proxy_next_upstream_tries): containers stopping at once refuse connections until
-- their drain reaches nginx, and that must fail no request. A timed-out connect (the address
-- of a container already gone) gives its try back MORE_TRIES times at most: each cost the
-- connect timeout, and proxy_next_upstream_timeout bounds them all.
local MAX_TRIES = 16
local REHASHES = 20 -- nginx's bound on rehashes (ip_hash, hash, random) before round robin
local RING_POINTS = 160 -- consistent hash points per weight unit, as nginx's ketama
local DECAY = 10 -- seconds: a response time's weight in the EWMA falls by e in this time
local EWMA_TTL = 10 * DECAY -- by then an EWMA has decayed to nothing: let the key go
local HOSTS_KEPT = 10000 -- host names a worker keeps what they route to, before it starts again
local LOCK_TTL = 5 -- seconds: the loader's lock outlives no loader that died holding it
local NGX_BUSY = -3 -- from the balancer: nginx answers 502 "no live upstreams", as its own do

local NO_LIVE = "controlplane: service %s has no live backend\n"
local NO_SERVICE = "controlplane: no service here for host %s\n"
local BAD_DATA = "controlplane: service %s has no valid routing data (nginx error log says why)\n"

local conf -- what configure was given; nil until it succeeded
local dict -- the counters every worker shares
local routes -- the routing every worker reads and the loader writes
local FORMAT = "3" -- of both files: the base (state_path) and the delta over it
local services = {} -- per worker: name -> the decoded service, or {rev, bad = why}
local by_host, by_host_n = {}, 0 -- per worker: host -> its service or {deny, name}; how many
local seen_gen -- per worker: the routes' `gen` by_host holds for
-- per worker: each request's state from route to record (its service, the peers tried),
-- keyed by nginx's request: ngx.ctx would cost a table and a registry reference a request
local requests = {}
local loaded_here = false -- per worker: it had the state loaded itself once (first_load)
local cand, cand_n = {}, {} -- per worker scratch for least_conn (nothing yields while used)
local stamp = 0 -- per worker: marks the peers a consistent hash walk has already seen
local stats -- configure's `stats` {host, port, tag, peer}; nil: nothing counted nor sent

-- Validation ------------------------------------------------------------------------------

local METHODS = {
    round_robin = true, least_conn = true, ip_hash = true, hash = true, random = true,
    least_time = true,
}
local NO_BACKUP = { ip_hash = true, hash = true, random = true } -- as nginx refuses them
local SERVICE_FIELDS = { method = true, key = true, consistent = true, two = true, peers = true }
local PEER_FIELDS = {
    addr = true, host = true, port = true, weight = true, down = true, backup = true,
    max_fails = true, fail_timeout = true, max_conns = true, container = true,
}

local function absent(v)
    return v == nil or v == null
end

local function integer(v, lo, hi)
    return type(v) == "number" and v == floor(v) and v >= lo and v <= hi
end

local function ipv4(s)
    local parts = { match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
    if #parts ~= 4 then
        return false
    end
    for i = 1, 4 do
        local o = parts[i]
        if #o > 3 or (#o > 1 and byte(o) == 48) or tonumber(o) > 255 then
            return false
        end
    end
    return true
end

-- How many hex groups "a:b:c" holds (0 for ""), nil when one is not 1-4 hex digits.
local function hex_groups(s)
    if s == "" then
        return 0
    end
    local n = 0
    for g in gmatch(s .. ":", "([^:]*):") do
        if not match(g, "^%x%x?%x?%x?$") then
            return nil
        end
        n = n + 1
    end
    return n
end

local function ipv6(s)
    if #s > 45 or not find(s, ":", 1, true) then
        return false
    end
    local v4 = match(s, ":([%d.]+)$")
    if v4 and find(v4, ".", 1, true) then
        if not ipv4(v4) then
            return false
        end
        s = sub(s, 1, #s - #v4) .. "0:0" -- a trailing dotted quad is two groups
    end
    local gap = find(s, "::", 1, true)
    if not gap then
        return hex_groups(s) == 8
    end
    if find(s, "::", gap + 1, true) then
        return false
    end
    local left, right = hex_groups(sub(s, 1, gap - 1)), hex_groups(sub(s, gap + 2))
    return left ~= nil and right ~= nil and left + right <= 7
end

-- A hash key: `$name` variables and literal [A-Za-z0-9_.:/,=-], compiled into parts where a
-- variable is a table {name} and a literal a string.
local function compile_key(key)
    if type(key) ~= "string" or key == "" or #key > 1024 then
        return nil
    end
    local parts, pos = {}, 1
    while pos <= #key do
        local name = match(key, "^%$([A-Za-z0-9_]+)", pos)
        if name then
            parts[#parts + 1] = { name }
            pos = pos + 1 + #name
        else
            local lit = match(key, "^[A-Za-z0-9_.:/,=%-]+", pos)
            if not lit then
                return nil
            end
            parts[#parts + 1] = lit
            pos = pos + #lit
        end
    end
    return parts
end

local function eval_key(parts)
    if #parts == 1 and type(parts[1]) == "table" then
        return ngx_var[parts[1][1]] or ""
    end
    local out = {}
    for i = 1, #parts do
        local p = parts[i]
        out[i] = type(p) == "table" and (ngx_var[p[1]] or "") or p
    end
    return concat(out)
end

-- The peer as the balancer keeps it, or nil and why it is refused.
local function make_peer(name, p)
    if type(p) ~= "table" then
        return nil, "is not an object"
    end
    for k in pairs(p) do
        if not PEER_FIELDS[k] then
            return nil, "has an unknown field " .. tostring(k)
        end
    end
    local host, port, addr = p.host, p.port, p.addr
    if type(host) ~= "string" then
        return nil, "host must be a string"
    end
    local v6 = ipv6(host)
    if not v6 and not ipv4(host) then
        return nil, format("host %q is not an IP address", host)
    end
    if not integer(port, 1, 65535) then
        return nil, "port must be an integer 1-65535, got " .. tostring(port)
    end
    local target = v6 and "[" .. host .. "]" or host -- set_current_peer wants IPv6 bracketed
    local want = target .. ":" .. format("%d", port)
    if addr ~= want then
        return nil, format("addr %s does not match host and port (%s)", tostring(addr), want)
    end
    local peer = {
        addr = addr, target = target, port = port, weight = 1, down = false, backup = false,
        max_fails = 1, fail_timeout = 10, max_conns = 0, cw = 0,
    }
    local checks = {
        { "weight", integer, 1, 1000 }, { "max_fails", integer, 0, 1000 },
        { "fail_timeout", integer, 0, 86400 }, { "max_conns", integer, 0, 100000 },
    }
    for i = 1, #checks do
        local field, check, lo, hi = checks[i][1], checks[i][2], checks[i][3], checks[i][4]
        local v = p[field]
        if not absent(v) then
            if not check(v, lo, hi) then
                return nil, format("%s must be an integer %d-%d, got %s", field, lo, hi, tostring(v))
            end
            peer[field] = v
        end
    end
    for _, field in ipairs({ "down", "backup" }) do
        local v = p[field]
        if not absent(v) then
            if type(v) ~= "boolean" then
                return nil, field .. " must be true or false"
            end
            peer[field] = v
        end
    end
    if not absent(p.container) and type(p.container) ~= "string" then
        return nil, "container must be a string"
    end
    peer.container = type(p.container) == "string" and p.container or "?"
    -- the container too: Docker hands a freed address to the next container at once, which
    -- must not inherit the last one's failures or ejection
    local id = name .. "|" .. addr .. "|" .. peer.container
    peer.ckey, peer.fkey, peer.ekey = "c:" .. id, "f:" .. id, "e:" .. id
    peer.wkey = "w:" .. id
    return peer
end

-- Consistent hash ring points of one peer: crc32(HOST \0 PORT PREV_HASH), nginx's ketama
-- (compatible with Cache::Memcached::Fast), so keys land where nginx's `hash ... consistent`
-- would put them.
local function ring_points(addr, weight)
    local host, port = match(addr, "^(.*):(%d+)$")
    local base, prev, points = host .. "\0" .. port, "\0\0\0\0", {}
    for i = 1, weight * RING_POINTS do
        local h = crc32(base .. prev)
        points[i] = h
        prev = char(h % 256, floor(h / 256) % 256, floor(h / 65536) % 256, floor(h / 16777216))
    end
    return points
end

local function build_ring(svc, old)
    local reuse = old and old.points or {}
    local hashes, owner, points = {}, {}, {}
    for _, p in ipairs(svc.primary) do
        local kept = reuse[p.addr]
        local pts = kept and kept.weight == p.weight and kept.points or ring_points(p.addr, p.weight)
        points[p.addr] = { weight = p.weight, points = pts }
        for i = 1, #pts do
            local h = pts[i]
            if not owner[h] then -- equal points: the first peer keeps it
                owner[h] = p
                hashes[#hashes + 1] = h
            end
        end
    end
    sort(hashes)
    local peers = {}
    for i = 1, #hashes do
        peers[i] = owner[hashes[i]]
    end
    svc.ring_hash, svc.ring_peer, svc.points = hashes, peers, points
end

-- An EWMA's key holds the time of its last sample in its flags, so one read gets both:
-- milliseconds, wrapping at 2^32 - 1 (49 days, far beyond EWMA_TTL), never 0 (no flags).
local WRAP = 4294967295

local function sampled_at(t)
    return floor(t * 1000) % WRAP + 1
end

-- Seconds from `at` (sampled_at's) to `t`, or nil when there is no time.
local function since(at, t)
    if not at then
        return nil
    end
    local ms = (sampled_at(t) - at) % WRAP
    return ms < WRAP / 2 and ms / 1000 or 0 -- behind: another worker's clock is a moment ahead
end

-- A peer added by a state change starts at the mean of the others' EWMA (none has one: it
-- learns from scratch). Only added ones: a peer merely not sampled yet when a worker first
-- builds the service must not inherit a slow peer's figure.
local function seed_ewma(svc, kept)
    local sum, n, added = 0, 0, {}
    for _, list in ipairs({ svc.primary, svc.backup }) do
        for i = 1, #list do
            local p = list[i]
            local e = dict:get(p.wkey)
            if e then
                sum, n = sum + e, n + 1
            elseif not kept[p.addr] then
                added[#added + 1] = p
            end
        end
    end
    if n == 0 then
        return
    end
    local at = sampled_at(clock_now())
    for i = 1, #added do
        dict:add(added[i].wkey, sum / n, EWMA_TTL, at)
    end
end

-- Containers come and go with new addresses: the in-flight count of a peer gone from the
-- state goes too, so the dict holds only live peers' (the other per-peer keys expire).
local function forget(peers, staying)
    for _, p in pairs(peers) do
        if not staying[p.ckey] then
            dict:delete(p.ckey)
            dict:delete(p.fkey)
            dict:delete(p.ekey)
            dict:delete(p.wkey)
        end
    end
end

local PICK -- method -> picker, defined below

-- The service as the balancer keeps it per worker, or nil and why its data is refused.
local function build(name, blob, old)
    local rev, json = sub(blob, 1, 16), sub(blob, 17)
    local data, err = cjson.decode(json)
    if type(data) ~= "table" then
        return nil, "its JSON does not decode: " .. tostring(err or "not an object")
    end
    for k in pairs(data) do
        if not SERVICE_FIELDS[k] then
            return nil, "unknown field " .. tostring(k)
        end
    end
    local method = data.method
    if not METHODS[method] then
        return nil, "unknown method " .. tostring(method)
    end
    local svc = {
        name = name, rev = rev, method = method, primary = {}, backup = {}, live = 0, total = 0,
        xkey = "x:" .. name, longest = 0, x_until = 0,
        -- in-flight counts cost two shared dict writes a request: kept only where read
        counts = method == "least_conn" or method == "least_time",
    }
    if method == "hash" then
        svc.key = compile_key(data.key)
        if not svc.key then
            return nil, "key must be nginx variables and the characters A-Z a-z 0-9 _ . : / , = -"
        end
    elseif not absent(data.key) then
        return nil, "key is for method hash only"
    end
    for _, flag in ipairs({ "consistent", "two" }) do
        local v = data[flag]
        if not absent(v) and type(v) ~= "boolean" then
            return nil, flag .. " must be true or false"
        end
        svc[flag] = v == true
    end
    if svc.consistent and method ~= "hash" then
        return nil, "consistent is for method hash only"
    end
    if svc.two and method ~= "random" then
        return nil, "two is for method random only"
    end
    svc.counts = svc.counts or svc.two
    local peers = data.peers
    if type(peers) ~= "table" then
        return nil, "peers must be an array"
    end
    local n = 0
    for _ in pairs(peers) do
        n = n + 1
    end
    if n ~= #peers then
        return nil, "peers must be an array"
    end
    local kept, seen = {}, {}
    if old and old.primary then
        for _, list in pairs({ old.primary, old.backup }) do
            for i = 1, #list do
                kept[list[i].addr] = list[i]
            end
        end
    end
    for i = 1, n do
        local p, why = make_peer(name, peers[i])
        if not p then
            local c = type(peers[i]) == "table" and peers[i].container
            return nil, format("peer %d (%s) %s", i, type(c) == "string" and c or "?", why)
        end
        if seen[p.addr] then
            return nil, "peer " .. p.addr .. " is listed twice"
        end
        seen[p.addr], seen[p.ckey] = true, true
        if p.backup and NO_BACKUP[method] then
            return nil, "backup peers are not allowed with method " .. method
        end
        -- round robin keeps its place across a change that keeps the peer
        p.cw = kept[p.addr] and kept[p.addr].cw or 0
        p.since = kept[p.addr] and kept[p.addr].ckey == p.ckey and kept[p.addr].since
            or clock_now()
        local list = p.backup and svc.backup or svc.primary
        list[#list + 1] = p
        if not p.down then
            svc.live = svc.live + 1
        end
        if not p.backup then
            svc.total = svc.total + p.weight -- down peers included: hashes keep their place
        end
        if p.max_fails > 0 then
            svc.longest = max(svc.longest, p.fail_timeout)
        end
        if p.max_conns > 0 then
            svc.counts = true
        end
    end
    if method == "random" then
        local cum, sum = {}, 0
        for i = 1, #svc.primary do
            sum = sum + svc.primary[i].weight
            cum[i] = sum
        end
        svc.cum = cum
    end
    if svc.consistent then
        build_ring(svc, old)
    end
    if method == "least_time" and old and old.primary then
        seed_ewma(svc, kept)
    end
    forget(kept, seen)
    svc.pick = PICK[method == "hash" and svc.consistent and "chash"
        or method == "random" and svc.two and "random_two" or method]
    return svc
end

-- The service's routing for this worker: one shared dict read unless its rev changed.
-- Returns the service, or nil and "none" (unknown) or "bad" (its data was refused).
local function lookup(name)
    local rev = routes:get("r:" .. name)
    local svc = services[name]
    if rev == nil then
        if svc and svc.primary then
            forget(svc.primary, {})
            forget(svc.backup, {})
        end
        services[name] = nil
        return nil, "none"
    end
    if svc and svc.rev == rev then
        if svc.bad then
            return nil, "bad"
        end
        return svc
    end
    local blob = routes:get("d:" .. name)
    local why
    if type(blob) ~= "string" or #blob < 17 then
        why = "its data is gone from lua_shared_dict " .. conf.routes .. " (a reload that changed it)"
    else
        local ok, built, err = pcall(build, name, blob, svc)
        if not ok then
            why = "its data could not be read: " .. tostring(built)
        elseif not built then
            why = err
        else
            services[name] = built
            return built
        end
    end
    log(ERR, "controlplane: service ", name, " (rev ", rev, "): ", why,
        "; it answers 503 until the controller writes valid data")
    services[name] = { rev = rev, bad = why }
    return nil, "bad"
end

-- Picking a peer ----------------------------------------------------------------------------
-- A pick runs in modes: 0 strict; 1 ignoring ejections (every peer ejected: nginx then tries
-- them all again); 2 also taking a peer this request already tried (none other is left).
-- `down` and max_conns are never ignored.

local function usable(p, st, mode)
    if p.down then
        return false
    end
    if mode < 2 then
        for i = 1, st.n do
            if st[i] == p then
                return false
            end
        end
        if mode < 1 and st.ejections and dict:get(p.ekey) then
            return false
        end
    end
    return p.max_conns == 0 or (dict:get(p.ckey) or 0) < p.max_conns
end

-- nginx's smooth weighted round robin (ngx_http_upstream_get_peer).
local function round_robin(_, list, st, mode)
    local best, total = nil, 0
    for i = 1, #list do
        local p = list[i]
        if usable(p, st, mode) then
            p.cw = p.cw + p.weight
            total = total + p.weight
            if best == nil or p.cw > best.cw then
                best = p
            end
        end
    end
    if best then
        best.cw = best.cw - total
    end
    return best
end

-- Fewest in flight per weight across all workers; ties by round robin, as nginx.
local function least_conn(_, list, st, mode)
    local m, best = 0, nil
    for i = 1, #list do
        local p = list[i]
        if usable(p, st, mode) then
            m = m + 1
            cand[m], cand_n[m] = p, dict:get(p.ckey) or 0
            if best == nil or cand_n[m] * cand[best].weight < cand_n[best] * p.weight then
                best = m
            end
        end
    end
    if best == nil then
        return nil
    end
    local bp, bn, chosen, total = cand[best], cand_n[best], nil, 0
    for i = 1, m do
        local p = cand[i]
        if cand_n[i] * bp.weight == bn * p.weight then
            p.cw = p.cw + p.weight
            total = total + p.weight
            if chosen == nil or p.cw > chosen.cw then
                chosen = p
            end
        end
        cand[i] = nil
    end
    chosen.cw = chosen.cw - total
    return chosen
end

-- The peer at weight offset w, down peers included (nginx's walk over its peer list).
local function walk(list, w)
    local i = 1
    local p = list[1]
    while w >= p.weight do
        w = w - p.weight
        i = i + 1
        p = list[i]
    end
    return p
end

-- nginx's ip_hash: the first three octets of IPv4, all of IPv6.
local function ip_hash(svc, list, st, mode)
    local addr = st.ip
    if not addr then
        addr = ngx_var.binary_remote_addr or ""
        if #addr ~= 4 and #addr ~= 16 then
            addr = "\0\0\0\0" -- nginx's pseudo address for a client that is no inet one
        end
        st.ip = addr
    end
    local len = #addr == 4 and 3 or 16
    local hash = 89
    for _ = 0, REHASHES do
        for i = 1, len do
            hash = (hash * 113 + byte(addr, i)) % 6271
        end
        local p = walk(list, hash % svc.total)
        if usable(p, st, mode) then
            return p
        end
    end
    return round_robin(svc, list, st, mode)
end

local function hash_key(svc, st)
    local key = st.key
    if key == false then
        key = eval_key(svc.key)
        st.key = key
    end
    return key
end

-- nginx's hash KEY: (crc32([REHASH] KEY) >> 16) & 0x7fff summed, % total weight.
local function hash(svc, list, st, mode)
    local key = hash_key(svc, st)
    if key == "" or #list == 1 then
        return round_robin(svc, list, st, mode)
    end
    local h = 0
    for rehash = 0, REHASHES do
        local c = crc32(rehash > 0 and rehash .. key or key)
        h = h + floor(c / 65536) % 32768
        local p = walk(list, h % svc.total)
        if usable(p, st, mode) then
            return p
        end
    end
    return round_robin(svc, list, st, mode)
end

-- The first index of sorted `values` whose value is >= x (#values + 1 when none is).
local function first_at_least(values, x)
    local lo, hi = 1, #values + 1
    while lo < hi do
        local mid = floor((lo + hi) / 2)
        if values[mid] < x then
            lo = mid + 1
        else
            hi = mid
        end
    end
    return lo
end

-- hash KEY consistent: the first point clockwise from crc32(KEY) whose peer is usable.
local function chash(svc, list, st, mode)
    local key = hash_key(svc, st)
    local hashes, peers = svc.ring_hash, svc.ring_peer
    local n = #hashes
    if key == "" or n == 0 then
        return round_robin(svc, list, st, mode)
    end
    local start = st.point
    if not start then
        start = first_at_least(hashes, crc32(key)) - 1 -- 0-based, n wraps to the first point
        st.point = start
    end
    stamp = stamp + 1
    for i = 0, n - 1 do
        local p = peers[(start + i) % n + 1]
        if p.stamp ~= stamp then -- each peer has many points: judge it once
            p.stamp = stamp
            if usable(p, st, mode) then
                return p
            end
        end
    end
    return nil
end

-- A weighted random peer, down ones included (nginx's ranges).
local function peek(svc, list)
    -- the first range ending past x: cum holds integers, so past x is at least x + 1
    return list[first_at_least(svc.cum, floor(random() * svc.total) + 1)]
end

local function random_one(svc, list, st, mode)
    for _ = 0, REHASHES do
        local p = peek(svc, list)
        if usable(p, st, mode) then
            return p
        end
    end
    return round_robin(svc, list, st, mode)
end

-- random two: of two weighted random picks, the one with fewer in flight per weight.
local function random_two(svc, list, st, mode)
    local a = random_one(svc, list, st, mode)
    if a == nil then
        return nil
    end
    for _ = 0, REHASHES do
        local b = peek(svc, list)
        if b ~= a and usable(b, st, mode) then
            if (dict:get(a.ckey) or 0) * b.weight > (dict:get(b.ckey) or 0) * a.weight then
                return b
            end
            return a
        end
    end
    return a
end

local function ewma_now(p, t)
    local e, at = dict:get(p.wkey)
    if not e then
        return 0
    end
    return e * exp(-(since(at, t) or 0) / DECAY)
end

local function score(p, t)
    return ewma_now(p, t) * ((dict:get(p.ckey) or 0) + 1) / p.weight
end

-- least_time: of two random usable peers, the lower EWMA * (in flight + 1) / weight.
local function least_time(_, list, st, mode)
    local n, a, b = #list, nil, nil
    for _ = 0, REHASHES do
        local p = list[random(n)]
        if p ~= a and usable(p, st, mode) then
            if a == nil then
                a = p
            else
                b = p
                break
            end
        end
    end
    local t = clock_now()
    if a == nil then -- few usable among many: look at every one
        local best_score
        for i = 1, n do
            local p = list[i]
            if usable(p, st, mode) then
                local s = score(p, t)
                if a == nil or s < best_score then
                    a, best_score = p, s
                end
            end
        end
        return a
    end
    if b and score(b, t) < score(a, t) then
        return b
    end
    return a
end

PICK = {
    round_robin = round_robin, least_conn = least_conn, ip_hash = ip_hash, hash = hash,
    chash = chash, random = random_one, random_two = random_two, least_time = least_time,
}

local function choose(svc, st)
    local pick, primary, backup = svc.pick, svc.primary, svc.backup
    for mode = 0, 2 do
        local p = #primary > 0 and pick(svc, primary, st, mode)
        if p then
            return p
        end
        p = #backup > 0 and pick(svc, backup, st, mode)
        if p then
            return p
        end
    end
    return nil
end

-- Until when some peer of the service may be ejected (0: none), as the shared dict says.
local function ejections_until(svc)
    local x = svc.longest > 0 and dict:get(svc.xkey)
    return type(x) == "number" and x or 0
end

-- Passive failures: max_fails within fail_timeout eject the peer for fail_timeout.
local function failed(svc, p)
    if p.max_fails == 0 or p.fail_timeout == 0 then
        return
    end
    local fails = dict:incr(p.fkey, 1, 0, p.fail_timeout)
    if fails and fails >= p.max_fails then
        -- a backend that joined within fail_timeout may not listen yet: out for a second,
        -- not for the whole fail_timeout (the readiness gate is the controller's to add)
        local out = clock_now() - p.since < p.fail_timeout and min(1, p.fail_timeout)
            or p.fail_timeout
        dict:set(p.ekey, true, out)
        dict:delete(p.fkey)
        svc.x_until = clock_now() + svc.longest
        dict:set(svc.xkey, svc.x_until, svc.longest)
        routes:incr("gen", 1) -- each worker reads its services' x: key again
        log(WARN, "controlplane: service ", svc.name, ": ", p.addr, " (", p.container,
            ") ejected for ", out, " s after ", fails, " failed tries")
    end
end

local function release(p)
    -- no init: the count of a peer gone from the state (see forget) is not made again
    local n = dict:incr(p.ckey, -1)
    if n and n < 0 then -- the peer went and came back while this try was in flight
        dict:set(p.ckey, 0)
    end
end

-- Traffic figures -------------------------------------------------------------------------
-- A count vector per service and per (service, peer address), laid out as core.traffic's
-- VECTOR: [1..5] by status class, [6] connect errors, [7] bytes sent to clients, [8] bytes
-- received from them, [9 + i] response-time bucket i. What each counts:
--   a peer's: each try at it, by the status it answered ($upstream_status), or as a connect
--     error (a 502 or 504 whose $upstream_connect_time is "-": refused, unreachable, timed
--     out), which has no status class; the try's $upstream_response_time in its bucket when it
--     answered; and the bytes of the requests whose answer it gave (the last try's).
--   the service's (addr ""): each request once, by the status the client got ($status), its
--     denials (503 no live backend, bad data) included; as a connect error when its last
--     try's connect failed; its bytes ($bytes_sent, $request_length); the last try's upstream
--     response time when that try answered (as the reload data plane's log line gives it).
-- Each vector is cached on the peer (p.tv) and the service (svc.tv), so a request finds its
-- vectors with no string made; one forgotten after IDLE is `gone`, and made again when used,
-- from 0 (the controller takes counts that went down for a new start: core.traffic.Cumulative).

local CONNECT_ERRORS, SENT, RECEIVED, BUCKET0 = 6, 7, 8, 9
local VECTOR = 41 -- core.traffic.VECTOR
local BASE = 0.0005 -- seconds: the top of bucket 0 (core.traffic.BASE)
local TOP_BUCKET = 32
local HALF_STEPS = 2 / ln(2) -- a bucket spans a factor of sqrt(2)
local FULL_EVERY = 10 -- every tenth send has every key, the others only those that changed
local IDLE = 600 -- seconds: a key unchanged this long is forgotten (bounded memory and sends)
local DATAGRAM = 1400 -- bytes at most: no IP fragmentation on any usual link
local ERROR_EVERY = 60 -- seconds: a failed send is logged at most this often
local figures = {} -- per worker: service name -> {[""] = its vector, [addr] = a peer's}
local vectors, vectors_n = {}, 0 -- per worker: every vector, in the order made
local sends, seq, last_error, pid = 0, 0, nil, nil -- per worker

-- core.traffic.bucket (log2 there: its 1e-9 makes both agree on a bucket's very edge)
local function bucket(t)
    if t <= BASE then
        return 0
    end
    local b = ceil(ln(t / BASE) * HALF_STEPS - 1e-9)
    return b < TOP_BUCKET and b or TOP_BUCKET
end

local function vector(name, addr)
    local by = figures[name]
    if not by then
        by = {}
        figures[name] = by
    end
    local v = by[addr]
    if not v then
        v = { name = name, addr = addr, prefix = name .. " " .. (addr == "" and "-" or addr) .. " ",
            dirty = false, gone = false, at = clock_now() }
        for i = 1, VECTOR do
            v[i] = 0
        end
        by[addr] = v
        vectors_n = vectors_n + 1
        vectors[vectors_n] = v
    end
    return v
end

local function peer_vector(svc, p)
    local v = p.tv
    if not v or v.gone then
        v = vector(svc.name, p.addr)
        p.tv = v
    end
    return v
end

-- Whether the i-th entry of a ", "-separated nginx list is "-".
local function nth_is_dash(list, i)
    local pos = 1
    for _ = 2, i do
        pos = find(list, ",", pos, true)
        if not pos then
            return false
        end
        pos = pos + 1
    end
    local c = byte(list, pos)
    while c == 32 do
        pos = pos + 1
        c = byte(list, pos)
    end
    return c == 45
end

-- The request once, at its service; and its bytes at `peer`'s vector, the peer that answered.
local function count_request(svc, status, rtt, refused, peer)
    local v = svc.tv
    if not v or v.gone then
        v = vector(svc.name, "")
        svc.tv = v
    end
    local sent = tonumber(ngx_var.bytes_sent) or 0
    local received = tonumber(ngx_var.request_length) or 0
    if status >= 100 and status <= 599 then
        local class = floor(status / 100)
        v[class] = v[class] + 1
        if rtt then
            local b = BUCKET0 + bucket(rtt)
            v[b] = v[b] + 1
        end
    end
    if refused then
        v[CONNECT_ERRORS] = v[CONNECT_ERRORS] + 1
    end
    v[SENT], v[RECEIVED], v.dirty = v[SENT] + sent, v[RECEIVED] + received, true
    if peer then
        peer[SENT], peer[RECEIVED] = peer[SENT] + sent, peer[RECEIVED] + received
    end
end

-- Each vector's line: `<service> <addr or -> <8 counts> <buckets>`, buckets "-" or
-- "index:count" pairs joined by ",".
local function figure_line(v)
    local buckets, k = {}, 0
    for i = 0, TOP_BUCKET do
        local n = v[BUCKET0 + i]
        if n > 0 then
            k = k + 1
            buckets[k] = format("%d:%d", i, n)
        end
    end
    return format("%s%d %d %d %d %d %d %d %d %s", v.prefix, v[1], v[2], v[3], v[4], v[5],
        v[6], v[7], v[8], k > 0 and concat(buckets, ",") or "-")
end

local function forget_idle(now)
    local kept, k = {}, 0
    for i = 1, vectors_n do
        local v = vectors[i]
        if now - v.at < IDLE then
            k = k + 1
            kept[k] = v
        else
            v.gone = true
            local by = figures[v.name]
            by[v.addr] = nil
            if next(by) == nil then
                figures[v.name] = nil
            end
        end
    end
    vectors, vectors_n = kept, k
end

-- One send: the vectors that changed since the last (every one each FULL_EVERY sends, and
-- at the worker's exit, `last`), as datagrams of at most DATAGRAM bytes, each headed
-- `cp-stats 1 <tag> <worker pid> <seq>` (seq counts the worker's datagrams, so a listener
-- can tell one lost). Returns an error, or nil.
local function send_figures(last)
    sends = sends + 1
    local full = last or sends % FULL_EVERY == 0
    local now = clock_now()
    local lines, m = {}, 0
    for i = 1, vectors_n do
        local v = vectors[i]
        if v.dirty then
            v.at = now
        end
        if full or v.dirty then
            m = m + 1
            lines[m] = figure_line(v)
            v.dirty = false
        end
    end
    if sends % 60 == 0 then
        forget_idle(now)
    end
    if m == 0 then
        return nil
    end
    local sock = ngx.socket.udp()
    local ok, err = sock:setpeername(stats.peer, stats.port)
    local i = 1
    while ok and i <= m do
        seq = seq + 1
        local parts = { format("cp-stats 1 %s %d %d", stats.tag, pid, seq) }
        local size, k = #parts[1], 1
        while i <= m and size + 1 + #lines[i] <= DATAGRAM do
            k = k + 1
            parts[k] = lines[i]
            size = size + 1 + #lines[i]
            i = i + 1
        end
        ok, err = sock:send(concat(parts, "\n"))
    end
    sock:close()
    return err
end

-- The flush timer (every second; `premature`: the worker exits, a reload or a stop).
local function flush(premature)
    local ok, err = pcall(send_figures, premature)
    if ok and not err then
        return
    end
    local now = clock_now()
    if not last_error or now - last_error >= ERROR_EVERY then
        last_error = now
        log(WARN, "controlplane: traffic figures not sent to ", stats.host, " port ", stats.port,
            ": ", err, "; routing is not affected, and the counts go with the next send",
            " (said at most once a minute)")
    end
end

-- Entry points --------------------------------------------------------------------------

-- nginx's request, as a number a table is keyed by
local function request_key()
    local key = tonumber(cast(uintptr, get_request()))
    return key
end

local function deny(name, why)
    local body = format(why == "bad" and BAD_DATA or why == "host" and NO_SERVICE or NO_LIVE, name)
    ngx.status = why == "host" and 404 or 503
    ngx.header["Content-Type"] = "text/plain"
    ngx.header["Content-Length"] = #body
    ngx.print(body)
    return ngx.exit(ngx.HTTP_OK) -- after the body: ends the request, not just this phase
end

local function configure_error(opts)
    if type(opts) ~= "table" then
        return "configure takes a table"
    end
    if type(opts.state_path) ~= "string" or opts.state_path == "" then
        return "state_path must be a path"
    end
    if type(opts.delta_path) ~= "string" or opts.delta_path == "" then
        return "delta_path must be a path"
    end
    if type(opts.poll) ~= "number" or opts.poll <= 0 then
        return "poll must be a number of seconds > 0"
    end
    if type(opts.dict) ~= "string" or not ngx.shared[opts.dict] then
        return "dict must name a lua_shared_dict of this config"
    end
    if type(opts.routes) ~= "string" or not ngx.shared[opts.routes] or opts.routes == opts.dict then
        return "routes must name another lua_shared_dict of this config"
    end
end

-- `stats`: where the traffic figures go ({host = IP address, port, tag}), as the controller
-- writes it; nil when it is fine.
local function stats_error(s)
    if type(s) ~= "table" then
        return "stats must be a table {host = ..., port = ..., tag = ...}"
    end
    if type(s.host) ~= "string" or not (ipv4(s.host) or ipv6(s.host)) then
        return "stats.host must be an IP address"
    end
    if not integer(s.port, 1, 65535) then
        return "stats.port must be an integer 1-65535"
    end
    if type(s.tag) ~= "string" or #s.tag < 16 or #s.tag > 32 or not match(s.tag, "^%w+$") then
        return "stats.tag must be 16-32 letters and digits"
    end
end

function M.configure(opts)
    local why = configure_error(opts)
    if why then
        log(ERR, "controlplane: configure: ", why, "; every service answers 503")
        return
    end
    conf = {
        state_path = opts.state_path, delta_path = opts.delta_path, poll = opts.poll,
        dict = opts.dict, routes = opts.routes,
    }
    dict = ngx.shared[opts.dict]
    routes = ngx.shared[opts.routes]
    stats = nil
    if opts.stats ~= nil then
        why = stats_error(opts.stats)
        if why then
            log(ERR, "controlplane: configure: ", why, "; no traffic figures are sent (routing",
                " is not affected)")
            return
        end
        local host = opts.stats.host
        stats = {
            host = host, port = opts.stats.port, tag = opts.stats.tag,
            peer = find(host, ":", 1, true) and "[" .. host .. "]" or host, -- as nginx parses it
        }
    end
end

local load_once -- the loader, defined below

-- A new shared dict (first start, or grown): this worker's first request has the state
-- loaded rather than answer 503 until worker 0's first poll, waiting while another worker
-- loads it (two loaders at once could leave a base's line over its delta's).
local function first_load()
    loaded_here = true
    for _ = 1, 200 do
        if routes:get("version") or load_once() then
            return
        end
        ngx.sleep(0.002)
    end
end

-- The service a host name routes to: the exact name, else the nearest `*.` wildcard (as
-- nginx's server_name), from the host map the loader keeps.
local function service_for(host)
    local name = routes:get("h:" .. host)
    local pos = find(host, ".", 1, true)
    while not name and pos do
        name = routes:get("h:*" .. sub(host, pos))
        pos = find(host, ".", pos + 1, true)
    end
    return name
end

-- What a host name gets: its service, or {deny = why, name = the name the answer gives}.
local function resolve(host)
    if not loaded_here then
        first_load()
    end
    local name = service_for(host)
    if not name then
        return { deny = "host", name = host }
    end
    local ok, svc, why = pcall(lookup, name)
    if not ok then
        log(ERR, "controlplane: service ", name, ": ", svc)
        why = "bad"
    elseif svc and svc.live == 0 then
        why = "none"
    elseif svc then
        return svc
    end
    return { deny = why, name = name }
end

-- A miss in this worker's memo of host names: the memo starts again when routing changed
-- or a peer was ejected (`gen` counts both), and keeps what the host gets unless nothing
-- was loaded yet; the service's ejections are read again with it.
local function route_miss(host, gen)
    if gen ~= seen_gen then
        by_host, by_host_n, seen_gen = {}, 0, gen
    end
    if not conf then
        return { deny = "host", name = host }
    end
    local ok, hit = pcall(resolve, host)
    if not ok then
        log(ERR, "controlplane: routing host ", host, ": ", hit)
        return { deny = "host", name = host }
    end
    if not hit.deny then
        hit.x_until = ejections_until(hit)
    end
    if gen then
        if by_host_n >= HOSTS_KEPT then -- any Host a client sends: bounded
            by_host, by_host_n = {}, 0
        end
        by_host[host], by_host_n = hit, by_host_n + 1
    end
    return hit
end

-- Access phase of the one server the dynamic config has: the Host header picks the
-- service, so a new service or host name needs no reload either. Unless routing changed,
-- it costs one shared dict read: what a host gets is kept per worker.
function M.route()
    local host = ngx_var.host or ""
    local gen = routes and routes:get("gen")
    local hit = gen == seen_gen and by_host[host]
    if not hit then
        hit = route_miss(host, gen)
    end
    local why = hit.deny
    if why then
        if stats and why ~= "host" then -- counted at the service (hit.name is one)
            requests[request_key()] = { svc = hit, n = 0, busy = false, held = false }
        end
        return deny(hit.name, why)
    end
    -- every field a request may set, made at once (a table grown field by field costs more
    -- than the rest of this phase): the tries, and what a hash or ip_hash computes once
    requests[request_key()] = {
        false, false, false, svc = hit, n = 0, left = 0, held = false, busy = false,
        ejections = false, ip = false, key = false, point = false, timeouts = 0,
    }
end

local function balance(st)
    local svc, n = st.svc, st.n
    if n > 0 then -- a retry: the previous try is over
        local state, status = balancer.get_last_failure()
        if state == "failed" then
            failed(svc, st[n])
        end
        -- `left`: the tries after this one. A connect that failed (connect time "-": no
        -- application saw the request, so another try cannot make a retry storm) gives one
        -- back while peers not tried yet outnumber them: refused (502) always, timed out
        -- (504) MORE_TRIES times. The variable ends in " : " here: the try about to start is
        -- listed, with no peer yet.
        local left = st.left - 1
        local timeout = status == 504
        if (status == 502 or timeout and st.timeouts < MORE_TRIES)
            and left < svc.live - n - 1 and n + 1 + left < MAX_TRIES
            and find(ngx_var.upstream_connect_time or "", "-[ :]*$") then
            if timeout then
                st.timeouts = st.timeouts + 1
            end
            left = left + 1
            balancer.set_more_tries(1)
        else
            balancer.set_more_tries(0)
        end
        st.left = left
        if st.held then
            release(st[n])
            st.held = false
        end
        svc.x_until = ejections_until(svc) -- another worker may have ejected one since
    elseif svc.live > 1 then
        st.left = min(svc.live - 1, MORE_TRIES)
        balancer.set_more_tries(st.left)
    end
    local ends = svc.x_until
    st.ejections = ends > 0 and ends > clock_now()
    local p = choose(svc, st)
    if not p then
        st.busy = true
        return nil, true
    end
    if svc.counts then
        dict:incr(p.ckey, 1, 0)
    end
    n = n + 1
    st[n], st.n, st.held = p, n, svc.counts
    local ok, err = balancer.set_current_peer(p.target, p.port)
    if not ok then
        return "cannot set peer " .. p.addr .. ": " .. tostring(err)
    end
end

function M.balance()
    local st = requests[request_key()]
    if not st then
        log(ERR, "controlplane: balancer: controlplane.route did not run for this request")
        return ngx.exit(ngx.ERROR)
    end
    local ok, err, busy = pcall(balance, st)
    if not ok or err then
        log(ERR, "controlplane: service ", st.svc.name, ": ", err)
        return ngx.exit(ngx.ERROR)
    end
    if busy then
        log(ERR, "controlplane: service ", st.svc.name, ": every live peer is at its max_conns")
        return ngx.exit(NGX_BUSY)
    end
end

local function record(st)
    local svc, n = st.svc, st.n
    local last = st[n] -- nil when no peer was picked (a denial, or busy at once)
    local judged = last and not st.busy and last.max_fails > 0
    local status = (judged or stats) and ngx.status -- the client's
    if last then
        -- the answer is the last try's (or nginx's 502/504 for its connect error or timeout);
        -- after a busy pick it is nginx's own 502, not this peer's
        if judged and (status == 502 or status == 503 or status == 504) then
            failed(svc, last)
        end
        if st.held then
            release(last)
        end
    end
    local timed = last and svc.method == "least_time"
    if not timed and not stats then
        return
    end
    -- one entry per try: "0.012" or, after retries, "0.001, 0.012" (statuses alike); split
    -- with find (gmatch stops the JIT), each list once
    local times = last and ngx_var.upstream_response_time or ""
    local codes = last and stats and ngx_var.upstream_status or ""
    local t = timed and clock_now()
    local tpos, cpos, connects = 1, 1, nil
    local rtt, answered, refused = nil, false, false
    for i = 1, n do
        rtt = nil
        if tpos <= #times then
            local stop = find(times, ",", tpos, true) or #times + 1
            rtt = tonumber(sub(times, tpos, stop - 1))
            tpos = stop + 1
        end
        local p = st[i]
        if timed and rtt then
            local e, at = dict:get(p.wkey)
            local age = since(at, t)
            if e and age then
                local w = exp(-age / DECAY)
                e = e * w + rtt * (1 - w)
            else
                e = rtt
            end
            dict:set(p.wkey, e, EWMA_TTL, sampled_at(t))
        end
        if stats then
            -- the try's status: three digits, or "-" for none
            local c = byte(codes, cpos)
            while c == 32 do
                cpos = cpos + 1
                c = byte(codes, cpos)
            end
            local v = peer_vector(svc, p)
            answered, refused = false, false
            if c and c >= 49 and c <= 53 then
                local c3 = byte(codes, cpos + 2)
                if c == 53 and byte(codes, cpos + 1) == 48 and (c3 == 50 or c3 == 52) then
                    connects = connects or ngx_var.upstream_connect_time or ""
                    refused = nth_is_dash(connects, i)
                end
                if refused then
                    v[CONNECT_ERRORS] = v[CONNECT_ERRORS] + 1
                else
                    answered = true
                    v[c - 48] = v[c - 48] + 1
                    if rtt then
                        local b = BUCKET0 + bucket(rtt)
                        v[b] = v[b] + 1
                    end
                end
            end
            v.dirty = true
            cpos = (find(codes, ",", cpos, true) or #codes) + 1
        end
    end
    if stats then
        if st.busy then -- nginx's own 502 came after the tries
            answered, refused = false, false
        end
        count_request(svc, status, answered and rtt, refused, answered and last.tv)
    end
end

-- Log phase: the request's last try, and its end in this worker's table of requests.
function M.record()
    local key = request_key()
    local st = requests[key]
    if not st then
        return
    end
    requests[key] = nil
    if st.n > 0 or stats then
        local ok, err = pcall(record, st)
        if not ok then
            log(ERR, "controlplane: service ", st.svc.name, ": ", err)
        end
    end
end

-- The loader (worker 0) ------------------------------------------------------------------

local last_bad = {} -- per file: what the loader last refused there, so it is told once

local function refuse(which, key, level, ...)
    if key ~= last_bad[which] then
        last_bad[which] = key
        local path = which == "delta" and conf.delta_path or conf.state_path
        log(level, "controlplane: ", which, " file ", path, ": ", ...)
    end
end

-- the label grammar's host names, and its `*.` wildcards
local HOST, WILDCARD = "^[a-z0-9][a-z0-9._-]*$", "^%*%.[a-z0-9][a-z0-9._-]*$"

-- Lines after the header: {name, rev, hosts, json} each, or {name} for a removed service
-- (`removals`: a delta's), or nil and why the file is refused.
local function parse(rest, count, removals)
    if rest ~= "" and sub(rest, -1) ~= "\n" then
        return nil, "its last line is cut (a torn write)"
    end
    local lines, names, pos = {}, {}, 1
    while pos <= #rest do
        local stop = find(rest, "\n", pos, true)
        local line = sub(rest, pos, stop - 1)
        pos = stop + 1
        local i = #lines + 1
        if i > count then
            return nil, format("it has more service lines than its header's %d", count)
        end
        local name, rev, hosts, json = match(line, "^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.+)$")
        if not name and removals and not find(line, "\t", 1, true) then
            name = line
        elseif not name then
            return nil, format("service line %d is not name TAB rev TAB hosts TAB json%s", i,
                removals and " nor a removed service's name" or "")
        end
        if #name > 63 or not match(name, "^[a-z0-9][a-z0-9_.%-]*$") then
            return nil, format("service line %d: %q is not a service name", i, name)
        end
        if rev and (not match(rev, "^[0-9a-f]+$") or #rev ~= 16) then
            return nil, format("service %s: rev %q is not 16 lowercase hex digits", name, rev)
        end
        for host in gmatch(hosts or "", "[^ ]+") do
            if #host > 253 or not (match(host, HOST) or match(host, WILDCARD)) then
                return nil, format("service %s: %q is not a host name", name, host)
            end
        end
        if names[name] then
            return nil, format("service %s is listed twice", name)
        end
        names[name] = true
        lines[i] = rev and { name, rev, hosts, json } or { name }
    end
    if #lines ~= count then
        return nil, format("it has %d service lines, its header says %d (a torn write)",
            #lines, count)
    end
    return lines, names
end

-- Takes a service's host names back (each one still its own), as its `n:` key lists them.
local function unhost(name)
    for host in gmatch(routes:get("n:" .. name) or "", "[^ ]+") do
        if routes:get("h:" .. host) == name then
            routes:delete("h:" .. host)
        end
    end
    routes:delete("n:" .. name)
end

-- A service gone: the rev first, so no worker reads data that is going. Whether it was there.
local function drop(name)
    local was = routes:get("r:" .. name) ~= nil or routes:get("n:" .. name) ~= nil
    routes:delete("r:" .. name)
    routes:delete("d:" .. name)
    unhost(name)
    return was
end

-- Service lines into `routes`: the number whose rev changed, or nil and what the dict said
-- when it is full. The host map is brought in line by comparing each service's listed hosts
-- with its `n:` key, not by its rev, so a version applied only in part is completed by the
-- next try.
local function upsert(lines)
    local changed, moved = 0, {}
    for i = 1, #lines do
        local name, hosts = lines[i][1], lines[i][3]
        if hosts and routes:get("n:" .. name) ~= hosts then
            unhost(name)
            moved[#moved + 1] = lines[i]
        end
    end
    for i = 1, #lines do
        local name, rev, json = lines[i][1], lines[i][2], lines[i][4]
        local rkey = "r:" .. name
        if rev and routes:get(rkey) ~= rev then
            -- the data before its rev: a worker that sees the new rev finds the new data
            local ok, err = routes:safe_set("d:" .. name, rev .. json)
            if ok then
                ok, err = routes:safe_set(rkey, rev)
            end
            if not ok then
                return nil, err
            end
            changed = changed + 1
        end
    end
    for i = 1, #moved do
        local name, hosts = moved[i][1], moved[i][3]
        for host in gmatch(hosts, "[^ ]+") do
            local ok, err = routes:safe_set("h:" .. host, name)
            if not ok then
                return nil, err
            end
        end
        local ok, err = routes:safe_set("n:" .. name, hosts)
        if not ok then
            return nil, err
        end
    end
    return changed
end

-- The `names` key set to `listed` (written only when it changed); then the counts of what was
-- applied, or nil and what the dict said.
local function set_names(listed, changed, removed)
    local text = concat(listed, "\n")
    if text ~= routes:get("names") then
        local ok, err = routes:safe_set("names", text)
        if not ok then
            return nil, err
        end
    end
    return changed, removed
end

-- A base: every service it does not list goes. Changed and removed counts, or nil and what
-- the dict said.
local function apply_base(lines, names)
    local removed = 0
    for name in gmatch(routes:get("names") or "", "[^\n]+") do
        if not names[name] then
            drop(name)
            removed = removed + 1
        end
    end
    local changed, err = upsert(lines)
    if not changed then
        return nil, err
    end
    local listed = {}
    for i = 1, #lines do
        listed[i] = lines[i][1]
    end
    return set_names(listed, changed, removed)
end

-- A delta: the services it lists replace or remove theirs, the others stay.
local function apply_delta(lines)
    local removed, gone = 0, {}
    for i = 1, #lines do
        local name = lines[i][1]
        if not lines[i][2] then
            gone[name] = true
            if drop(name) then
                removed = removed + 1
            end
        end
    end
    local changed, err = upsert(lines)
    if not changed then
        return nil, err
    end
    local listed, known = {}, {}
    for name in gmatch(routes:get("names") or "", "[^\n]+") do
        if not gone[name] then
            listed[#listed + 1] = name
            known[name] = true
        end
    end
    for i = 1, #lines do
        local name = lines[i][1]
        if lines[i][2] and not known[name] then
            listed[#listed + 1] = name
        end
    end
    return set_names(listed, changed, removed)
end

-- Tells the workers' memos of host names that routing changed: after every write of the
-- loader's, one applied in part too.
local function routing_changed()
    if not routes:incr("gen", 1) then
        routes:safe_set("gen", 1)
    end
end

-- Whether version `a` is after `b` (digit strings without leading zeros: any length).
local function after(a, b)
    return #a > #b or (#a == #b and a > b)
end

local function elapsed(started)
    return format("%.2f", (os.clock() - started) * 1000)
end

-- The base file, applied whole when its version is not the one applied. False when what it
-- began is not finished (a full dict): no delta goes over a base applied in part.
local function load_base()
    local started = os.clock()
    local f, err = io.open(conf.state_path, "rb")
    if not f then
        refuse("state", "open", WARN, "cannot be read (", err, "); services keep what they",
            " had (none yet: they answer 503) until the controller writes it")
        return true
    end
    local header = f:read("*l") or ""
    local format_id, version, count = match(header, "^controlplane%-state (%d+) ([1-9]%d*) (%d+)$")
    local applied = format_id == FORMAT and FORMAT .. "|" .. version
    if applied and applied == routes:get("version") then
        f:close()
        return true
    end
    local size = f:seek("end")
    local bad_key = header .. "\0" .. tostring(size)
    if bad_key == last_bad.state then -- the same bad file as at the last poll
        f:close()
        return true
    end
    if format_id ~= FORMAT then
        f:close()
        refuse("state", bad_key, ERR, "its header ", format("%q", sub(header, 1, 80)),
            " is not `controlplane-state ", FORMAT, " <version> <services>`; the state is",
            " kept as it was")
        return true
    end
    f:seek("set", #header + 1)
    local rest = f:read("*a") or ""
    f:close()
    local lines, names = parse(rest, tonumber(count), false)
    if not lines then
        refuse("state", bad_key, ERR, "version ", version, " ignored whole: ", names,
            "; the state is kept as it was")
        return true
    end
    local changed, removed = apply_base(lines, names)
    routing_changed()
    local ok
    ok, err = changed ~= nil, removed
    if ok then
        ok, err = routes:safe_set("version", applied)
    end
    if not ok then
        -- a full dict is no bad file: told once, and tried again at every poll
        refuse("state", "full " .. bad_key, ERR, "version ", version, " not fully applied: ",
            "lua_shared_dict ", conf.routes, " said ", err, "; raise its size")
        return false
    end
    routes:delete("delta") -- what went over the last base is in this one
    last_bad.state = nil
    log(INFO, "controlplane: state version ", version, " applied: ", changed, " of ", #lines,
        " services changed, ", removed, " removed, in ", elapsed(started), " ms")
    return true
end

-- The delta file, applied when it goes over the base applied and is not applied yet. One
-- over another base is older, or its base comes at the next poll: left alone, unsaid.
local function load_delta()
    local started = os.clock()
    local f, err, code = io.open(conf.delta_path, "rb")
    if not f then
        if code ~= 2 then -- ENOENT: no delta since the base, nothing to say
            refuse("delta", "open", WARN, "cannot be read (", err, "); the services it",
                " changes keep what they had until the controller writes it")
        end
        return
    end
    local header = f:read("*l") or ""
    local format_id, base, version, count =
        match(header, "^controlplane%-delta (%d+) ([1-9]%d*) ([1-9]%d*) (%d+)$")
    if format_id == FORMAT and (FORMAT .. "|" .. base ~= routes:get("version")
            or version == routes:get("delta")) then
        f:close()
        return
    end
    local size = f:seek("end")
    local bad_key = header .. "\0" .. tostring(size)
    if bad_key == last_bad.delta then
        f:close()
        return
    end
    if format_id ~= FORMAT or not after(version, base) then
        f:close()
        return refuse("delta", bad_key, ERR, "its header ", format("%q", sub(header, 1, 80)),
            " is not `controlplane-delta ", FORMAT, " <base version> <version> <services>`",
            " with a version after its base's; the state is kept as it was")
    end
    f:seek("set", #header + 1)
    local rest = f:read("*a") or ""
    f:close()
    local lines, why = parse(rest, tonumber(count), true)
    if not lines then
        return refuse("delta", bad_key, ERR, "version ", version, " (over base ", base,
            ") ignored whole: ", why, "; the state is kept as it was")
    end
    local changed, removed = apply_delta(lines)
    routing_changed()
    local ok
    ok, err = changed ~= nil, removed
    if ok then
        ok, err = routes:safe_set("delta", version)
    end
    if not ok then
        return refuse("delta", "full " .. bad_key, ERR, "version ", version, " not fully",
            " applied: lua_shared_dict ", conf.routes, " said ", err, "; raise its size")
    end
    last_bad.delta = nil
    log(INFO, "controlplane: state version ", version, " applied over base ", base, ": ",
        changed, " changed, ", removed, " removed of ", #lines, " listed, in ",
        elapsed(started), " ms")
end

local function load()
    if load_base() then
        load_delta()
    end
end

-- One loader at a time, worker 0's polls or another's first request: a lock in `routes`.
-- False when another worker holds it.
load_once = function()
    local locked, err = routes:safe_add("loading", true, LOCK_TTL)
    if not locked and err ~= "no memory" then -- a full dict can't lock: load unlocked
        return false
    end
    local ok, why = pcall(load)
    if locked then
        routes:delete("loading")
    end
    if not ok then
        log(ERR, "controlplane: loading the state failed: ", why)
    end
    return true
end

local function poll(premature)
    if not premature then
        load_once()
    end
end

function M.init_worker()
    -- each worker its own sequence: random and random two must not pick in step
    math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
    if not conf then
        return
    end
    if stats then
        pid = ngx.worker.pid()
        local ok, err = ngx.timer.every(1, flush)
        if not ok then
            log(ERR, "controlplane: cannot start sending traffic figures: ", err)
        end
    end
    local id = ngx.worker.id()
    if id ~= nil and id ~= 0 then
        return
    end
    local ok, err = ngx.timer.at(0, poll)
    if ok then
        ok, err = ngx.timer.every(conf.poll, poll)
    end
    if not ok then
        log(ERR, "controlplane: cannot start the state loader: ", err)
    end
end

return M
