// The create-job form. Its hyperparameter fields come from the API's own OpenAPI schema, and every check is
// the API's: a 400 is shown next to the field its `param` names. "Estimate" asks the pre-flight route.

import { get, openapi, post, uploadFile } from "../api.js";
import { bytes, duration, errorBox, fill, h, number, pairs, section, table } from "../dom.js";

// Shown first; every other hyperparameter the schema lists sits under "More hyperparameters".
const COMMON = [
  "training_type",
  "n_epochs",
  "batch_size",
  "learning_rate_multiplier",
  "beta",
  "lora_r",
  "max_seq_length",
];

export async function createPage(main, { signal }) {
  const [schema, models, files] = await Promise.all([
    openapi(),
    get("/models", { signal }),
    get("/files?purpose=fine-tune&limit=100", { signal }),
  ]);
  const components = schema.components.schemas;
  const resolve = (node) => (node?.$ref ? components[node.$ref.split("/").pop()] : node);

  const model = h(
    "select",
    { name: "model" },
    models.data.filter((m) => m.kind === "base").map((m) => h("option", { value: m.id }, m.id)),
  );
  const training = fileChooser("training_file", files.data, "choose an uploaded file");
  const validation = fileChooser("validation_file", files.data, "none");
  const methodType = h(
    "select",
    { name: "method.type", onchange: showHyperparameters },
    components.Method.properties.type.enum.map((t) => h("option", { value: t }, t)),
  );
  const suffix = h("input", { type: "text", name: "suffix", placeholder: "optional" });
  const seed = h("input", { type: "text", name: "seed", inputmode: "numeric", placeholder: "random" });
  const exportMerged = h("input", { type: "checkbox", name: "export_merged" });
  const hyperparameterBox = h("div");
  const formError = h("div");
  const preflight = h("div", { class: "preflight" });
  const buttons = [
    h("button", { type: "button", name: "estimate", onclick: () => run(estimate) }, "Estimate"),
    h("button", { type: "submit", name: "create" }, "Create job"),
  ];
  let hyperparameters = [];

  const form = h(
    "form",
    { class: "create", onsubmit: (event) => (event.preventDefault(), run(create)) },
    h("header", { class: "page" }, h("h1", null, "New fine-tuning job")),
    h(
      "div",
      { class: "grid" },
      field("Base model", "model", model),
      field("Method", "method.type", methodType),
      field("Training file (JSONL)", "training_file", training.control),
      field("Validation file (optional)", "validation_file", validation.control),
      field("Suffix", "suffix", suffix),
      field("Seed", "seed", seed),
      field("Also export a merged model", "export_merged", exportMerged),
    ),
    h("h2", null, "Hyperparameters"),
    h("p", { class: "muted" }, 'Empty fields keep the API\'s default ("auto" where it has one).'),
    hyperparameterBox,
    formError,
    h("div", { class: "actions" }, buttons),
    preflight,
  );
  main.append(form);
  showHyperparameters();

  function showHyperparameters() {
    const type = methodType.value;
    const method = (resolve(components.Method.properties[type])?.anyOf ?? [])
      .map(resolve)
      .find((s) => s.properties);
    const shape = resolve(method?.properties.hyperparameters);
    hyperparameters = Object.entries(shape?.properties ?? {}).map(([name, property]) =>
      hyperparameter(name, property, resolve, type),
    );
    const common = hyperparameters.filter((p) => COMMON.includes(p.name));
    const rest = hyperparameters.filter((p) => !COMMON.includes(p.name));
    fill(
      hyperparameterBox,
      shape
        ? h(
            "div",
            { class: "grid" },
            common.map((p) => p.field),
          )
        : h("p", { class: "muted" }, `The schema lists no hyperparameters for ${type}.`),
      rest.length > 0 &&
        h(
          "details",
          null,
          h("summary", null, "More hyperparameters"),
          h(
            "div",
            { class: "grid" },
            rest.map((p) => p.field),
          ),
        ),
    );
  }

  async function body() {
    const type = methodType.value;
    const values = Object.fromEntries(
      hyperparameters.map((p) => [p.name, p.value()]).filter(([, v]) => v !== undefined),
    );
    return {
      model: model.value,
      training_file: await training.id(),
      validation_file: (await validation.id()) ?? undefined,
      suffix: suffix.value.trim() || undefined,
      seed: parse(seed.value, true),
      export_merged: exportMerged.checked || undefined,
      method: { type, [type]: { hyperparameters: values } },
    };
  }

  async function create() {
    const job = await post("/fine_tuning/jobs", await body());
    location.hash = `#/jobs/${job.id}`;
  }

  async function estimate() {
    fill(preflight, h("p", { class: "muted" }, "Estimating…"));
    try {
      fill(preflight, preflightOf(await post("/fine_tuning/preflight", await body())));
    } catch (error) {
      fill(preflight);
      throw error; // shown by `run`, next to the field the API's 400 names
    }
  }

  async function run(action) {
    form.querySelectorAll(".field-error").forEach((p) => fill(p));
    fill(formError);
    buttons.forEach((button) => (button.disabled = true));
    try {
      await action();
    } catch (error) {
      showError(error);
    } finally {
      buttons.forEach((button) => (button.disabled = false));
    }
  }

  function showError(error) {
    // The field whose param is the longest prefix of the error's (`method.supervised.hyperparameters.n_epochs`).
    const match = [...form.querySelectorAll(".field")]
      .filter(
        ({ dataset }) =>
          error.param && (error.param === dataset.param || error.param.startsWith(`${dataset.param}.`)),
      )
      .sort((a, b) => b.dataset.param.length - a.dataset.param.length)[0];
    if (!match) {
      fill(formError, errorBox(error));
      return;
    }
    match.closest("details")?.setAttribute("open", "");
    fill(match.querySelector(".field-error"), error.message);
    match.querySelector("input, select")?.focus();
  }
}

