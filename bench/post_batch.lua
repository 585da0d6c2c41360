-- wrk script: POST /log batches (Content-Type: application/x-ndjson) of BATCH
-- (environment, default 100) valid, unique messages over 10 clients, today's UTC date.
local counter = 0
local now = os.time() * 1000
local batch = tonumber(os.getenv("BATCH") or "100")

request = function()
  local lines = {}
  for i = 1, batch do
    counter = counter + 1
    lines[i] = string.format(
      '{"text":"user %d said hello world \\u00e9","content_id":%d,"client_id":%d,"timestamp":%d}',
      counter % 64 + 1, counter % 1000000000 + 1, counter % 10 + 1, now)
  end
  return wrk.format("POST", "/log", {["Content-Type"] = "application/x-ndjson"},
    table.concat(lines, "\n") .. "\n")
end

done = function(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("RESULT requests=%d non2xx=%d p50_us=%d p99_us=%d\n",
    summary.requests, non2xx, latency:percentile(50), latency:percentile(99)))
end
