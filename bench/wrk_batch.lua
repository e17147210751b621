-- wrk script for `python -m bench accept`: POST /v1/messages/batch with a prepared body of
-- 1,000 messages over many numbers (file named by BENCH_BATCH_FILE), the send key BENCH_KEY.
local key = os.getenv("BENCH_KEY") or "bench-send"
local file = assert(io.open(os.getenv("BENCH_BATCH_FILE"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
wrk.path = "/v1/messages/batch"
