-- wrk script: POST the same body on every request.
--   WRK_BODY_FILE     file holding the request body (required)
--   WRK_CONTENT_TYPE  Content-Type header (default application/json)
--   WRK_ACCEPT        Accept header (optional)
-- Non-2xx answers are counted by wrk itself ("Non-2xx or 3xx responses").

local path = os.getenv("WRK_BODY_FILE")
if path == nil or path == "" then
  error("set WRK_BODY_FILE to the file that holds the request body")
end
local file = assert(io.open(path, "rb"))
wrk.body = file:read("*a")
file:close()

wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/json"
local accept = os.getenv("WRK_ACCEPT")
if accept ~= nil and accept ~= "" then
  wrk.headers["Accept"] = accept
end
