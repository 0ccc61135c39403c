// Store and forward (issue #19): photos taken while the service is unreachable wait here, encrypted at rest,
// until a sync posts them. No UI: the page decides when to unlock, add and sync, and what to show.
//
// At rest (IndexedDB) only metadata is in clear: ids, endpoint, times, sizes, counts, attempts, error codes.
// Photos and form fields are one AES-GCM-256 record per entry (a fresh 96-bit IV each, the entry's id and
// endpoint as additional data, so a record cannot be moved to another entry). The key is derived from the
// user's passphrase with PBKDF2-SHA-256 and a random salt kept in the database; it is non-extractable and
// lives in this object only, so a reload or lock() forgets it. A verifier (a known constant encrypted with
// the key) tells a wrong passphrase from a right one without trying a photo.
//
// Sending is idempotent by construction: an entry's id is its Idempotency-Key, so a photo whose answer was
// lost on the way back is replayed by the service, not assessed twice.

export type OutboxEndpoint = "/v1/assess" | "/v1/exams";

export interface OutboxLimits {
  maxItems: number;
  maxBytes: number; // of ciphertext: what the entries take in IndexedDB
}

export interface OutboxEntry {
  id: string; // a UUID: also the Idempotency-Key the caller sends
  endpoint: OutboxEndpoint;
  takenAt: number; // ms since the epoch
  bytes: number; // ciphertext bytes
  photos: number;
  attempts: number; // sends that got no final answer (network error, 408, 409, 429, 5xx)
  lastError: string | null; // "network", the problem code, or "http_<status>"
  failed: boolean; // refused for good (another 4xx): kept for the user to see, never sent again
}

export interface OutboxItem {
  endpoint: OutboxEndpoint;
  photos: Blob[];
  fields?: Record<string, string>;
  takenAt?: number;
}

/** What the caller's `send` reports: the HTTP status, and the problem's `code` when there was one. */
export interface SendResult {
  status: number;
  code?: string;
}

export type Send = (entry: OutboxEntry, body: FormData) => Promise<SendResult>;

export interface SyncResult {
  sent: string[]; // answered 2xx: deleted
  kept: string[]; // to try again later (including those not reached after the service stopped answering)
  failed: string[]; // refused with another 4xx now: marked failed
}

/** The outbox has no key in memory: unlock() first. */
export class OutboxLocked extends Error {}

/** Adding this item would pass maxItems or maxBytes: sync (or remove entries) first. */
export class OutboxFull extends Error {}

export const PBKDF2_ITERATIONS = 600_000; // OWASP's 2023 figure for PBKDF2-HMAC-SHA256
export const MIN_PASSPHRASE_LENGTH = 8;
const DB_NAME = "cervigate-outbox";
const ENTRIES = "entries"; // OutboxEntry records (metadata only)
const PAYLOADS = "payloads"; // { id, iv, data }: the ciphertext, apart so list() never reads photos
const META = "meta"; // { name: "kdf", salt, iterations, iv, verifier }
const VERIFIER = "cervigate-outbox-verifier-v1";
// Answers that may come out differently later: the entry is kept and tried again.
const RETRYABLE = new Set([408, 409, 425, 429]);

interface KdfRecord {
  name: "kdf";
  salt: Uint8Array<ArrayBuffer>;
  iterations: number;
  iv: Uint8Array<ArrayBuffer>;
  verifier: ArrayBuffer;
}

interface PayloadRecord {
  id: string;
  iv: Uint8Array<ArrayBuffer>;
  data: ArrayBuffer;
}

interface PlainHeader {
  types: string[]; // each photo's media type
  sizes: number[]; // each photo's byte length
  fields: Record<string, string>;
}

export class Outbox {
  private key: CryptoKey | null = null;

  private constructor(
    private readonly db: IDBDatabase,
    private readonly limits: OutboxLimits,
    private readonly lockName: string,
  ) {}

