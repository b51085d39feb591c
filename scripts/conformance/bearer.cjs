// Preload for the conformance suite's Node process: send `Authorization: Bearer <key>` with its requests.
//
//   NODE_OPTIONS="--require scripts/conformance/bearer.cjs" TOOLBUS_CONFORMANCE_KEY=... conformance server ...
//
// The suite has no option for request headers, and the gateway answers 401 without a key. Both of
// the suite's HTTP paths (the TypeScript SDK's streamable HTTP transport on the 2025-11-25 wire,
// its own raw POSTs on 2026-07-28) call the global `fetch` when they send, so wrapping it here,
// before the suite's modules load, reaches every request without patching the suite.
//
// TOOLBUS_CONFORMANCE_ORIGIN (optional, e.g. http://127.0.0.1:8765) limits the header to that
// origin, so the key never goes to any other server the suite happens to talk to.
// A header the suite set itself is left alone, so a scenario that sends its own is not overridden.
'use strict';

const key = process.env.TOOLBUS_CONFORMANCE_KEY;
if (!key) {
  throw new Error('bearer.cjs: set TOOLBUS_CONFORMANCE_KEY to the API key to send');
}
const origin = process.env.TOOLBUS_CONFORMANCE_ORIGIN || null;
const originalFetch = globalThis.fetch;

function targetUrl(input) {
  if (input instanceof Request) return new URL(input.url);
  return new URL(String(input)); // a string or a URL object
}

function withBearer(input, init) {
  // init.headers, when given, replaces a Request's own headers (as in fetch itself); otherwise start
  // from the Request's. `new Headers` accepts a Headers object, an array of pairs or a plain object.
  const base = init && init.headers !== undefined ? init.headers : input instanceof Request ? input.headers : undefined;
  const headers = new Headers(base);
  if (!headers.has('authorization')) headers.set('authorization', `Bearer ${key}`);
  return { ...init, headers };
}

globalThis.fetch = function fetchWithBearer(input, init) {
  if (origin !== null && targetUrl(input).origin !== origin) return originalFetch(input, init);
  return originalFetch(input, withBearer(input, init));
};