function field(label, param, control, hint) {
  return h(
    "div",
    { class: "field", "data-param": param },
    h("label", null, h("span", { class: "label" }, label), control),
    hint && h("small", { class: "muted" }, hint),
    h("p", { class: "field-error", role: "alert" }),
  );
}

/** Upload a new file, or pick one already uploaded; an upload's id joins the list so it is sent once. */
function fileChooser(param, files, empty) {
  const input = h("input", { type: "file", name: param, accept: ".jsonl,.json,.txt" });
  const existing = h(
    "select",
    { name: `${param}_id` },
    h("option", { value: "" }, empty),
    files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`)),
  );
  async function id() {
    const [file] = input.files;
    if (!file) return existing.value || null;
    try {
      const uploaded = await uploadFile(file);
      existing.append(h("option", { value: uploaded.id }, `${uploaded.filename} (${uploaded.id})`));
      existing.value = uploaded.id;
      input.value = "";
      return uploaded.id;
    } catch (error) {
      error.param = param; // the upload's own param (`file`, `purpose`) means this field here
      throw error;
    }
  }
  return { control: h("div", { class: "file-chooser" }, input, existing), id };
}

/** A field for one hyperparameter from its JSON schema: a select when the schema lists every value. */
function hyperparameter(name, property, resolve, methodType) {
  const variants = (property.anyOf ?? [property]).map(resolve).filter((v) => v.type !== "null");
  const choices = variants.flatMap(
    (v) => v.enum ?? (v.const !== undefined ? [v.const] : v.type === "boolean" ? [true, false] : []),
  );
  const open = variants.some((v) => v.enum === undefined && v.const === undefined && v.type !== "boolean");
  const numeric = variants.some((v) => ["integer", "number"].includes(v.type));
  const fallback = property.default !== undefined ? `default (${property.default})` : "default";
  const control = open
    ? h("input", { type: "text", name, placeholder: String(property.default ?? "") })
    : h(
        "select",
        { name },
        h("option", { value: "" }, fallback),
        choices.map((c) => h("option", { value: String(c) }, String(c))),
      );
  const value = () => {
    if (!open) return control.value === "" ? undefined : choices.find((c) => String(c) === control.value);
    return parse(control.value, numeric);
  };
  const hint = open ? variants.map(describe).join(" or ") : null;
  return { name, value, field: field(name, `method.${methodType}.hyperparameters.${name}`, control, hint) };
}

/** What a person typed, as JSON: a number where one is allowed, a list when it looks like one; the API judges it. */
function parse(text, numeric) {
  const value = text.trim();
  if (value === "") return undefined;
  if (numeric && !Number.isNaN(Number(value))) return Number(value);
  if (value.startsWith("[")) {
    try {
      return JSON.parse(value);
    } catch {
      return value;
    }
  }
  return value;
}

function describe(variant) {
  if (variant.const !== undefined) return `"${variant.const}"`;
  if (variant.enum) return variant.enum.join(" | ");
  if (variant.type === "array") return 'a list, e.g. ["q_proj", "v_proj"]';
  const { type, minimum: min, maximum: max, exclusiveMinimum: above, exclusiveMaximum: below } = variant;
  if (min !== undefined && max !== undefined) return `${type} from ${min} to ${max}`;
  const bounds = [
    min !== undefined && `≥ ${min}`,
    above !== undefined && `> ${above}`,
    max !== undefined && `≤ ${max}`,
    below !== undefined && `< ${below}`,
  ];
  return [type, bounds.filter(Boolean).join(", ")].join(" ").trim();
}

function preflightOf(result) {
  const fileRow = (label, f) =>
    f && [
      label,
      number(f.n_examples),
      number(f.n_tokens),
      number(f.n_trained_tokens),
      number(f.n_truncated),
      number(f.max_example_tokens),
    ];
  const { memory, duration: time } = result;
  const fits =
    { true: ": fits.", false: ": does not fit." }[memory?.fits] ?? ": no device size to compare with.";
  const text = (segments) =>
    h(
      "pre",
      null,
      segments.map((s) => [
        h(s.trained ? "mark" : "span", null, s.text),
        s.omitted_chars > 0 && h("span", { class: "muted" }, ` [${s.omitted_chars} characters left out] `),
      ]),
    );
  return [
    h("h2", null, "Estimate"),
    result.warnings?.length > 0 &&
      h(
        "ul",
        { class: "warnings" },
        result.warnings.map((w) => h("li", null, w)),
      ),
    h(
      "p",
      null,
      `${result.model}: ${result.method?.type ?? result.method} with ${result.training_type}, rows up to ${number(result.max_seq_length)} tokens.`,
    ),
    table(
      ["File", "Examples", "Tokens", "Trained tokens", "Truncated", "Longest example"],
      [fileRow("training", result.training_file), fileRow("validation", result.validation_file)].filter(
        Boolean,
      ),
      { class: "files" },
    ),
    memory &&
      section(
        "Memory",
        h(
          "p",
          { class: memory.fits === false ? "error" : "fits" },
          `About ${bytes(memory.estimated_bytes)}`,
          memory.device?.total_bytes
            ? ` of ${bytes(memory.device.total_bytes)} on ${memory.device.name}, as seen by ${memory.device.source}`
            : "",
          fits,
        ),
        memory.device?.total_bytes &&
          h("meter", {
            min: 0,
            max: memory.device.total_bytes,
            value: memory.estimated_bytes,
            high: memory.device.total_bytes * 0.9,
          }),
        pairs(Object.fromEntries(Object.entries(memory.breakdown ?? {}).map(([k, v]) => [k, bytes(v)]))),
      ),
    time &&
      section(
        "Duration",
        h(
          "p",
          null,
          time.estimated_seconds != null ? `About ${duration(time.estimated_seconds)}` : "No estimate yet",
          `: ${number(time.tokens_to_train)} tokens over ${number(time.n_epochs)} epochs`,
          time.tokens_per_second
            ? ` at ${number(time.tokens_per_second)} tokens/s, measured on ${number(time.based_on_jobs)} earlier jobs.`
            : " (no earlier job of this model and method to measure the speed on).",
        ),
      ),
    result.loss_mask_preview?.length > 0 &&
      section(
        "Loss mask preview",
        h("p", { class: "muted" }, "Highlighted text is trained on; the rest is context."),
        result.loss_mask_preview.map((example, i) =>
          h(
            "div",
            { class: "mask" },
            h(
              "small",
              { class: "muted" },
              `Example ${i + 1}: ${number(example.n_tokens)} tokens${example.truncated ? ", truncated" : ""}${example.label ? `, label ${example.label}` : ""}`,
            ),
            text(example.segments),
            example.non_preferred_segments && [
              h("small", { class: "muted" }, "Non-preferred answer"),
              text(example.non_preferred_segments),
            ],
          ),
        ),
      ),
  ];
}
