// Schema check of the Kubernetes manifests in deploy/kubernetes (ctest label `deploy`).
//
//   node tests/deploy/validate.mjs [--qilin BUILD/qilin] [FILE.yaml ...]
//
// - Kubernetes kinds (Deployment, Service, PodDisruptionBudget, ...) against the Kubernetes
//   OpenAPI schemas that the npm package kubernetes-models ships, plus a strict pass: a field
//   that the Kubernetes type does not define is an error (as kubectl --validate=strict and
//   kubeconform -strict; read from the package's type declarations).
// - KServe kinds (ServingRuntime, InferenceService) against JSON schemas in schemas/ written
//   from KServe's CRD types, with the Kubernetes types inside them checked as above.
// - qilin's own contract: HTTP 8000, gRPC 8001, metrics 8002, readiness /v2/health/ready,
//   liveness /v2/health/live, Prometheus scrape annotations, and (with --qilin) every
//   `--flag` in the containers' args is one that `qilin serve --help` lists.
// - A self-test: broken copies of the manifests must fail, or the checker checks nothing.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import YAML from "yaml";
import Ajv from "ajv";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "../..");
const require = createRequire(import.meta.url);
const MODELS = path.dirname(require.resolve("kubernetes-models/package.json"));
const NODE_MODULES = path.dirname(MODELS);

// ---- strict field check from kubernetes-models' .d.ts declarations ---------------------------

const declCache = new Map();
// The fields of the interface declared in `dts`: name -> {ref: dts of an object type | null,
// array: bool, map: bool}.
function declFields(dts) {
  if (declCache.has(dts)) return declCache.get(dts);
  const text = fs.readFileSync(dts, "utf8");
  const imports = new Map();
  for (const m of text.matchAll(/import \{ (\w+) \} from "([^"]+)";/g)) {
    let p = m[2].replace(/\.js$/, "");
    p = p.startsWith(".") ? path.resolve(path.dirname(dts), p) : path.join(NODE_MODULES, p);
    imports.set(m[1], p + ".d.ts");
  }
  const start = text.search(/export interface I\w+[^{]*\{/);
  const lines = text.slice(start).split("\n");
  const fields = new Map();
  for (let i = 1; i < lines.length && lines[i] !== "}"; ++i) {
    const m = lines[i].match(/^ {4}"([^"]+)"\??: (.*)$/);
    if (!m) continue;
    let type = m[2];
    let map = false;
    if (type === "{") {
      map = true;
      type = lines[i + 1].trim().replace(/^\[key: string\]: /, "");
    }
    type = type.replace(/;$/, "");
    const am = type.match(/^Array<(\w+)>$/);
    const name = am ? am[1] : type;
    fields.set(m[1], { ref: imports.get(name) ?? null, array: !!am, map });
  }
  const result = { fields, typeMeta: /interface I\w+ extends TypeMeta/.test(text) };
  declCache.set(dts, result);
  return result;
}

function strictCheck(value, dts, where, errors, skip = new Set()) {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return;
  const { fields, typeMeta } = declFields(dts);
  if (fields.size === 0) return;  // a scalar-like type (Quantity, IntOrString, Time)
  for (const [k, v] of Object.entries(value)) {
    if (skip.has(k)) continue;
    if (typeMeta && (k === "apiVersion" || k === "kind")) continue;
    const f = fields.get(k);
    if (!f) {
      errors.push(`${where}.${k}: unknown field (${path.basename(dts, ".d.ts")} has no '${k}')`);
      continue;
    }
    if (!f.ref || !fs.existsSync(f.ref)) continue;
    if (f.array && Array.isArray(v)) {
      v.forEach((x, i) => strictCheck(x, f.ref, `${where}.${k}[${i}]`, errors));
    } else if (f.map && v && typeof v === "object") {
      for (const [mk, mv] of Object.entries(v)) strictCheck(mv, f.ref, `${where}.${k}.${mk}`, errors);
    } else {
      strictCheck(v, f.ref, `${where}.${k}`, errors);
    }
  }
}

// kubernetes-models' module for an apiVersion: "v1" -> kubernetes-models/v1,
// "apps/v1" -> kubernetes-models/apps/v1.
async function k8sClass(apiVersion, kind) {
  let mod;
  try {
    mod = await import(`kubernetes-models/${apiVersion}`);
  } catch {
    return null;
  }
  return mod[kind] ? { cls: mod[kind], dts: path.join(MODELS, apiVersion, `${kind}.d.ts`) } : null;
}

