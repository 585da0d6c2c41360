-- wrk script for bench/http_throughput.py: POST /log with valid, unique messages.
--
-- Environment:
--   START       the first content_id of this run (default 1)
--   THREADS     wrk's -t (the content_id stride: thread k of T sends START+k,
--               START+k+T, ...), so no two messages of a run share a content_id
--   BATCH       messages per request (default 1): 1 sends one JSON document
--               (Content-Type: application/json); more send that many NDJSON
--               lines (Content-Type: application/x-ndjson)
--   TEXT_BYTES  the size of a random-hex text (default 0: a short text with one
--               non-ASCII letter)
-- Messages go to 10 clients (client_id 1 to 10) with the current time (ms).
--
-- The done hook prints one line:
--   RESULT requests=N ok=N non2xx=N sent=N max_id=N p50_us=N p99_us=N errors=N
-- requests: answers wrk counted; ok: answers with status 200 (counted by the response
-- hook, per thread); sent: messages in the requests written, answered or not;
-- max_id: the largest content_id sent; errors: connect, read, write and timeout errors.

local start = tonumber(os.getenv("START") or "1")
local stride = tonumber(os.getenv("THREADS") or "1")
local batch = tonumber(os.getenv("BATCH") or "1")
local text_bytes = tonumber(os.getenv("TEXT_BYTES") or "0")

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- per thread (each wrk thread has its own Lua state)
counter = 0
ok = 0
max_id = 0
local texts = {}

function init(args)
  math.randomseed(1585526400 + tid)
  for i = 1, 64 do
    if text_bytes > 0 then
      local chars = {}
      for j = 1, text_bytes do
        chars[j] = string.format("%x", math.random(0, 15))
      end
      texts[i] = table.concat(chars)
    else
      texts[i] = "user " .. i .. " said hello world \\u00e9 é"
    end
  end
end

local function line(now)
  local id = start + counter * stride + tid
  counter = counter + 1
  max_id = id
  return string.format(
    '{"text":"%s","content_id":%d,"client_id":%d,"timestamp":%d}',
    texts[counter % 64 + 1], id, counter % 10 + 1, now)
end

function request()
  local now = os.time() * 1000
  if batch == 1 then
    return wrk.format("POST", "/log", {["Content-Type"] = "application/json"}, line(now))
  end
  local lines = {}
  for i = 1, batch do
    lines[i] = line(now)
  end
  return wrk.format("POST", "/log", {["Content-Type"] = "application/x-ndjson"},
    table.concat(lines, "\n") .. "\n")
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
  end
end

function done(summary, latency, requests)
  local total_ok, sent, top = 0, 0, 0
  for _, thread in ipairs(threads) do
    total_ok = total_ok + thread:get("ok")
    sent = sent + thread:get("counter")
    top = math.max(top, thread:get("max_id"))
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d ok=%d non2xx=%d sent=%d max_id=%d p50_us=%d p99_us=%d errors=%d\n",
    summary.requests, total_ok, e.status, sent, top,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout))
end
