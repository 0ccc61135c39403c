// The service worker: the page's shell is cached when the worker installs, so the page opens on a clinic
// LAN that drops, or with no network at all. API requests are never cached: a verdict on a photo must come
// from the service. A new build has a new version (a hash of the shell's files), so it replaces the cache.

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

worker.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  const scope = new URL(worker.registration.scope);
  if (event.request.method !== "GET" || url.origin !== scope.origin || !url.pathname.startsWith(scope.pathname)) {
    return; // the API and anything else: straight to the network
  }
  event.respondWith(
    caches.open(CACHE).then(async (cache) => (await cache.match(event.request, { ignoreSearch: true })) ?? fetch(event.request)),
  );
});
