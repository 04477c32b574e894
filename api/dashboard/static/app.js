// The dashboard's shell: sign-in, navigation and hash routes (#/jobs, #/jobs/{id}, #/new, #/models,
// #/models/{id}, #/playground). Each view renders into <main> and stops its polling when `signal` aborts.

import { get, session } from "./api.js";
import { errorBox, h } from "./dom.js";
import { createPage } from "./views/create.js";
import { jobPage } from "./views/job.js";
import { jobsPage } from "./views/jobs.js";
import { modelsPage } from "./views/models.js";
import { playgroundPage } from "./views/playground.js";

const ROUTES = [
  [/^\/jobs$/, jobsPage],
  [/^\/jobs\/([^/]+)$/, jobPage],
  [/^\/new$/, createPage],
  [/^\/models(?:\/(.+))?$/, modelsPage],
  [/^\/playground$/, playgroundPage],
];

let current = new AbortController();

function signInPage(main) {
  const target = ["", "#/signin"].includes(location.hash) ? "#/jobs" : location.hash;
  const key = h("input", {
    type: "password",
    name: "key",
    placeholder: "sk-ftj-…",
    autocomplete: "off",
    required: true,
  });
  const message = h("p", { class: "error", role: "alert", hidden: true });
  const form = h(
    "form",
    { class: "signin", onsubmit: signIn },
    h("h1", null, "Sign in"),
    h("label", null, "API key", key),
    h(
      "p",
      { class: "muted" },
      "An organisation's key, made on the server with ",
      h("code", null, "ftjobs keys create --org NAME"),
      ".",
    ),
    message,
    h("button", { type: "submit" }, "Sign in"),
  );
  main.append(form);
  key.focus();

  async function signIn(event) {
    event.preventDefault();
    try {
      await get("/fine_tuning/jobs?limit=1", { key: key.value.trim() }); // any organisation route will do
      session.signIn(key.value.trim());
      if (location.hash === target) render();
      else location.hash = target;
    } catch (error) {
      message.hidden = false;
      message.textContent = error.message;
    }
  }
}

function nav(path) {
  const item = (href, text) =>
    h("a", { href, class: path.startsWith(href.slice(1)) ? "active" : null }, text);
  const signOut = () => {
    session.signOut();
    location.hash = "#/signin";
  };
  return h(
    "nav",
    null,
    h("span", { class: "brand" }, "ftjobs"),
    item("#/jobs", "Jobs"),
    item("#/new", "New job"),
    item("#/models", "Models"),
    item("#/playground", "Playground"),
    h("button", { type: "button", class: "link", onclick: signOut }, "Sign out"),
  );
}

async function render() {
  current.abort();
  current = new AbortController();
  const [path, search] = location.hash.slice(1).split("?");
  const main = h("main");
  if (!session.key()) {
    document.body.replaceChildren(main);
    signInPage(main);
    return;
  }
  const route = ROUTES.map(([pattern, view]) => [pattern.exec(path), view]).find(([match]) => match);
  if (!route) {
    location.hash = "#/jobs";
    return;
  }
  const [match, view] = route;
  document.body.replaceChildren(nav(path), main);
  const params = new URLSearchParams(search);
  try {
    await view(
      main,
      { signal: current.signal, params },
      ...match.slice(1).map((part) => part && decodeURIComponent(part)),
    );
  } catch (error) {
    main.append(errorBox(error));
  }
}

window.addEventListener("hashchange", render);
render();
