/* The Lua scripts of the cluster module. Route values are
 * "NODE|EPOCH|PLATFORM|DEVICE|PEER|SINCE_MS|TRANSPORT"; a lease
 * registration is "NODE|EPOCH". Every write that concerns ownership
 * compares epochs inside Redis, so the decision and the write are atomic. */
#ifndef IM_REDIS_SCRIPTS_H
#define IM_REDIS_SCRIPTS_H

/* KEYS: node key, nodeids hash, leases set.
 * ARGV: name, epoch, ttl_ms, ws, tcp, conns, draining, first node-id slot.
 * Returns the node id (0..1023); -1 when a live node holds the name under
 * another epoch; -2 when all 1024 node ids are leased. */
#define LUA_LEASE_ACQUIRE                                                                    \
  "local cur = redis.call('HGET', KEYS[1], 'epoch')\n"                                     \
  "if cur and cur ~= ARGV[2] then return -1 end\n"                                          \
  "local t = redis.call('TIME')\n"                                                          \
  "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"                 \
  "local id = -1\n"                                                                         \
  "for i = 0, 1023 do\n"                                                                    \
  "  local k = (tonumber(ARGV[8]) + i) % 1024\n"                                            \
  "  local v = redis.call('HGET', KEYS[2], k)\n"                                            \
  "  if not v then id = k break end\n"                                                      \
  "  local n, e, x = string.match(v, '^(.*)|(%d+)|(%d+)$')\n"                               \
  "  if n == ARGV[1] or tonumber(x) < now then id = k break end\n"                          \
  "end\n"                                                                                   \
  "if id < 0 then return -2 end\n"                                                          \
  "redis.call('HSET', KEYS[2], id, ARGV[1] .. '|' .. ARGV[2] .. '|' .. (now + tonumber(ARGV[3])))\n" \
  "redis.call('DEL', KEYS[1])\n"                                                            \
  "redis.call('HSET', KEYS[1], 'name', ARGV[1], 'epoch', ARGV[2], 'node_id', id,"          \
  " 'ws', ARGV[4], 'tcp', ARGV[5], 'conns', ARGV[6], 'draining', ARGV[7])\n"                \
  "redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"                                               \
  "redis.call('SADD', KEYS[3], ARGV[1] .. '|' .. ARGV[2])\n"                                \
  "return id\n"

/* KEYS: node key, nodeids hash. ARGV: name, epoch, ttl_ms, conns,
 * draining, node id. Returns 1, or 0 when the lease is lost (expired, or
 * taken under another epoch). */
#define LUA_LEASE_RENEW                                                                      \
  "if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return 0 end\n"                  \
  "local t = redis.call('TIME')\n"                                                          \
  "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"                 \
  "redis.call('HSET', KEYS[1], 'conns', ARGV[4], 'draining', ARGV[5])\n"                    \
  "redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"                                               \
  "redis.call('HSET', KEYS[2], ARGV[6], ARGV[1] .. '|' .. ARGV[2] .. '|' .. (now + tonumber(ARGV[3])))\n" \
  "return 1\n"

/* KEYS: node key, nodeids hash, leases set. ARGV: name, epoch, node id.
 * Gives the lease back if it is still ours. */
#define LUA_LEASE_RELEASE                                                                    \
  "if redis.call('HGET', KEYS[1], 'epoch') == ARGV[2] then\n"                               \
  "  redis.call('DEL', KEYS[1])\n"                                                          \
  "  local v = redis.call('HGET', KEYS[2], ARGV[3])\n"                                      \
  "  if v and string.match(v, '^(.*|%d+)|') == ARGV[1] .. '|' .. ARGV[2] then\n"            \
  "    redis.call('HDEL', KEYS[2], ARGV[3]) end\n"                                          \
  "end\n"                                                                                   \
  "return 1\n"

/* KEYS: route hash of a uid, the node's route index (a set of uids).
 * ARGV: field, value, epoch, uid. Refuses (0) when the field holds a
 * route of a newer epoch. */
#define LUA_ROUTE_PUT                                                                        \
  "local cur = redis.call('HGET', KEYS[1], ARGV[1])\n"                                      \
  "if cur then\n"                                                                           \
  "  local e = tonumber(string.match(cur, '^[^|]*|(%d+)|'))\n"                              \
  "  if e and e > tonumber(ARGV[3]) then return 0 end\n"                                    \
  "end\n"                                                                                   \
  "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])\n"                                         \
  "redis.call('SADD', KEYS[2], ARGV[4])\n"                                                  \
  "return 1\n"

