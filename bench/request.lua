-- wrk script for every bench scenario: one fixed request, built once.
--
-- Arguments (after wrk's "--"): METHOD BODY [HEADER ...], where each HEADER
-- is "Name: value".  BODY "-" sends no body.  At the end it prints one line
-- "BENCH-JSON {...}" with exact counts and latency percentiles (in
-- microseconds) for the harness to read.
--
-- A HEADER "follow: Name" (for header-mode sessions) sends, from then on,
-- the value of the response header Name whenever an answer carries a new
-- one, as a real client keeps the newest session token: the request is
-- built again only when the value changes.

local follow = nil
local built = nil

init = function(args)
  wrk.method = args[1] or "GET"
  if args[2] and args[2] ~= "-" then
    wrk.body = args[2]
  end
  for i = 3, #args do
    local name, value = string.match(args[i], "^([^:]+):%s*(.*)$")
    if name == "follow" then
      follow = value
    elseif name then
      wrk.headers[name] = value
    end
  end
  if follow then
    built = wrk.format()
    request = function()
      return built
    end
    response = function(status, headers, body)
      local value = headers[follow]
      if value and value ~= "" and value ~= wrk.headers[follow] then
        wrk.headers[follow] = value
        built = wrk.format()
      end
    end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH-JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f,"stdev":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, latency.stdev))
end