function modelErrors(e) {
  // kubernetes-models throws one error whose message lists the ajv errors.
  return String(e.message ?? e).split(/,\s*(?=data)/);
}

// Validates a Kubernetes type (by kind in core v1 or meta) and returns error strings.
async function checkK8sType(typeName, value, where, skip = new Set()) {
  const errors = [];
  let cls, dts;
  if (typeName === "ObjectMeta") {
    const mod = await import("@kubernetes-models/apimachinery/apis/meta/v1/ObjectMeta");
    cls = mod.ObjectMeta;
    dts = path.join(NODE_MODULES, "@kubernetes-models/apimachinery/apis/meta/v1/ObjectMeta.d.ts");
  } else {
    ({ cls, dts } = (await k8sClass("v1", typeName)) ?? {});
  }
  if (!cls) return [`${where}: no Kubernetes type '${typeName}'`];
  const data = Object.fromEntries(Object.entries(value).filter(([k]) => !skip.has(k)));
  // Inlined in a KServe kind: KServe fills the pod's containers and the container's name.
  if (typeName === "PodSpec" && !data.containers) data.containers = [];
  if (typeName === "Container" && skip.size && !data.name) data.name = "kserve-container";
  try {
    new cls(data).validate();
  } catch (e) {
    for (const m of modelErrors(e)) errors.push(`${where}: ${m.replace(/^data/, "")}`);
  }
  strictCheck(data, dts, where, errors);
  return errors;
}

// ---- KServe kinds: ajv with a `k8s` keyword for the Kubernetes types inside ------------------

const pendingK8s = [];  // ajv keywords are synchronous: collect, then check asynchronously
const ajv = new Ajv({ allErrors: true, strict: false });
ajv.addKeyword({
  keyword: "k8s",
  validate(schema, data, parentSchema, ctx) {
    if (data && typeof data === "object" && !Array.isArray(data)) {
      const type = typeof schema === "string" ? schema : schema.type;
      const skip = new Set(typeof schema === "string" ? [] : schema.kserveFields);
      pendingK8s.push({ type, data, where: ctx?.instancePath || "/", skip });
    }
    return true;
  },
});
const kserveSchemas = new Map();
for (const f of fs.readdirSync(path.join(HERE, "schemas"))) {
  const schema = JSON.parse(fs.readFileSync(path.join(HERE, "schemas", f), "utf8"));
  const validate = ajv.compile(schema);
  const apiVersion = schema.properties.apiVersion.const;
  const kinds = schema.properties.kind.enum ?? [schema.properties.kind.const];
  for (const k of kinds) kserveSchemas.set(`${apiVersion}/${k}`, validate);
}

async function checkDoc(doc, where) {
  if (!doc || typeof doc !== "object") return [`${where}: not a mapping`];
  const { apiVersion, kind } = doc;
  if (typeof apiVersion !== "string" || typeof kind !== "string") {
    return [`${where}: apiVersion and kind are required`];
  }
  const key = `${apiVersion}/${kind}`;
  where = `${where} (${kind} ${doc.metadata?.name ?? "?"})`;
  const kserve = kserveSchemas.get(key);
  if (kserve) {
    pendingK8s.length = 0;
    const errors = [];
    if (!kserve(doc)) {
      for (const e of kserve.errors) {
        const extra = e.params?.additionalProperty ? ` '${e.params.additionalProperty}'` : "";
        const allowed = e.params?.allowedValues ? ` ${JSON.stringify(e.params.allowedValues)}` : "";
        errors.push(`${where} ${e.instancePath || "/"}: ${e.message}${extra}${allowed}`);
      }
    }
    for (const p of pendingK8s.splice(0)) {
      errors.push(...(await checkK8sType(p.type, p.data, `${where} ${p.where}`, p.skip)));
    }
    return errors;
  }
  const k = await k8sClass(apiVersion, kind);
  if (!k) return [`${where}: unknown apiVersion/kind ${key}`];
  const errors = [];
  try {
    new k.cls(doc).validate();
  } catch (e) {
    for (const m of modelErrors(e)) errors.push(`${where}: ${m}`);
  }
  strictCheck(doc, k.dts, where, errors);
  return errors;
}

