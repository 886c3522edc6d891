-- wrk script: signed GitHub push deliveries, each with a GUID never used before.
--
--   wrk -t2 -c32 -d5s -s bench/webhook.lua http://127.0.0.1:PORT -- DIR PREFIX
--
-- DIR holds body-NN.json (the payloads, one ordering lane each) and signatures.txt
-- (their X-Hub-Signature-256 values, one a line, in the same order); run.py writes
-- them. The delivery GUID is PREFIX-<thread>-<counter>: PREFIX is fresh for every
-- round, so GUIDs are unique across the whole run. Requests cycle through the bodies.
-- done() prints one line "BENCH_RESULT {json}" with counts and latency percentiles (µs).

local threads = {}
local thread_count = 0

function setup(thread)
   thread_count = thread_count + 1
   thread:set("tid", thread_count)
   table.insert(threads, thread)
end

local heads, tails = {}, {}
local nbodies = 0
local prefix = "bench"
local counter = 0
accepted, ok_other, non2xx = 0, 0, 0

local function slurp(path)
   local f = assert(io.open(path, "rb"))
   local data = f:read("*a")
   f:close()
   return data
end

function init(args)
   local dir = args[1]
   prefix = args[2] .. "-" .. tostring(tid)
   local host = wrk.headers["Host"]
   local i = 0
   for sig in io.lines(dir .. "/signatures.txt") do
      local body = slurp(string.format("%s/body-%02d.json", dir, i))
      i = i + 1
      heads[i] = "POST /webhook HTTP/1.1\r\n"
         .. "Host: " .. host .. "\r\n"
         .. "User-Agent: GitHub-Hookshot/bench\r\n"
         .. "Content-Type: application/json\r\n"
         .. "X-GitHub-Event: push\r\n"
         .. "X-Hub-Signature-256: " .. sig .. "\r\n"
         .. "Content-Length: " .. #body .. "\r\n"
         .. "X-GitHub-Delivery: "
      tails[i] = "\r\n\r\n" .. body
   end
   nbodies = i
end

function request()
   counter = counter + 1
   local i = counter % nbodies + 1
   return heads[i] .. prefix .. "-" .. counter .. tails[i]
end

function response(status, headers, body)
   if status == 202 then
      accepted = accepted + 1
   elseif status >= 200 and status < 300 then
      ok_other = ok_other + 1
   else
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local a, o, n = 0, 0, 0
   for _, t in ipairs(threads) do
      a = a + t:get("accepted")
      o = o + t:get("ok_other")
      n = n + t:get("non2xx")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"duration_us": %d, "requests": %d, "accepted": %d, "ok_other": %d,'
      .. ' "non2xx": %d, "errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d,'
      .. ' "status": %d}, "latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d,'
      .. ' "p99": %d, "p999": %d}}\n',
      summary.duration, summary.requests, a, o, n,
      e.connect, e.read, e.write, e.timeout, e.status,
      latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
