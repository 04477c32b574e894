// The jobs list: newest first, refreshed every few seconds. The status and metadata filters are the
// API's own (`status`, `metadata[key]=value`), so they reach every job; text search narrows the jobs loaded.

import { get, openapi, query } from "../api.js";
import { errorBox, fill, h, link, number, poll, status, table, time } from "../dom.js";

const PAGE = 50;
const REFRESH_MS = 5000;

export async function jobsPage(main, { signal, params }) {
  let jobs = [];
  let hasMore = false;
  let wanted = PAGE;
  // The statuses the API filters by, from its own schema (as the create form takes its fields).
  const statuses = (await openapi()).components.schemas.JobStatus.enum;
  const statusFilter = h(
    "select",
    { name: "status", onchange: reload },
    h("option", { value: "" }, "any status"),
    statuses.map((s) => h("option", { value: s }, s)),
  );
  const search = h("input", {
    type: "search",
    name: "search",
    placeholder: "id, model, suffix…",
    oninput: show,
    value: params.get("q"),
  });
  const metadata = h("input", { type: "text", name: "metadata", placeholder: "key=value", onchange: reload });
  const list = h("div");
  const more = h("button", { type: "button", hidden: true, onclick: loadMore }, "Load more");
  const problem = h("div");
  main.append(
    h(
      "header",
      { class: "page" },
      h("h1", null, "Fine-tuning jobs"),
      h("a", { class: "button", href: "#/new" }, "New job"),
    ),
    h(
      "div",
      { class: "filters" },
      h("label", null, "Status ", statusFilter),
      h("label", null, "Search ", search),
      h("label", null, "Metadata ", metadata),
    ),
    problem,
    list,
    more,
  );

  async function load() {
    const at = metadata.value.indexOf("=");
    const key = metadata.value.slice(0, at).trim();
    const filter = at > 0 && key ? { [`metadata[${key}]`]: metadata.value.slice(at + 1).trim() } : {};
    filter.status = statusFilter.value;
    let after = null;
    const loaded = [];
    do {
      const page = await get(
        `/fine_tuning/jobs${query({ ...filter, limit: Math.min(100, wanted - loaded.length), after })}`,
        { signal },
      );
      loaded.push(...page.data);
      hasMore = page.has_more;
      after = page.last_id;
    } while (hasMore && loaded.length < wanted);
    jobs = loaded;
    show();
  }

  function show() {
    const text = search.value.trim().toLowerCase();
    const shown = jobs.filter(
      (job) =>
        !text ||
        [
          job.id,
          job.model,
          job.fine_tuned_model,
          job.user_provided_suffix,
          ...Object.values(job.metadata ?? {}),
        ].some((v) => v?.toLowerCase().includes(text)),
    );
    more.hidden = !hasMore;
    if (!shown.length) {
      const filtered = jobs.length || statusFilter.value || metadata.value.includes("=");
      fill(list, h("p", { class: "muted" }, filtered ? "No job matches." : "No jobs yet: create one."));
      return;
    }
    fill(
      list,
      table(
        ["Job", "Status", "Model", "Fine-tuned model", "Created", "Finished", "Trained tokens"],
        shown.map((job) => [
          link(`#/jobs/${job.id}`, job.id),
          status(job.status),
          job.model,
          job.fine_tuned_model ?? "—",
          time(job.created_at),
          time(job.finished_at),
          number(job.trained_tokens),
        ]),
        { class: "jobs" },
      ),
    );
  }

  async function refresh() {
    try {
      await load();
      fill(problem);
    } catch (error) {
      if (!signal.aborted) fill(problem, errorBox(error));
    }
  }

  function reload() {
    wanted = PAGE;
    refresh();
  }

  function loadMore() {
    wanted += PAGE;
    refresh();
  }

  poll(REFRESH_MS, signal, refresh);
}
