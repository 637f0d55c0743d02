// The unix-socket load client of bench/reads.py: autocannon (npm), 100 connections reading
// /v1/tokens/app-NNNN round robin; prints one JSON line. node reads_autocannon.js URL SOCKET
// SETS SECONDS BEARER (SOCKET "" for TCP). Needs NODE_PATH to hold autocannon (npm -g).
const autocannon = require('autocannon')
const [url, socketPath, sets, seconds, bearer, connections] = process.argv.slice(2)
let i = 0
const options = {
  url,
  connections: Number(connections),
  duration: Number(seconds),
  headers: { authorization: 'Bearer ' + bearer },
  requests: [{
    setupRequest: (request) => {
      i++
      request.path = '/v1/tokens/app-' + String(i % Number(sets)).padStart(4, '0')
      return request
    },
  }],
}
if (socketPath) options.socketPath = socketPath
autocannon(options, (err, result) => {
  if (err) throw err
  console.log(JSON.stringify({
    requests: result.requests.total,
    non2xx: result.non2xx,
    errors: result.errors,
    seconds: result.duration,
    p50: result.latency.p50,
    p99: result.latency.p99,
  }))
})
