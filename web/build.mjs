// Builds the capture app into service/web/static/, which the service serves at /capture/ (make web).
// The page script and the service worker are bundled and minified by esbuild; the service worker's cache
// version is a hash of the shell's files, so every change to the page reaches installed copies.
import { createHash } from "node:crypto";
import { cp, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.join(here, "..", "service", "web", "static");
// ONNX Runtime Web's WebAssembly build (no WebGPU: its build is twice the download, and no GPU is here to
// test it), loaded from ort/ beside the page: the glue module and the binary.
const ORT_FILES = ["ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"];
const SHELL = [
  "index.html", "app.js", "app.css", "manifest.webmanifest", "icon.svg", "icon-192.png", "icon-512.png",
  ...ORT_FILES.map((name) => `ort/${name}`),
];
const common = { bundle: true, minify: true, target: "es2022", legalComments: "none", logLevel: "warning" };

await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });
await cp(path.join(here, "public"), out, { recursive: true });
await mkdir(path.join(out, "ort"));
for (const name of ORT_FILES) {
  await cp(path.join(here, "node_modules", "onnxruntime-web", "dist", name), path.join(out, "ort", name));
}
await esbuild.build({
  ...common,
  entryPoints: [path.join(here, "src", "main.ts")],
  format: "esm",
  outfile: path.join(out, "app.js"),
  // ONNX Runtime's build that loads its WebAssembly glue from ort/ rather than inlining it.
  conditions: ["onnxruntime-web-use-extern-wasm"],
});

const files = {};
const version = createHash("sha256");
for (const name of SHELL) {
  const digest = createHash("sha256").update(await readFile(path.join(out, name))).digest("hex");
  files[name] = digest;
  version.update(`${name} ${digest}\n`);
}
const shellVersion = version.digest("hex").slice(0, 16);
await esbuild.build({
  ...common,
  entryPoints: [path.join(here, "src", "sw.ts")],
  format: "iife",
  outfile: path.join(out, "sw.js"),
  define: { __SHELL_VERSION__: JSON.stringify(shellVersion), __SHELL_FILES__: JSON.stringify(["./", ...SHELL]) },
});
await writeFile(path.join(out, "build.json"), JSON.stringify({ version: shellVersion, files }, null, 2) + "\n");
console.log(`capture app ${shellVersion} -> ${path.relative(process.cwd(), out)}`);
