-- wrk script for `python -m bench accept`: single sends spread over many phone numbers with a
-- Zipf-like skew (number i is chosen with weight 1/(i+1)), each request a valid message.
-- Set BENCH_NUMBERS (default 1000) and BENCH_KEY (the send key) in the environment.
local numbers = tonumber(os.getenv("BENCH_NUMBERS") or "1000")
local key = os.getenv("BENCH_KEY") or "bench-send"
local bodies = {}

local function zipf_pick(weights_total)
  local r = math.random() * weights_total
  for i = 1, numbers do
    r = r - 1 / i
    if r <= 0 then return i - 1 end
  end
  return numbers - 1
end

init = function(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  local total = 0
  for i = 1, numbers do total = total + 1 / i end
  for n = 1, 2000 do
    local pn = string.format("5557%08d", zipf_pick(total))
    bodies[n] = '{"phone_number_id":"' .. pn .. '","to":"5491140123456","type":"text",' ..
                '"text":{"body":"Your code is ' .. string.format("%06d", n) .. '"},' ..
                '"category":"authentication"}'
  end
end

local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/messages",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key},
    bodies[(counter % #bodies) + 1])
end