  static async open(limits: OutboxLimits, dbName: string = DB_NAME): Promise<Outbox> {
    const opening = indexedDB.open(dbName, 1);
    opening.onupgradeneeded = () => {
      const db = opening.result;
      db.createObjectStore(ENTRIES, { keyPath: "id" });
      db.createObjectStore(PAYLOADS, { keyPath: "id" });
      db.createObjectStore(META, { keyPath: "name" });
    };
    return new Outbox(await request(opening), limits, `cervigate-outbox-sync:${dbName}`);
  }

  get locked(): boolean {
    return this.key === null;
  }

  async hasPassphrase(): Promise<boolean> {
    return (await this.kdf()) !== undefined;
  }

  /** The first time, sets the passphrase; later, false when it is not the one set. */
  async unlock(passphrase: string): Promise<boolean> {
    const existing = await this.kdf();
    if (existing !== undefined) return this.verify(passphrase, existing);
    if (passphrase.length < MIN_PASSPHRASE_LENGTH) {
      throw new RangeError(`the passphrase needs at least ${MIN_PASSPHRASE_LENGTH} characters`);
    }
    const salt = random(16);
    const key = await deriveKey(passphrase, salt, PBKDF2_ITERATIONS);
    const iv = random(12);
    const verifier = await encrypt(key, iv, new TextEncoder().encode(VERIFIER), VERIFIER);
    const record: KdfRecord = { name: "kdf", salt, iterations: PBKDF2_ITERATIONS, iv, verifier };
    // Another tab may have set one meanwhile: the first write wins, and this passphrase is checked against it.
    const tx = this.db.transaction(META, "readwrite", { durability: "strict" });
    const raced = await request<KdfRecord | undefined>(tx.objectStore(META).get("kdf"));
    if (raced === undefined) tx.objectStore(META).put(record);
    await done(tx);
    if (raced !== undefined) return this.verify(passphrase, raced);
    this.key = key;
    return true;
  }

  lock(): void {
    this.key = null;
  }

  /** Encrypts and stores the item; resolves once it is committed to disk. */
  async add(item: OutboxItem): Promise<OutboxEntry> {
    const key = this.requireKey();
    if (item.photos.length === 0 || (item.endpoint === "/v1/assess" && item.photos.length > 1)) {
      throw new RangeError("an entry holds one photo for /v1/assess, or one or more for /v1/exams");
    }
    const id = crypto.randomUUID();
    const plain = await pack(item);
    const iv = random(12);
    const data = await encrypt(key, iv, plain, additionalData(id, item.endpoint));
    const entry: OutboxEntry = {
      id,
      endpoint: item.endpoint,
      takenAt: item.takenAt ?? Date.now(),
      bytes: data.byteLength,
      photos: item.photos.length,
      attempts: 0,
      lastError: null,
      failed: false,
    };
    // Counted and written in one transaction, so two tabs adding at once cannot both pass the bound.
    const tx = this.db.transaction([ENTRIES, PAYLOADS], "readwrite", { durability: "strict" });
    const entries = await request<OutboxEntry[]>(tx.objectStore(ENTRIES).getAll());
    const used = entries.reduce((sum, e) => sum + e.bytes, 0);
    if (entries.length + 1 > this.limits.maxItems || used + entry.bytes > this.limits.maxBytes) {
      tx.abort();
      await done(tx).catch(() => undefined);
      throw new OutboxFull(
        `the outbox is full (${entries.length} of ${this.limits.maxItems} entries, ` +
          `${used} of ${this.limits.maxBytes} bytes): sync when the service is reachable`,
      );
    }
    tx.objectStore(ENTRIES).put(entry);
    tx.objectStore(PAYLOADS).put({ id, iv, data } satisfies PayloadRecord);
    await done(tx);
    return entry;
  }

  /** Metadata only, oldest first; works while locked. */
  async list(): Promise<OutboxEntry[]> {
    const tx = this.db.transaction(ENTRIES, "readonly");
    const entries = await request<OutboxEntry[]>(tx.objectStore(ENTRIES).getAll());
    return entries.sort((a, b) => a.takenAt - b.takenAt || (a.id < b.id ? -1 : 1));
  }

