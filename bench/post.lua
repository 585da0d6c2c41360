-- wrk script: POST /log with valid messages over 10 clients, today's UTC date.
-- TEXT_BYTES (environment) sets the size of a random-hex text (default: a short one).
local counter = 0
local now = os.time() * 1000
local text_bytes = tonumber(os.getenv("TEXT_BYTES") or "0")
local texts = {}

math.randomseed(1585526400)
for i = 1, 64 do
  if text_bytes > 0 then
    local chars = {}
    for j = 1, text_bytes do
      chars[j] = string.format("%x", math.random(0, 15))
    end
    texts[i] = table.concat(chars)
  else
    texts[i] = "user " .. i .. " said hello world é"
  end
end

request = function()
  counter = counter + 1
  local body = string.format(
    '{"text":"%s","content_id":%d,"client_id":%d,"timestamp":%d}',
    texts[counter % 64 + 1], counter % 1000000000 + 1, counter % 10 + 1, now)
  return wrk.format("POST", "/log", {["Content-Type"] = "application/json"}, body)
end

done = function(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("RESULT requests=%d non2xx=%d p50_us=%d p99_us=%d\n",
    summary.requests, non2xx, latency:percentile(50), latency:percentile(99)))
end
