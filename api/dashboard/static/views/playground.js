// The playground: chat with a base model, a fine-tuned model or a checkpoint through
// POST /v1/chat/completions, the answer streamed token by token.

import { get, streamChat } from "../api.js";
import { errorBox, fill, h } from "../dom.js";

export async function playgroundPage(main, { signal, params }) {
  const { data: models } = await get("/models", { signal });
  const groups = ["fine-tuned", "checkpoint", "base"].map((kind) =>
    h(
      "optgroup",
      { label: kind },
      models.filter((m) => m.kind === kind).map((m) => h("option", { value: m.id }, m.id)),
    ),
  );
  const model = h("select", { name: "model" }, groups);
  const wanted = params.get("model");
  if (wanted) model.value = wanted;
  const system = h("textarea", { name: "system", rows: 2, placeholder: "optional system message" });
  const temperature = h("input", {
    type: "number",
    name: "temperature",
    min: 0,
    max: 2,
    step: 0.1,
    value: 0,
  });
  const maxTokens = h("input", { type: "number", name: "max_tokens", min: 1, value: 128 });
  const prompt = h("textarea", { name: "prompt", rows: 3, placeholder: "Your message", required: true });
  const transcript = h("div", { class: "transcript", "aria-live": "polite" });
  const problem = h("div");
  const send = h("button", { type: "submit", name: "send" }, "Send");
  const stop = h("button", { type: "button", name: "stop", hidden: true }, "Stop");
  const messages = [];
  const clearAll = () => {
    messages.length = 0;
    fill(transcript);
  };
  const clear = h("button", { type: "button", name: "clear", onclick: clearAll }, "Clear");

  main.append(
    h("header", { class: "page" }, h("h1", null, "Playground")),
    h(
      "div",
      { class: "grid" },
      h("label", { class: "span2" }, h("span", { class: "label" }, "Model"), model),
      h("label", null, h("span", { class: "label" }, "Temperature"), temperature),
      h("label", null, h("span", { class: "label" }, "Max tokens"), maxTokens),
    ),
    h("label", { class: "wide" }, h("span", { class: "label" }, "System"), system),
    transcript,
    problem,
    h("form", { class: "chat", onsubmit: ask }, prompt, h("div", { class: "actions" }, send, stop, clear)),
  );

  async function ask(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    fill(problem);
    const question = { role: "user", content: text };
    const asked = h("div", { class: "message user" }, text);
    const answer = h("div", { class: "message assistant" });
    transcript.append(asked, answer);
    prompt.value = "";
    const controller = new AbortController();
    signal.addEventListener("abort", () => controller.abort());
    stop.onclick = () => controller.abort();
    [send.disabled, stop.hidden] = [true, false];
    let reply = "";
    try {
      const history = system.value.trim()
        ? [{ role: "system", content: system.value.trim() }, ...messages, question]
        : [...messages, question];
      const request = {
        model: model.value,
        messages: history,
        temperature: Number(temperature.value),
        max_tokens: Number(maxTokens.value),
      };
      for await (const chunk of streamChat(request, controller.signal)) {
        reply += chunk.choices?.[0]?.delta?.content ?? "";
        answer.textContent = reply;
      }
      messages.push(question, { role: "assistant", content: reply });
    } catch (error) {
      if (error.name !== "AbortError") {
        asked.remove();
        answer.remove();
        fill(problem, errorBox(error));
      } else if (reply) {
        messages.push(question, { role: "assistant", content: reply }); // stopped: keep what was said
      }
    } finally {
      [send.disabled, stop.hidden] = [false, true];
    }
  }
}
