// Building the page: elements from plain data (text is always set as text, never parsed as HTML) and
// the few formats every view shares.

export function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value == null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "value") element.value = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  element.append(...nodes(children));
  return element;
}

function nodes(children) {
  return children
    .flat(Infinity)
    .filter((c) => c != null && c !== false)
    .map((c) => (c instanceof Node ? c : String(c)));
}

/** Replace an element's content. */
export function fill(element, ...children) {
  element.replaceChildren(...nodes(children));
  return element;
}

export const link = (href, text) => h("a", { href }, text);
export const status = (value) => h("span", { class: `status status-${value}` }, value.replaceAll("_", " "));
export const errorBox = (error) => h("p", { class: "error", role: "alert" }, error.message);

/** A Unix time as the reader's local date and time; `precise` adds the seconds (events). */
export function time(seconds, precise = false) {
  const style = { dateStyle: "short", timeStyle: precise ? "medium" : "short" };
  return seconds == null ? "—" : new Date(seconds * 1000).toLocaleString(undefined, style);
}

export function number(value) {
  if (value == null) return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString();
  return Math.abs(value) >= 1000 ? value.toFixed(0) : value.toPrecision(4);
}

export function bytes(value) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  for (; value >= 1000 && i < units.length - 1; i++) value /= 1000;
  return `${value.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

/** Key → value pairs in columns (hyperparameters, lineage, metrics). */
export function pairs(object) {
  const entries = Object.entries(object ?? {});
  if (!entries.length) return h("p", { class: "muted" }, "None.");
  const shown = (value) =>
    typeof value === "object" && value !== null ? JSON.stringify(value) : number(value);
  return h(
    "dl",
    { class: "pairs" },
    entries.map(([key, value]) => h("div", null, h("dt", null, key), h("dd", null, shown(value)))),
  );
}

/** A table from rows of cells, with a header row. */
export function table(headers, rows, attrs) {
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      attrs,
      h(
        "thead",
        null,
        h(
          "tr",
          null,
          headers.map((name) => h("th", null, name)),
        ),
      ),
      h(
        "tbody",
        null,
        rows.map((cells) =>
          h(
            "tr",
            null,
            cells.map((cell) => h("td", null, cell)),
          ),
        ),
      ),
    ),
  );
}

export const section = (title, ...children) => h("section", null, h("h2", null, title), ...children);

/** Run `step` now and every `ms` milliseconds until it returns false or the view is left. */
export async function poll(ms, signal, step) {
  while (!signal.aborted && (await step()) !== false) await new Promise((resolve) => setTimeout(resolve, ms));
}
