// One job: live curves from its `metrics` events, evaluation (baseline vs tuned), checkpoints,
// hyperparameters, events, and the cancel/pause/resume actions. Polls every 2 s until the job ends.

import { download, get, modelPath, post, query } from "../api.js";
import { lineChart } from "../chart.js";
import { errorBox, fill, h, link, number, pairs, poll, section, status, table, time } from "../dom.js";

const POLL_MS = 2000;
const TERMINAL = ["succeeded", "failed", "cancelled"];

export async function jobPage(main, { signal }, id) {
  const events = []; // oldest first
  const seen = new Set();
  const parts = Array.from({ length: 8 }, () => h("div"));
  const [header, summary, progress, evaluation, checkpoints, hyperparameters, eventList, problem] = parts;
  const charts = h("div", { class: "charts" });
  const actionError = h("p", { class: "error", role: "alert", hidden: true });
  main.append(
    header,
    actionError,
    problem,
    summary,
    progress,
    section("Curves", charts),
    section("Baseline vs tuned", evaluation),
    section("Checkpoints", checkpoints),
    section("Hyperparameters", hyperparameters),
    section("Events", eventList),
  );

  async function readNewEvents() {
    // Newest first: read pages until one reaches an event already shown, or the first event of all.
    const fresh = [];
    for (let after = null; ;) {
      const page = await get(
        `/fine_tuning/jobs/${id}/events${query({ limit: seen.size ? 100 : 1000, after })}`,
        { signal },
      );
      const unseen = page.data.filter((event) => !seen.has(event.id));
      fresh.push(...unseen);
      if (!page.has_more || unseen.length < page.data.length) break;
      after = page.last_id;
    }
    fresh.reverse().forEach((event) => seen.add(event.id));
    events.push(...fresh);
  }

  async function refresh() {
    try {
      // The job first: once it has ended, the events and checkpoints read after it are complete.
      const job = await get(`/fine_tuning/jobs/${id}`, { signal });
      const [saved] = await Promise.all([
        get(`/fine_tuning/jobs/${id}/checkpoints?limit=100`, { signal }),
        readNewEvents(),
      ]);
      show(job, saved.data);
      fill(problem);
      return !TERMINAL.includes(job.status);
    } catch (error) {
      if (signal.aborted) return false;
      fill(problem, errorBox(error));
      return error.status !== 404;
    }
  }

  function show(job, saved) {
    fill(header, headerOf(job));
    fill(summary, summaryOf(job));
    const { lines, step, totalSteps } = curves(events);
    fill(
      progress,
      totalSteps
        ? h(
            "p",
            { class: "progress" },
            h("progress", { value: step, max: totalSteps }),
            ` step ${step} of ${totalSteps}`,
          )
        : null,
    );
    const by = (test) => lines.filter(({ name }) => test(name));
    const isLoss = (name) => name.endsWith("loss");
    const isAccuracy = (name) => name.includes("accuracy");
    // Reinforcement jobs: the grader's mean reward on sampled answers (and each multi sub-grader's).
    const isReward = (name) => name.includes("mean_reward");
    fill(
      charts,
      lineChart("Loss", by(isLoss), totalSteps),
      lineChart("Accuracy", by(isAccuracy), totalSteps),
      by(isReward).length ? lineChart("Reward", by(isReward), totalSteps) : null,
      // Perplexity is exp(loss): the loss chart already shows it; it is in the evaluation table.
      lineChart(
        "Task metrics",
        by((name) => !isLoss(name) && !isAccuracy(name) && !isReward(name) && !name.includes("perplexity")),
        totalSteps,
      ),
    );
    if (!lines.length)
      charts.append(h("p", { class: "muted" }, "Curves appear once training reports its first step."));
    fill(evaluation, evaluationOf(job.evaluation));
    fill(checkpoints, checkpointsOf(saved));
    const method = job.method[job.method.type] ?? {};
    fill(
      hyperparameters,
      h("p", null, "Method: ", h("strong", null, job.method.type)),
      pairs(method.hyperparameters),
    );
    const rows = events
      .toReversed()
      .map((event) => [
        time(event.created_at, true),
        h("span", { class: `level-${event.level}` }, event.level),
        event.message,
      ]);
    fill(
      eventList,
      h("div", { class: "events-box" }, table(["Time", "Level", "Message"], rows, { class: "events" })),
    );
  }

  function headerOf(job) {
    const action = (name) =>
      h(
        "button",
        { type: "button", name, class: name === "cancel" ? "danger" : null, onclick: () => act(name) },
        name[0].toUpperCase() + name.slice(1),
      );
    const terminal = TERMINAL.includes(job.status);
    return h(
      "header",
      { class: "page" },
      h("h1", null, job.id, " ", status(job.status)),
      h(
        "div",
        { class: "actions" },
        job.status === "running" && action("pause"),
        job.status === "paused" && action("resume"),
        !terminal && action("cancel"),
        job.fine_tuned_model &&
          h(
            "a",
            { class: "button", href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}` },
            "Chat with it",
          ),
      ),
    );
  }

  async function act(name) {
    actionError.hidden = true;
    try {
      await post(`/fine_tuning/jobs/${id}/${name}`);
    } catch (error) {
      actionError.hidden = false;
      actionError.textContent = error.message;
    }
    await latest();
  }

  // One refresh at a time: an action's refresh waits for the poll's, so no event is read twice.
  let queue = Promise.resolve();
  const latest = () => (queue = queue.then(refresh));
  poll(POLL_MS, signal, latest);
}

function summaryOf(job) {
  const fileButton = (fileId) =>
    h(
      "button",
      { type: "button", class: "link", onclick: () => download(`/files/${fileId}/content`) },
      fileId,
    );
  return [
    job.error && h("p", { class: "error", role: "alert" }, `${job.error.code}: ${job.error.message}`),
    h(
      "dl",
      { class: "summary" },
      entry("Base model", job.model),
      entry(
        "Fine-tuned model",
        job.fine_tuned_model ? link(`#${modelPath(job.fine_tuned_model)}`, job.fine_tuned_model) : "—",
      ),
      entry("Created", time(job.created_at)),
      entry("Finished", time(job.finished_at)),
      job.estimated_finish && entry("Estimated finish", time(job.estimated_finish)),
      entry("Trained tokens", number(job.trained_tokens)),
      entry("Training file", fileButton(job.training_file)),
      entry("Validation file", job.validation_file ? fileButton(job.validation_file) : "—"),
      entry("Suffix", job.user_provided_suffix ?? "—"),
      entry("Seed", job.seed),
      job.metadata && entry("Metadata", JSON.stringify(job.metadata)),
      job.result_files.length > 0 && entry("Results", job.result_files.map(fileButton)),
    ),
  ];
}

const entry = (term, value) => [h("dt", null, term), h("dd", null, value)];

/** Series per metric name from the `metrics` events; a step reported twice (a retried attempt) keeps the latest. */
function curves(events) {
  const series = new Map();
  let step = 0;
  let totalSteps = 0;
  for (const event of events) {
    if (event.type !== "metrics" || !event.data) continue;
    const { step: at, total_steps: total, ...metrics } = event.data;
    step = Math.max(step, at);
    totalSteps = Math.max(totalSteps, total ?? 0);
    for (const [name, value] of Object.entries(metrics)) {
      if (typeof value !== "number") continue;
      if (!series.has(name)) series.set(name, new Map());
      series.get(name).set(at, value);
    }
  }
  const lines = [...series].map(([name, points]) => ({
    name,
    points: [...points].sort(([a], [b]) => a - b),
  }));
  return { lines, step, totalSteps };
}

function evaluationOf(result) {
  if (!result?.baseline)
    return h(
      "p",
      { class: "muted" },
      "Jobs with a validation file are evaluated before the first step and at each checkpoint.",
    );
  const { baseline, tuned, gain = {}, best_checkpoint: best, metric } = result;
  const names = Object.keys({ ...baseline.metrics, ...tuned?.metrics });
  return [
    table(
      ["Metric", `Baseline (step ${baseline.step})`, tuned ? `Tuned (step ${tuned.step})` : "Tuned", "Gain"],
      names.map((name) => [
        name === metric ? h("strong", null, name) : name,
        number(baseline.metrics[name]),
        number(tuned?.metrics[name]),
        number(gain[name]),
      ]),
      { class: "evaluation" },
    ),
    best &&
      h(
        "p",
        null,
        "Best checkpoint by ",
        h("code", null, best.metric),
        `: step ${best.step} (${number(best.value)}), `,
        link(`#${modelPath(best.fine_tuned_model_checkpoint)}`, best.fine_tuned_model_checkpoint),
      ),
    tuned?.details &&
      Object.keys(tuned.details).length > 0 &&
      h(
        "details",
        null,
        h("summary", null, "Details of the latest evaluation"),
        h("pre", null, JSON.stringify(tuned.details, null, 2)),
      ),
  ];
}

function checkpointsOf(saved) {
  if (!saved.length) return h("p", { class: "muted" }, "No checkpoint yet: one is saved at each epoch end.");
  const names = [...new Set(saved.flatMap((checkpoint) => Object.keys(checkpoint.metrics)))].filter(
    (name) => name !== "step",
  );
  return table(
    ["Step", "Model", "", ...names],
    saved.map(({ step_number: step, metrics, fine_tuned_model_checkpoint: model }) => [
      step,
      h("a", { href: `#${modelPath(model)}`, title: model }, model.split(":").pop()),
      link(`#/playground?model=${encodeURIComponent(model)}`, "Chat"),
      ...names.map((name) => number(metrics[name])),
    ]),
    { class: "checkpoints" },
  );
}
