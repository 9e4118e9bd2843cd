-- wrk script for bench/ledger-load/run: each request is a reserve of PAYSTILE_LOAD_COUNT
-- holds (1: every call reserves; more: a prefetching gateway's batch), or, once 16 granted
-- holds are waiting, one settle committing them, as the filter batches its settlements.
local credential = os.getenv("PAYSTILE_LOAD_CREDENTIAL")
local count = tonumber(os.getenv("PAYSTILE_LOAD_COUNT") or "1")
local reserve = '{"credential":"Bearer ' .. credential ..
  '","serviceId":"load","priceUsdc":"0.000001","count":' .. count .. '}'
local waiting = {}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("PAYSTILE_LOAD_GATEWAY_KEY")

function request()
  if #waiting >= 16 then
    local settlements = {}
    for i = 1, 16 do
      settlements[i] = '{"chargeId":"' .. table.remove(waiting) ..
        '","outcome":"commit","upstreamStatus":200}'
    end
    return wrk.format(nil, "/v1/holds/settle", nil,
      '{"settlements":[' .. table.concat(settlements, ",") .. ']}')
  end
  return wrk.format(nil, "/v1/holds", nil, reserve)
end

-- wrk counts answers other than 2xx; run fails on any.
function response(status, headers, body)
  if status ~= 200 or body:find('"results"', 1, true) then
    return
  end
  for id in body:gmatch('"(ch_[0-9a-f]+)"') do
    table.insert(waiting, id)
  end
end
