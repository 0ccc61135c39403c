// The service worker: the page's shell (with ONNX Runtime's WebAssembly) is cached when the worker installs,
// so the page opens on a clinic LAN that drops, or with no network at all; so are the device gate's models.
// Verdicts are never cached: a verdict on a photo comes from the service or from the device gate. A new build has a new version (a hash of the shell's files), so it replaces the cache.

declare const __SHELL_VERSION__: string;
declare const __SHELL_FILES__: string[];

const worker = self as unknown as ServiceWorkerGlobalScope;
const PREFIX = "cervigate-shell-";
const CACHE = PREFIX + __SHELL_VERSION__;

worker.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(__SHELL_FILES__))
      .then(() => worker.skipWaiting()),
  );
});

worker.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((keys) => Promise.all(keys.filter((k) => k.startsWith(PREFIX) && k !== CACHE).map((k) => caches.delete(k))))
      .then(() => worker.clients.claim()),
  );
});

// The device gate's models: their URLs carry the sha256, so a cached copy is never stale. The gate's
// description (/v1/gate) and the manifests come from the network when it answers, from the cache when not.
const MODELS = "cervigate-gate-models";
const GATE_FILES = /^\/v1\/(gate$|models\/(detector|quality)\/(manifest\.json|model\.onnx)$)/;

async function networkFirst(request: Request): Promise<Response> {
  const cache = await caches.open(MODELS);
  try {
    const response = await fetch(request);
    if (response.ok) await cache.put(request, response.clone());
    return response;
  } catch (error) {
    const cached = await cache.match(request);
    if (cached) return cached;
    throw error;
  }
}

async function cacheFirst(request: Request): Promise<Response> {
  const cache = await caches.open(MODELS);
  return (await cache.match(request)) ?? networkFirst(request);
}

worker.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  const scope = new URL(worker.registration.scope);
  if (event.request.method !== "GET" || url.origin !== scope.origin) return;
  if (GATE_FILES.test(url.pathname)) {
    event.respondWith(url.searchParams.has("sha256") ? cacheFirst(event.request) : networkFirst(event.request));
    return;
  }
  if (!url.pathname.startsWith(scope.pathname)) return; // the rest of the API: straight to the network
  event.respondWith(
    caches.open(CACHE).then(async (cache) => (await cache.match(event.request, { ignoreSearch: true })) ?? fetch(event.request)),
  );
});