  async usage(): Promise<{ count: number; bytes: number } & OutboxLimits> {
    const entries = await this.list();
    return { count: entries.length, bytes: entries.reduce((sum, e) => sum + e.bytes, 0), ...this.limits };
  }

  /** Deletes an entry (the user discards a failed one); its photos are gone for good. */
  async remove(id: string): Promise<void> {
    const tx = this.db.transaction([ENTRIES, PAYLOADS], "readwrite", { durability: "strict" });
    tx.objectStore(ENTRIES).delete(id);
    tx.objectStore(PAYLOADS).delete(id);
    await done(tx);
  }

  /**
   * Sends the entries not marked failed, oldest first, one at a time; `send` adds the Idempotency-Key
   * (entry.id) and the credentials. Stops at the first answer that says "later" (network error, 408, 409,
   * 429, 5xx): what is left is kept. One tab syncs at a time (a Web Lock); where Web Locks are missing, two
   * tabs may send the same entry, which the service answers once thanks to the Idempotency-Key. Give `send`
   * a timeout (fetch's `signal: AbortSignal.timeout(...)`): a send that never settles holds the lock.
   */
  async sync(send: Send, progress?: (done: number, total: number) => void): Promise<SyncResult> {
    const key = this.requireKey();
    const run = () => this.syncAll(key, send, progress);
    if (typeof navigator !== "undefined" && navigator.locks) return navigator.locks.request(this.lockName, run);
    return run();
  }

  private async syncAll(
    key: CryptoKey,
    send: Send,
    progress?: (done: number, total: number) => void,
  ): Promise<SyncResult> {
    const result: SyncResult = { sent: [], kept: [], failed: [] };
    const pending = (await this.list()).filter((e) => !e.failed); // listed under the lock: fresh
    for (const [index, entry] of pending.entries()) {
      const outcome = await this.syncOne(key, entry, send);
      result[outcome].push(entry.id);
      progress?.(index + 1, pending.length);
      if (outcome === "kept") {
        result.kept.push(...pending.slice(index + 1).map((e) => e.id));
        break;
      }
    }
    return result;
  }

  private async syncOne(key: CryptoKey, entry: OutboxEntry, send: Send): Promise<keyof SyncResult> {
    let body: FormData;
    try {
      body = await this.body(key, entry);
    } catch {
      await this.mark(entry.id, { failed: true, lastError: "undecryptable" });
      return "failed";
    }
    let answer: SendResult;
    try {
      answer = await send(entry, body);
    } catch {
      await this.mark(entry.id, { attempts: entry.attempts + 1, lastError: "network" });
      return "kept";
    }
    if (answer.status >= 200 && answer.status < 300) {
      await this.remove(entry.id);
      return "sent";
    }
    const lastError = answer.code ?? `http_${answer.status}`;
    if (answer.status >= 500 || RETRYABLE.has(answer.status)) {
      await this.mark(entry.id, { attempts: entry.attempts + 1, lastError });
      return "kept";
    }
    await this.mark(entry.id, { failed: true, lastError });
    return "failed";
  }

  private async body(key: CryptoKey, entry: OutboxEntry): Promise<FormData> {
    const tx = this.db.transaction(PAYLOADS, "readonly");
    const record = await request<PayloadRecord | undefined>(tx.objectStore(PAYLOADS).get(entry.id));
    if (record === undefined) throw new Error("no payload");
    const plain = await crypto.subtle.decrypt(
      { name: "AES-GCM", iv: record.iv, additionalData: additionalData(entry.id, entry.endpoint) },
      key,
      record.data,
    );
    return unpack(plain);
  }

  private async mark(id: string, change: Partial<Pick<OutboxEntry, "attempts" | "lastError" | "failed">>) {
    const tx = this.db.transaction(ENTRIES, "readwrite", { durability: "strict" });
    const store = tx.objectStore(ENTRIES);
    const entry = await request<OutboxEntry | undefined>(store.get(id));
    if (entry !== undefined) store.put({ ...entry, ...change });
    await done(tx);
  }