/* KEYS: route hash, the node's route index. ARGV: field, epoch, uid, the
 * node's "NODE|EPOCH". Deletes only a route of exactly this epoch: 1 when
 * deleted, 0 when not ours (or gone). The uid leaves the route index once
 * no route of this node and epoch is left in the hash: decided here, in
 * one atomic step, because the threads of one node close a uid's
 * connections at once on connections of their own (each would see the
 * other's still open), and a route written meanwhile adds the uid again. */
#define LUA_ROUTE_DEL                                                                        \
  "local cur = redis.call('HGET', KEYS[1], ARGV[1])\n"                                      \
  "local mine = cur and string.match(cur, '^[^|]*|(%d+)|') == ARGV[2]\n"                   \
  "if mine then redis.call('HDEL', KEYS[1], ARGV[1]) end\n"                                 \
  "local p = ARGV[4] .. '|'\n"                                                              \
  "for _, v in ipairs(redis.call('HVALS', KEYS[1])) do\n"                                   \
  "  if string.sub(v, 1, #p) == p then return mine and 1 or 0 end\n"                        \
  "end\n"                                                                                   \
  "redis.call('SREM', KEYS[2], ARGV[3])\n"                                                  \
  "return mine and 1 or 0\n"

/* KEYS: the leases set. ARGV: prefix, this node's "NODE|EPOCH".
 * For every registration whose lease lapsed (node key gone, or holding
 * another epoch): delete exactly that epoch's routes, its route index,
 * its delivery stream when no node of that name lives, and the
 * registration. Returns the purged registrations. (Touches keys it is not
 * given: for a single Redis, like the store.) */
#define LUA_PURGE                                                                            \
  "local dead = {}\n"                                                                       \
  "for _, reg in ipairs(redis.call('SMEMBERS', KEYS[1])) do\n"                              \
  "  if reg ~= ARGV[2] then\n"                                                              \
  "    local name, ep = string.match(reg, '^(.*)|(%d+)$')\n"                                \
  "    local cur = redis.call('HGET', ARGV[1] .. 'node:' .. name, 'epoch')\n"               \
  "    if cur ~= ep then\n"                                                                 \
  "      local idx = ARGV[1] .. 'noderoutes:' .. reg\n"                                     \
  "      for _, uid in ipairs(redis.call('SMEMBERS', idx)) do\n"                            \
  "        local rk = ARGV[1] .. 'route:{' .. uid .. '}'\n"                                 \
  "        local kv = redis.call('HGETALL', rk)\n"                                          \
  "        for i = 1, #kv, 2 do\n"                                                          \
  "          local n, e = string.match(kv[i + 1], '^([^|]*)|(%d+)|')\n"                     \
  "          if n == name and e == ep then redis.call('HDEL', rk, kv[i]) end\n"             \
  "        end\n"                                                                           \
  "      end\n"                                                                             \
  "      redis.call('DEL', idx)\n"                                                          \
  "      if not cur then redis.call('DEL', ARGV[1] .. 'deliver:{' .. name .. '}') end\n"    \
  "      redis.call('SREM', KEYS[1], reg)\n"                                                \
  "      dead[#dead + 1] = reg\n"                                                           \
  "    end\n"                                                                               \
  "  end\n"                                                                                 \
  "end\n"                                                                                   \
  "return dead\n"

/* Lua functions shared by ROUTE_PUSH and by an application's own scripts
 * (im_redis_push_lua()):
 *   im_nodes(key, self): the nodes other than self that hold a route in
 *     the route hash key, each once.
 *   im_push(self, prefix, maxlen, head, uids, seqs): for a message whose
 *     record head (redis_wire.h) is head, appends to each other node that
 *     holds one of uids, in one stream entry per node, a record per uid it
 *     holds, carrying that uid's seq (patched into the head at byte 6).
 *     Returns the number of streams written. */