// ---- qilin's contract ------------------------------------------------------------------------

function podTemplates(doc) {
  // [{containers, annotations}] of a manifest, for the kinds deploy/ uses.
  if (doc.kind === "Deployment") {
    return [{ containers: doc.spec.template.spec.containers,
              annotations: doc.spec.template.metadata?.annotations ?? {} }];
  }
  if (doc.kind === "ServingRuntime") {
    return [{ containers: doc.spec.containers,
              annotations: { ...(doc.metadata.annotations ?? {}), ...(doc.spec.annotations ?? {}) } }];
  }
  return [];
}

function portOf(c, p) {
  if (typeof p === "number") return p;
  return (c.ports ?? []).find((x) => x.name === p)?.containerPort;
}

function checkContract(doc, where, serveFlags) {
  const errors = [];
  for (const { containers, annotations } of podTemplates(doc)) {
    const c = containers.find((x) => (x.command ?? []).join(" ").includes("qilin") ||
                                     (x.image ?? "").includes("qilin"));
    if (!c) {
      errors.push(`${where}: no qilin container`);
      continue;
    }
    const ports = (c.ports ?? []).map((p) => p.containerPort).sort();
    if (JSON.stringify(ports) !== JSON.stringify([8000, 8001, 8002])) {
      errors.push(`${where}: container ports ${ports} are not 8000 (HTTP), 8001 (gRPC), 8002 (metrics)`);
    }
    const probe = (p, want) => {
      if (!c[p]?.httpGet) return errors.push(`${where}: no ${p} httpGet`);
      if (c[p].httpGet.path !== want) errors.push(`${where}: ${p} path ${c[p].httpGet.path}, want ${want}`);
      if (portOf(c, c[p].httpGet.port) !== 8000) errors.push(`${where}: ${p} is not on port 8000`);
    };
    probe("readinessProbe", "/v2/health/ready");
    probe("livenessProbe", "/v2/health/live");
    if (annotations["prometheus.io/scrape"] !== "true" || annotations["prometheus.io/port"] !== "8002") {
      errors.push(`${where}: pod annotations lack prometheus.io/scrape "true" and prometheus.io/port "8002"`);
    }
    if (serveFlags) {
      for (const a of c.args ?? []) {
        const flag = a.match(/^(--[a-z0-9-]+)/)?.[1];
        if (flag && !serveFlags.has(flag)) errors.push(`${where}: 'qilin serve' has no flag ${flag}`);
      }
    }
  }
  if (doc.kind === "InferenceService") {
    const m = doc.spec.predictor.model;
    if (m.runtime !== "qilin") errors.push(`${where}: predictor.model.runtime is not qilin`);
    if (!["v2", "grpc-v2"].includes(m.protocolVersion)) {
      errors.push(`${where}: protocolVersion ${m.protocolVersion} is not v2`);
    }
    for (const a of m.args ?? []) {
      const flag = a.match(/^(--[a-z0-9-]+)/)?.[1];
      if (serveFlags && flag && !serveFlags.has(flag)) errors.push(`${where}: 'qilin serve' has no flag ${flag}`);
    }
  }
  return errors;
}

// ---- main ------------------------------------------------------------------------------------

async function checkFiles(files, serveFlags) {
  const errors = [];
  let count = 0;
  for (const f of files) {
    const docs = YAML.parseAllDocuments(fs.readFileSync(f, "utf8"));
    for (const [i, d] of docs.entries()) {
      const where = `${path.relative(ROOT, f)}#${i}`;
      if (d.errors.length) {
        errors.push(`${where}: YAML: ${d.errors.map((e) => e.message).join("; ")}`);
        continue;
      }
      const doc = d.toJS();
      if (doc === null) continue;
      ++count;
      const schemaErrors = await checkDoc(doc, where);
      errors.push(...schemaErrors);
      if (!schemaErrors.length) errors.push(...checkContract(doc, where, serveFlags));
    }
  }
  return { errors, count };
}