  private async kdf(): Promise<KdfRecord | undefined> {
    const tx = this.db.transaction(META, "readonly");
    return request<KdfRecord | undefined>(tx.objectStore(META).get("kdf"));
  }

  private async verify(passphrase: string, kdf: KdfRecord): Promise<boolean> {
    const key = await deriveKey(passphrase, kdf.salt, kdf.iterations);
    try {
      const additional = new TextEncoder().encode(VERIFIER);
      await crypto.subtle.decrypt({ name: "AES-GCM", iv: kdf.iv, additionalData: additional }, key, kdf.verifier);
    } catch {
      return false; // GCM's tag does not match: another passphrase
    }
    this.key = key;
    return true;
  }

  private requireKey(): CryptoKey {
    if (this.key === null) throw new OutboxLocked("the outbox is locked: unlock it with the passphrase");
    return this.key;
  }
}

function random(length: number): Uint8Array<ArrayBuffer> {
  return crypto.getRandomValues(new Uint8Array(length));
}

async function deriveKey(passphrase: string, salt: Uint8Array<ArrayBuffer>, iterations: number): Promise<CryptoKey> {
  const material = await crypto.subtle.importKey("raw", new TextEncoder().encode(passphrase), "PBKDF2", false, [
    "deriveKey",
  ]);
  return crypto.subtle.deriveKey(
    { name: "PBKDF2", hash: "SHA-256", salt, iterations },
    material,
    { name: "AES-GCM", length: 256 },
    false, // non-extractable: not even this page can read the key out
    ["encrypt", "decrypt"],
  );
}

function encrypt(
  key: CryptoKey,
  iv: Uint8Array<ArrayBuffer>,
  plain: Uint8Array<ArrayBuffer>,
  additional: string | Uint8Array<ArrayBuffer>,
): Promise<ArrayBuffer> {
  const additionalData = typeof additional === "string" ? new TextEncoder().encode(additional) : additional;
  return crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData }, key, plain);
}

function additionalData(id: string, endpoint: OutboxEndpoint): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(`${id}\n${endpoint}`);
}

/** The plaintext: a 4-byte length, a JSON header (types, sizes, fields), then the photos' bytes. */
async function pack(item: OutboxItem): Promise<Uint8Array<ArrayBuffer>> {
  const header: PlainHeader = {
    types: item.photos.map((photo) => photo.type),
    sizes: item.photos.map((photo) => photo.size),
    fields: item.fields ?? {},
  };
  const head = new TextEncoder().encode(JSON.stringify(header));
  const photos = await Promise.all(item.photos.map((photo) => photo.arrayBuffer()));
  const plain = new Uint8Array(4 + head.length + header.sizes.reduce((sum, size) => sum + size, 0));
  new DataView(plain.buffer).setUint32(0, head.length);
  plain.set(head, 4);
  let offset = 4 + head.length;
  for (const photo of photos) {
    plain.set(new Uint8Array(photo), offset);
    offset += photo.byteLength;
  }
  return plain;
}

function unpack(plain: ArrayBuffer): FormData {
  const length = new DataView(plain).getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(plain, 4, length))) as PlainHeader;
  const body = new FormData();
  let offset = 4 + length;
  header.types.forEach((type, index) => {
    const size = header.sizes[index];
    const photo = new Blob([plain.slice(offset, offset + size)], { type });
    body.append("image", photo, `photo-${index}.${EXTENSIONS[type] ?? "bin"}`);
    offset += size;
  });
  for (const [name, value] of Object.entries(header.fields)) body.append(name, value);
  return body;
}

const EXTENSIONS: Record<string, string> = {
  "image/jpeg": "jpg",
  "image/png": "png",
  "image/webp": "webp",
  "image/heic": "heic",
};

function request<T>(req: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** Resolves when the transaction is committed (with durability "strict": on disk), rejects if it is not. */
function done(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new DOMException("aborted", "AbortError"));
  });
}
