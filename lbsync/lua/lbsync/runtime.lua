-- lbsync's nginx runtime mode: upstream membership from a shared dict, fed by lbsync over
-- a loopback control location, so membership changes need no reload.
--
-- Wiring (the stock template renders all of it; see docs/nginx-runtime.md):
--
--   http {
--     lua_package_path "<dir of this file's parent>/?.lua;;";   -- ";;" keeps resty.core
--     lua_shared_dict lbsync 16m;
--     init_by_lua_block        { require("lbsync.runtime").init("<control token file>") }
--     init_worker_by_lua_block { require("lbsync.runtime").init_worker() }
--     upstream app {
--       server 10.0.0.5:8080 weight=1;      -- static list: fallback, and what nginx -t needs
--       balancer_by_lua_block { require("lbsync.runtime").balance("app") }
--       keepalive 32;                       -- after the balancer, or keepalive is off
--     }
--     server { listen 127.0.0.1:8089;       -- the control endpoint, loopback + token only
--       location /lbsync/ { allow 127.0.0.1; allow ::1; deny all;
--         content_by_lua_block { require("lbsync.runtime").control() } } }
--     ... location / { access_by_lua_block { require("lbsync.runtime").access("app") }
--                      proxy_pass http://app; }
--   }
--
-- Generations. Every config load (start, reload) runs init() in the master and gets a new
-- generation "<seq>.<pid>.<ms>" (seq counts loads in the shared dict), which its workers
-- inherit; the workers of a generation publish it (init_worker), so a load that fails
-- never does. Pushed lists are tagged with the published generation, and a worker uses a
-- list tagged with its own generation or a newer one, never an older one. So right after
-- a reload or restart every upstream serves the static list just loaded (rendered by
-- lbsync from the same catalog) until lbsync pushes again, while workers of the previous
-- generation, finishing their last requests, follow the newest pushes rather than the
-- static lists they loaded long ago.
--
-- Authentication. Any local process can reach a loopback port, so every request must
-- carry the header "X-Lbsync-Token: <token>", compared in constant time with the token
-- that init() read from the token file lbsync wrote (0600, 64 hex digits). init() runs in
-- the master while it loads the config, before workers are forked and drop privileges,
-- so the file need not be readable by nginx's worker user; workers inherit the value.
-- A missing or wrong token answers 403 and changes nothing. Without a readable token file
-- the endpoint refuses everything (logged at load); the file is re-read at every reload.
--
-- Control API (JSON):
--   GET  <location>                  -> {"generation": "...", "services": {"app": {"revision": 12,
--                                       "digest": "<sha1>", "peers": 3, "up": 2}}}
--                                       (only lists pushed for the current generation)
--   GET  <location>services/<name>   -> {"revision": 12, "digest": "...", "peers": [...]}, or 404
--   POST <location>services/<name>   {"revision": 12, "peers": [{"id": "i1", "host": "10.0.0.5",
--                                       "port": 8080, "weight": 1, "state": "up"|"drain"}],
--                                       "force": true (optional: store whatever is held)}
--       -> 200 {"applied": true}         stored
--       -> 200 {"applied": false}        same revision as stored: nothing to do (idempotent)
--       -> 409 {"revision": <stored>}    older than what is stored: refused (unless force)
--       -> 400 {"error": "..."}          malformed; 507 when the shared dict is full
--       -> 403 {"error": "..."}          no token, a wrong token, or none loaded
--
-- The shared dict holds, per service, "p:<name>" (the peer list as JSON), "d:<name>" (its
-- digest, see digest()) and "v:<name>" ("<generation>|<revision>"); each worker keeps the
-- decoded list and the smooth weighted round robin state, and re-reads the list only when
-- "v:<name>" changes. lbsync compares revision and digest with what it pushed at every
-- poll, so a list changed by anyone else is found without sending whole lists each time.

local bit = require("bit")
local cjson = require("cjson.safe")
local ngx_balancer = require("ngx.balancer")

local ngx = ngx
local tonumber, tostring, type, pairs, ipairs = tonumber, tostring, type, pairs, ipairs
local math = math
local str_find, str_sub, str_match, str_format = string.find, string.sub, string.match, string.format
local str_byte, bor, bxor = string.byte, bit.bor, bit.bxor
local tbl_concat = table.concat

local DICT_NAME = "lbsync"
local CURRENT_KEY = "lbsync:generation"
local CYCLES_KEY = "lbsync:cycles"
local MAX_WEIGHT = 65535
local LOCK_TRIES = 1000 -- x 1 ms: how long a push waits for another push of the same service
local NGX_BUSY = -3 -- from the balancer: "no live upstreams", nginx answers 502
local TOKEN_LENGTH = 64 -- hex digits: 32 random bytes

local _M = { _VERSION = "1" }

local dict -- ngx.shared.lbsync
local generation -- this config load's generation id (set in the master, inherited)
local sequence -- its load count: generations order by it
local token -- the control token, read by the master in init() (nil: refuse every request)
local cache = {} -- per worker: service -> {tag = ..., peers = {...}, up = n} | {tag = ..., static = true}

local function shared_dict()
    local d = ngx.shared[DICT_NAME]
    if not d then
        error("lbsync: `lua_shared_dict " .. DICT_NAME .. " <size>;` is missing from the http block")
    end
    return d
end

-- The token in ``path`` (64 hex digits, an optional newline), or nil and why.
local function read_token(path)
    if type(path) ~= "string" then
        return nil, "no token file configured"
    end
    local file, err = io.open(path, "rb")
    if not file then
        return nil, err
    end
    local data = file:read(TOKEN_LENGTH + 2) or ""
    file:close()
    local value = str_match(data, "^([0-9a-f]+)\n?$")
    if not value or #value ~= TOKEN_LENGTH then
        return nil, path .. ": not " .. TOKEN_LENGTH .. " lowercase hex digits"
    end
    return value
end

-- init_by_lua: a fresh generation for this config load, and the control token. A broken
-- module fails here, so the reload fails and the old workers keep serving (nginx -t never
-- runs Lua). An unreadable token does not fail the load (the static lists still serve);
-- the control endpoint refuses every request until a reload reads a good one.
function _M.init(token_file)
    local why
    token, why = read_token(token_file)
    if not token then
        ngx.log(ngx.ERR, "lbsync: control endpoint refuses every request: no token: ", why)
    end
    dict = shared_dict()
    local count, err = dict:incr(CYCLES_KEY, 1, 0)
    if not count then
        error("lbsync: cannot count config loads in the shared dict: " .. tostring(err))
    end
    ngx.update_time()
    sequence = count
    generation = str_format("%d.%d.%d", count, ngx.worker.pid(), math.floor(ngx.now() * 1000))
end

local function sequence_of(gen)
    return tonumber(str_match(gen or "", "^(%d+)%.")) or 0
end

-- init_worker_by_lua: runs only in workers of a config that loaded, so a failed reload
-- never publishes its generation.
function _M.init_worker()
    if not generation then
        error("lbsync: init() did not run (is `init_by_lua_block` missing?)")
    end
    local current = dict:get(CURRENT_KEY)
    if current ~= generation then
        local ok, err = dict:safe_set(CURRENT_KEY, generation)
        if not ok then
            ngx.log(ngx.ERR, "lbsync: cannot publish generation ", generation, ": ", err)
        end
    end
end

local function split_tag(tag)
    local bar = str_find(tag, "|", 1, true)
    if not bar then
        return nil, nil
    end
    return str_sub(tag, 1, bar - 1), tonumber(str_sub(tag, bar + 1))
end

-- The pushed list of a service for this worker's generation, or nil (use the static list).
local function current(service)
    local tag = dict:get("v:" .. service)
    if not tag then
        return nil
    end
    local entry = cache[service]
    if entry and entry.tag == tag then
        if entry.static then
            return nil
        end
        return entry
    end
    local gen = split_tag(tag)
    if gen ~= generation and sequence_of(gen) <= sequence then
        cache[service] = { tag = tag, static = true } -- pushed for an older config
        return nil
    end
    local peers = cjson.decode(dict:get("p:" .. service) or "")
    if type(peers) ~= "table" then
        ngx.log(ngx.ERR, "lbsync: unreadable peer list for ", service, ": static list used")
        cache[service] = { tag = tag, static = true }
        return nil
    end
    local up = 0
    for _, peer in ipairs(peers) do
        peer.current = 0 -- smooth weighted round robin state, per worker
        peer.key = peer.host .. ":" .. peer.port
        if str_find(peer.host, ":", 1, true) then
            peer.addr = "[" .. peer.host .. "]" -- set_current_peer wants IPv6 bracketed
        else
            peer.addr = peer.host
        end
        if peer.state == "up" then
            up = up + 1
        end
    end
    entry = { tag = tag, peers = peers, up = up }
    cache[service] = entry
    return entry
end

-- Smooth weighted round robin (nginx's own algorithm): every usable peer gains its
-- weight, the richest is chosen and pays the total. Draining peers and peers this
-- request already tried are skipped.
local function pick(entry, tried)
    local best, total = nil, 0
    for _, peer in ipairs(entry.peers) do
        if peer.state == "up" and not tried[peer.key] then
            peer.current = peer.current + peer.weight
            total = total + peer.weight
            if not best or peer.current > best.current then
                best = peer
            end
        end
    end
    if best then
        best.current = best.current - total
    end
    return best
end

-- access_by_lua: a service that was pushed with no usable peer answers 503 here, cleanly
-- (from the balancer nginx could only answer 500 or 502).
function _M.access(service)
    local entry = current(service)
    if entry and entry.up == 0 then
        return ngx.exit(ngx.HTTP_SERVICE_UNAVAILABLE)
    end
end

-- balancer_by_lua: choose a peer; on a retry (proxy_next_upstream) choose one not tried
-- yet; with none left, nginx's own "no live upstreams" (502).
function _M.balance(service)
    local entry = current(service)
    if not entry then
        return -- not pushed for this config: nginx balances over the static list
    end
    local ctx = ngx.ctx
    local tried = ctx.lbsync_tried
    if not tried then
        tried = {}
        ctx.lbsync_tried = tried
        if entry.up > 1 then
            local ok, err = ngx_balancer.set_more_tries(entry.up - 1)
            if not ok then
                ngx.log(ngx.WARN, "lbsync: set_more_tries: ", err)
            end
        end
    end
    local peer = pick(entry, tried)
    if not peer then
        return ngx.exit(NGX_BUSY)
    end
    tried[peer.key] = true
    local ok, err = ngx_balancer.set_current_peer(peer.addr, peer.port)
    if not ok then
        ngx.log(ngx.ERR, "lbsync: set_current_peer ", peer.key, ": ", err)
        return ngx.exit(NGX_BUSY)
    end
end

-- --- control ---------------------------------------------------------------------------

local function reply(status, body)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.say(cjson.encode(body))
    return ngx.exit(ngx.HTTP_OK)
end

local function is_integer(value, low, high)
    return type(value) == "number" and value % 1 == 0 and value >= low and value <= high
end

local function is_ipv4(host)
    local a, b, c, d = str_match(host, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then
        return false
    end
    for _, part in ipairs({ a, b, c, d }) do
        if #part > 3 or tonumber(part) > 255 then
            return false
        end
    end
    return true
end

local function is_ipv6(host)
    return #host <= 45 and str_find(host, ":", 1, true) ~= nil and str_match(host, "^[%x:.]+$") ~= nil
end

-- The peer list of a push, checked field by field; nil and a reason if anything is off.
local function checked_peers(peers)
    if type(peers) ~= "table" then
        return nil, "peers must be a list"
    end
    local out = {}
    for i, peer in ipairs(peers) do
        if type(peer) ~= "table" then
            return nil, "peer " .. i .. " is not an object"
        end
        local host = peer.host
        if type(host) ~= "string" or not (is_ipv4(host) or is_ipv6(host)) then
            return nil, "peer " .. i .. ": host must be an IP address"
        end
        if not is_integer(peer.port, 1, 65535) then
            return nil, "peer " .. i .. ": port must be an integer from 1 to 65535"
        end
        local weight = peer.weight
        if weight == nil then
            weight = 1
        end
        if not is_integer(weight, 1, MAX_WEIGHT) then
            return nil, "peer " .. i .. ": weight must be an integer from 1 to " .. MAX_WEIGHT
        end
        local state = peer.state or "up"
        if state ~= "up" and state ~= "drain" then
            return nil, "peer " .. i .. ": state must be up or drain"
        end
        local id = peer.id
        if id ~= nil and type(id) ~= "string" then
            return nil, "peer " .. i .. ": id must be a string"
        end
        out[i] = { id = id, host = host, port = peer.port, weight = weight, state = state }
    end
    local keys = 0
    for _ in pairs(peers) do
        keys = keys + 1
    end
    if keys ~= #out then
        return nil, "peers must be a list"
    end
    return out
end

-- SHA-1 (hex) of the checked peers, each field length-prefixed so no two lists share an
-- encoding; lbsync computes the same over what it pushed (nginx_control.digest).
local function digest(peers)
    local parts = {}
    for i, peer in ipairs(peers) do
        local fields = { peer.id or "", peer.host, str_format("%d", peer.port),
            str_format("%d", peer.weight), peer.state }
        for j, field in ipairs(fields) do
            fields[j] = #field .. ":" .. field
        end
        parts[i] = tbl_concat(fields, ",")
    end
    local raw = ngx.sha1_bin(tbl_concat(parts, "\n"))
    return (raw:gsub(".", function(c)
        return str_format("%02x", str_byte(c))
    end))
end

local function request_body()
    ngx.req.read_body()
    local data = ngx.req.get_body_data()
    if data then
        return data
    end
    local path = ngx.req.get_body_file() -- larger than client_body_buffer_size
    if not path then
        return nil
    end
    local file = io.open(path, "rb")
    if not file then
        return nil
    end
    data = file:read("*a")
    file:close()
    return data
end

local function lock(service)
    local key = "l:" .. service
    for _ = 1, LOCK_TRIES do
        if dict:safe_add(key, true, 5) then
            return key
        end
        ngx.sleep(0.001)
    end
    return nil
end

local function push(service)
    local body = cjson.decode(request_body() or "")
    if type(body) ~= "table" then
        return reply(400, { error = "the body must be a JSON object" })
    end
    local revision = body.revision
    if not is_integer(revision, 0, 2 ^ 53) then
        return reply(400, { error = "revision must be a non-negative integer" })
    end
    local peers, why = checked_peers(body.peers)
    if not peers then
        return reply(400, { error = why })
    end
    local current_gen = dict:get(CURRENT_KEY) or generation
    local held = lock(service)
    if not held then
        return reply(503, { error = "another push of " .. service .. " is stuck" })
    end
    local stored_gen, stored = split_tag(dict:get("v:" .. service) or "")
    if stored_gen == current_gen and stored and body.force ~= true then
        if revision < stored then
            dict:delete(held)
            return reply(409, { error = "stale revision", revision = stored, generation = current_gen })
        end
        if revision == stored then
            dict:delete(held)
            return reply(200, { applied = false, revision = stored, generation = current_gen })
        end
    end
    -- The list first, then the tag that makes workers read it.
    local ok, err = dict:safe_set("p:" .. service, cjson.encode(peers))
    if ok then
        ok, err = dict:safe_set("d:" .. service, digest(peers))
    end
    if ok then
        ok, err = dict:safe_set("v:" .. service, current_gen .. "|" .. str_format("%d", revision))
    end
    dict:delete(held)
    if not ok then
        ngx.log(ngx.ERR, "lbsync: cannot store the peers of ", service, ": ", err)
        return reply(507, { error = "shared dict: " .. tostring(err) })
    end
    return reply(200, { applied = true, revision = revision, generation = current_gen })
end

local function status()
    local current_gen = dict:get(CURRENT_KEY) or generation
    local services = {}
    for _, key in ipairs(dict:get_keys(0)) do
        if str_sub(key, 1, 2) == "v:" then
            local name = str_sub(key, 3)
            local gen, revision = split_tag(dict:get(key) or "")
            if gen == current_gen then
                local entry = current(name) or {}
                services[name] = {
                    revision = revision,
                    digest = dict:get("d:" .. name),
                    peers = entry.peers and #entry.peers or nil,
                    up = entry.up,
                }
            end
        end
    end
    return reply(200, { generation = current_gen, worker_generation = generation, services = services })
end

-- One upstream's list as stored, for lbsync to show what it found when a digest differs.
local function held(service)
    local current_gen = dict:get(CURRENT_KEY) or generation
    local gen, revision = split_tag(dict:get("v:" .. service) or "")
    if gen ~= current_gen then
        return reply(404, { error = "no list pushed for " .. service .. " in this generation" })
    end
    local peers = cjson.decode(dict:get("p:" .. service) or "")
    return reply(200, { revision = revision, digest = dict:get("d:" .. service), peers = peers })
end

-- Constant time in the secret's content: no early exit on the first differing byte.
local function same_secret(given, secret)
    if type(given) ~= "string" or #given ~= #secret then
        return false
    end
    local diff = 0
    for i = 1, #secret do
        diff = bor(diff, bxor(str_byte(given, i), str_byte(secret, i)))
    end
    return diff == 0
end

-- content_by_lua of the control location.
function _M.control()
    if not token then
        return reply(403, { error = "no control token loaded: see nginx's error log" })
    end
    if not same_secret(ngx.var.http_x_lbsync_token, token) then
        return reply(403, { error = "missing or wrong X-Lbsync-Token" })
    end
    local method = ngx.req.get_method()
    local service = str_match(ngx.var.uri, "/services/([%w][%w_.%-]*)$")
    if method == "GET" and not service then
        return status()
    end
    if method == "GET" and service and #service <= 63 then
        return held(service)
    end
    if method == "POST" and service and #service <= 63 then
        return push(service)
    end
    return reply(404, { error = "GET <location>, GET or POST <location>services/<name>" })
end

return _M
