// Models: base models with the fine-tuned models and checkpoints made from them (a lineage tree), one
// model's lineage, and downloads of its artifacts.

import { download, get, modelPath } from "../api.js";
import { errorBox, fill, h, link, pairs, section, time } from "../dom.js";

export async function modelsPage(main, { signal }, selected) {
  const { data: models } = await get("/models", { signal });
  main.append(h("header", { class: "page" }, h("h1", null, "Models")));
  const detail = h("div", { class: "model-detail" });
  main.append(h("div", { class: "models" }, h("div", null, tree(models, selected)), detail));
  if (selected) await showModel(detail, selected, signal);
  else detail.append(h("p", { class: "muted" }, "Choose a model to see its lineage and download it."));
}

/** Bases, then under each the fine-tuned models trained on it, then each job's checkpoints. */
function tree(models, selected) {
  const children = (parent) => models.filter(parent);
  const item = (model, nested) =>
    h(
      "li",
      { class: model.id === selected ? "selected" : null },
      link(`#${modelPath(model.id)}`, model.id),
      " ",
      h("span", { class: `kind kind-${model.kind}` }, model.kind),
      nested?.length ? h("ul", null, nested) : null,
    );
  const jobIds = new Set(models.filter((m) => m.kind === "fine-tuned").map((m) => m.fine_tuning_job));
  const checkpointsOf = (test) => children((m) => m.kind === "checkpoint" && test(m)).map((m) => item(m));
  return h(
    "ul",
    { class: "tree" },
    children((m) => m.kind === "base").map((base) =>
      item(base, [
        ...children((m) => m.kind === "fine-tuned" && m.base_model === base.id).map((tuned) =>
          item(
            tuned,
            checkpointsOf((m) => m.fine_tuning_job === tuned.fine_tuning_job),
          ),
        ),
        // Checkpoints of jobs that published no model (still running, cancelled or failed).
        ...checkpointsOf((m) => m.base_model === base.id && !jobIds.has(m.fine_tuning_job)),
      ]),
    ),
  );
}

async function showModel(detail, id, signal) {
  let model;
  try {
    model = await get(modelPath(id), { signal });
  } catch (error) {
    detail.append(errorBox(error));
    return;
  }
  const problem = h("div");
  const lineage = model.lineage;
  const fetchArtifact = async (format) => {
    fill(problem, h("p", { class: "muted" }, `Downloading the ${format} artifact…`));
    try {
      await download(`${modelPath(id)}/content?format=${format}`);
      fill(problem);
    } catch (error) {
      fill(problem, errorBox(error));
    }
  };
  fill(
    detail,
    h("h2", null, model.id),
    h(
      "dl",
      { class: "summary" },
      [h("dt", null, "Kind"), h("dd", null, model.kind)],
      [h("dt", null, "Owned by"), h("dd", null, model.owned_by)],
      [h("dt", null, "Created"), h("dd", null, time(model.created))],
      model.base_model && [
        h("dt", null, "Base model"),
        h("dd", null, link(`#${modelPath(model.base_model)}`, model.base_model)),
      ],
      model.fine_tuning_job && [
        h("dt", null, "Job"),
        h("dd", null, link(`#/jobs/${model.fine_tuning_job}`, model.fine_tuning_job)),
      ],
      model.step != null && [h("dt", null, "Step"), h("dd", null, model.step)],
    ),
    h(
      "div",
      { class: "actions" },
      model.formats.map((format) =>
        h(
          "button",
          { type: "button", name: `download-${format}`, onclick: () => fetchArtifact(format) },
          `Download ${format} (.tar.gz)`,
        ),
      ),
      h("a", { class: "button", href: `#/playground?model=${encodeURIComponent(model.id)}` }, "Chat with it"),
    ),
    problem,
    lineage && lineageOf(lineage),
  );
}

function lineageOf(lineage) {
  const short = (hash) => `${hash.slice(0, 19)}…`;
  const file = (ref) => (ref ? `${ref.id} (${short(ref.sha256)})` : "—");
  return [
    section(
      "Lineage",
      pairs({
        "Base model": `${lineage.base_model.name} (${short(lineage.base_model.content_hash)})`,
        Tokenizer: short(lineage.tokenizer_hash),
        "Training file": file(lineage.training_file),
        "Validation file": file(lineage.validation_file),
        Objective: lineage.objective,
        "Training type": lineage.training_type,
        Step: lineage.step,
      }),
    ),
    section("Metrics", pairs(lineage.metrics)),
    section("Hyperparameters (resolved)", pairs(lineage.hyperparameters)),
    section("Libraries", pairs(lineage.libraries)),
  ];
}
