-- wrk, an independent load generator (C, one epoll loop per thread), posting one image as
-- the raw body of the REST classify route: the yardstick that `resnet-serve bench`
-- was checked against (docs/load-testing.md, "How light the client is").
--
--   wrk -t1 -c16 -d10s --timeout 30s --latency -s deploy/loadtest/wrk_classify.lua \
--       http://127.0.0.1:8000 -- IMAGE_FILE [MODEL]
--
-- (--timeout 30s as resnet-serve bench's: wrk's own 2 s default drops every slower
-- answer from its latencies and counts it as a timeout.)
--
-- MODEL unset: /v1/classify (the gateway's default model). RESNET_API_KEY, when set, is
-- sent as X-API-Key. The request is built once; wrk resends the same bytes. At the end
-- one line of JSON: requests, seconds, requests/s, latency p50/p90/p99 in ms, and the
-- errors (non-2xx statuses, socket errors), which wrk counts but does not fail on.

function init(args)
   local path, model = args[1], args[2]
   if not path then
      error("usage: wrk ... -s wrk_classify.lua URL -- IMAGE_FILE [MODEL]")
   end
   local file = assert(io.open(path, "rb"))
   wrk.body = file:read("*a")
   file:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/octet-stream"
   local key = os.getenv("RESNET_API_KEY")
   if key and key ~= "" then
      wrk.headers["X-API-Key"] = key
   end
   if model and model ~= "" then
      wrk.path = "/v1/models/" .. model .. "/classify"
   else
      wrk.path = "/v1/classify"
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local seconds = summary.duration / 1e6
   io.write(string.format(
      '{"requests": %d, "seconds": %.3f, "requests_per_s": %.2f, '
         .. '"p50_ms": %.1f, "p90_ms": %.1f, "p99_ms": %.1f, "max_ms": %.1f, '
         .. '"non_2xx": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\n',
      summary.requests, seconds, summary.requests / seconds,
      latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
      latency:percentile(99) / 1e3, latency.max / 1e3,
      e.status, e.connect, e.read, e.write, e.timeout))
end