#define LUA_PUSH_FNS                                                                         \
  "local function im_nodes(key, self)\n"                                                   \
  "  local seen, arr = {}, {}\n"                                                           \
  "  for _, v in ipairs(redis.call('HVALS', key)) do\n"                                    \
  "    local n = string.match(v, '^([^|]*)|')\n"                                           \
  "    if n and n ~= self and not seen[n] then seen[n] = true arr[#arr + 1] = n end\n"     \
  "  end\n"                                                                                \
  "  return arr\n"                                                                         \
  "end\n"                                                                                  \
  "local function im_push(self, prefix, maxlen, head, uids, seqs)\n"                       \
  "  local out, order = {}, {}\n"                                                          \
  "  local a, b = string.sub(head, 1, 5), string.sub(head, 14)\n"                          \
  "  for i, uid in ipairs(uids) do\n"                                                      \
  "    local rec\n"                                                                        \
  "    for _, node in ipairs(im_nodes(prefix .. 'route:{' .. uid .. '}', self)) do\n"     \
  "      rec = rec or (a .. struct.pack('<I8', seqs[i]) .. b .. struct.pack('<I4', 1) .."  \
  " struct.pack('<I4', #uid + 1) .. uid .. '\\0')\n"                                      \
  "      if not out[node] then out[node] = {} order[#order + 1] = node end\n"              \
  "      local o = out[node]\n"                                                            \
  "      o[#o + 1] = rec\n"                                                                \
  "    end\n"                                                                              \
  "  end\n"                                                                                \
  "  for _, node in ipairs(order) do\n"                                                    \
  "    redis.call('XADD', prefix .. 'deliver:{' .. node .. '}', 'MAXLEN', '~', maxlen, '*',"\
  " 'b', table.concat(out[node]))\n"                                                       \
  "  end\n"                                                                                \
  "  return #order\n"                                                                      \
  "end\n"

/* KEYS: the route hashes of the uids of a loop pass's sends (distinct).
 * ARGV: this node, prefix, stream MAXLEN, R, then per send: its record head
 * (redis_wire.h), n, n key indexes (1-based), n uids. Finds the other nodes
 * holding each uid and XADDs to each such node's delivery stream, in one
 * entry, the send's record with the uids that node holds (records in send
 * order). So a pass's cross-node sends cost one command, not a lookup and
 * then XADDs. Returns the number of streams written. (Touches keys it is
 * not given: for a single Redis, like the store.) */
#define LUA_ROUTE_PUSH                                                                       \
  LUA_PUSH_FNS                                                                             \
  "local nodes_of = {}\n"                                                                  \
  "for i, k in ipairs(KEYS) do nodes_of[i] = im_nodes(k, ARGV[1]) end\n"                   \
  "local out, order, a = {}, {}, 5\n"                                                      \
  "for r = 1, tonumber(ARGV[4]) do\n"                                                      \
  "  local head, n = ARGV[a], tonumber(ARGV[a + 1])\n"                                     \
  "  a = a + 2\n"                                                                          \
  "  local per, pord = {}, {}\n"                                                           \
  "  for i = 0, n - 1 do\n"                                                                \
  "    local uid = ARGV[a + n + i]\n"                                                      \
  "    for _, node in ipairs(nodes_of[tonumber(ARGV[a + i])]) do\n"                        \
  "      if not per[node] then per[node] = {} pord[#pord + 1] = node end\n"                \
  "      local l = per[node]\n"                                                            \
  "      l[#l + 1] = struct.pack('<I4', #uid + 1) .. uid .. '\\0'\n"                      \
  "    end\n"                                                                              \
  "  end\n"                                                                                \
  "  a = a + 2 * n\n"                                                                      \
  "  for _, node in ipairs(pord) do\n"                                                     \
  "    if not out[node] then out[node] = {} order[#order + 1] = node end\n"                \
  "    local o = out[node]\n"                                                              \
  "    o[#o + 1] = head .. struct.pack('<I4', #per[node]) .. table.concat(per[node])\n"    \
  "  end\n"                                                                                \
  "end\n"                                                                                  \
  "for _, node in ipairs(order) do\n"                                                      \
  "  redis.call('XADD', ARGV[2] .. 'deliver:{' .. node .. '}', 'MAXLEN', '~', ARGV[3], '*',"\
  " 'b', table.concat(out[node]))\n"                                                       \
  "end\n"                                                                                  \
  "return #order\n"

/* KEYS: the leases set. ARGV: prefix. Every live node as
 * [name, ws, tcp, conns, draining]. */
#define LUA_NODES                                                                            \
  "local out = {}\n"                                                                        \
  "for _, reg in ipairs(redis.call('SMEMBERS', KEYS[1])) do\n"                              \
  "  local name, ep = string.match(reg, '^(.*)|(%d+)$')\n"                                  \
  "  local v = redis.call('HMGET', ARGV[1] .. 'node:' .. name, 'epoch', 'ws', 'tcp',"       \
  " 'conns', 'draining')\n"                                                                 \
  "  if v[1] == ep then out[#out + 1] = {name, v[2] or '', v[3] or '', v[4] or '0',"         \
  " v[5] or '0'} end\n"                                                                     \
  "end\n"                                                                                   \
  "return out\n"

#endif