const args = process.argv.slice(2);
let qilin = null;
const files = [];
for (let i = 0; i < args.length; ++i) {
  if (args[i] === "--qilin") qilin = args[++i];
  else files.push(path.resolve(args[i]));
}
if (!files.length) {
  const walk = (d) => fs.readdirSync(d, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? walk(path.join(d, e.name)) : e.name.endsWith(".yaml") ? [path.join(d, e.name)] : []);
  files.push(...walk(path.join(ROOT, "deploy/kubernetes")).sort());
}
let serveFlags = null;
if (qilin) {
  const help = execFileSync(qilin, ["serve", "--help"], { encoding: "utf8" });
  serveFlags = new Set([...help.matchAll(/(--[a-z0-9-]+)/g)].map((m) => m[1]));
}

const { errors, count } = await checkFiles(files, serveFlags);
for (const e of errors) console.error(`deploy: ${e}`);
console.log(`deploy: ${count} manifests in ${files.length} files checked${serveFlags ? " (flags against qilin serve --help)" : ""}`);

// Self-test: each mutation of a good manifest must be caught.
const mutations = [
  ["containerPort as a string", "plain/qilin.yaml", (d) => { if (d.kind === "Deployment") d.spec.template.spec.containers[0].ports[0].containerPort = "8000"; }],
  ["unknown container field", "plain/qilin.yaml", (d) => { if (d.kind === "Deployment") d.spec.template.spec.containers[0].readynessProbe = {}; }],
  ["unknown Service spec field", "plain/qilin.yaml", (d) => { if (d.kind === "Service") d.spec.portz = []; }],
  ["liveness on the wrong path", "plain/qilin.yaml", (d) => { if (d.kind === "Deployment") d.spec.template.spec.containers[0].livenessProbe.httpGet.path = "/health"; }],
  ["a flag qilin serve lacks", "plain/qilin.yaml", (d) => { if (d.kind === "Deployment") d.spec.template.spec.containers[0].args.push("--gpu-memory-utilization=0.9"); }],
  ["ServingRuntime protocol v3", "kserve/servingruntime.yaml", (d) => { d.spec.protocolVersions = ["v3"]; }],
  ["ServingRuntime unknown spec field", "kserve/servingruntime.yaml", (d) => { d.spec.protocols = ["v2"]; }],
  ["ServingRuntime container memory limit as a list", "kserve/servingruntime.yaml", (d) => { d.spec.containers[0].resources.limits = ["48Gi"]; }],
  ["ServingRuntime without containers", "kserve/servingruntime.yaml", (d) => { delete d.spec.containers; }],
  ["InferenceService scaleMetric gpu", "kserve/inferenceservice.yaml", (d) => { d.spec.predictor.scaleMetric = "gpu"; }],
  ["InferenceService unknown model field", "kserve/inferenceservice.yaml", (d) => { d.spec.predictor.model.storageURI = "pvc://x"; }],
  ["InferenceService unknown predictor field", "kserve/inferenceservice.yaml", (d) => { d.spec.predictor.replicas = 3; }],
  ["InferenceService upper-case name", "kserve/inferenceservice.yaml", (d) => { d.metadata.name = "Qwen"; }],
];
let selfFailures = 0;
if (files.length && files.every((f) => f.startsWith(path.join(ROOT, "deploy/kubernetes")))) {
  const tmp = fs.mkdtempSync(path.join(process.env.TMPDIR ?? "/tmp", "qilin-deploy-"));
  for (const [what, rel, mutate] of mutations) {
    const src = path.join(ROOT, "deploy/kubernetes", rel);
    if (!fs.existsSync(src)) continue;
    const docs = YAML.parseAllDocuments(fs.readFileSync(src, "utf8")).map((d) => d.toJS());
    docs.forEach(mutate);
    const out = path.join(tmp, path.basename(rel));
    fs.writeFileSync(out, docs.map((d) => YAML.stringify(d)).join("---\n"));
    const r = await checkFiles([out], serveFlags ?? new Set(["--device", "--max-batch-size", "--max-queue", "--served-model-name", "--host", "--http-port", "--grpc-port", "--metrics-port", "--kv-cache-free-mem-fraction"]));
    if (process.env.QILIN_DEPLOY_VERBOSE) console.log(`  ${what}: ${r.errors.join(" | ")}`);
    if (r.errors.length === 0) {
      console.error(`deploy: self-test: '${what}' was not caught`);
      ++selfFailures;
    }
  }
  fs.rmSync(tmp, { recursive: true, force: true });
  console.log(`deploy: self-test: ${mutations.length - selfFailures}/${mutations.length} broken manifests caught`);
}
process.exit(errors.length || selfFailures ? 1 : 0);
