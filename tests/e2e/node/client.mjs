// Drives ftjobs with the official openai Node SDK, then type-checks every response it got against the SDK's
// own TypeScript types: each goes into a generated .ts file as a typed constant, checked by `tsc --strict`.
//
//   OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=sk-ftj-... \
//     node client.mjs MODEL TRAIN.jsonl VALID.jsonl OUT_DIR
//
// Exits with tsc's status: non-zero when any response does not fit its declared type. openai is pinned to
// 6.49.0, the last release that runs on Node 20 (7.x needs Node 22).
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import OpenAI from "openai";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOB_TIMEOUT_MS = 300_000;

// The SDK's types, by the module that exports each.
const IMPORTS = {
  "openai/resources/files": ["FileObject"],
  "openai/resources/fine-tuning/jobs/jobs": ["FineTuningJob", "FineTuningJobEvent"],
  "openai/resources/fine-tuning/jobs/checkpoints": ["FineTuningJobCheckpoint"],
  "openai/resources/models": ["Model"],
  "openai/resources/chat/completions": ["ChatCompletion", "ChatCompletionChunk"],
  "openai/resources/completions": ["Completion"],
  "openai/pagination": ["CursorPageResponse", "PageResponse"],
};

const [model, trainPath, validPath, outDir] = process.argv.slice(2);
const client = new OpenAI();
const received = []; // [name, type, body]

function keep(name, type, body) {
  received.push([name, type, body]);
  return body;
}

async function waitForJob(id) {
  const deadline = Date.now() + JOB_TIMEOUT_MS;
  for (;;) {
    const job = await client.fineTuning.jobs.retrieve(id);
    if (TERMINAL.has(job.status)) return job;
    if (Date.now() > deadline) throw new Error(`job ${id} still ${job.status}`);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function run() {
  const upload = (file) => client.files.create({ file: fs.createReadStream(file), purpose: "fine-tune" });
  const train = keep("uploaded", "FileObject", await upload(trainPath));
  const valid = await upload(validPath);
  keep("file", "FileObject", await client.files.retrieve(train.id));

  const created = await client.fineTuning.jobs.create({
    model,
    training_file: train.id,
    validation_file: valid.id,
    suffix: "node",
    seed: 5,
    metadata: { client: "node" },
    method: { type: "supervised", supervised: { hyperparameters: { n_epochs: 1, batch_size: 4 } } },
  });
  keep("created", "FineTuningJob", created);
  const job = keep("job", "FineTuningJob", await waitForJob(created.id));
  if (job.status !== "succeeded") throw new Error(`${job.id} ${job.status}: ${JSON.stringify(job.error)}`);

  // A page's `body` is the list envelope exactly as it arrived.
  const jobs = client.fineTuning.jobs;
  const pages = [
    ["jobs", "CursorPageResponse<FineTuningJob>", jobs.list({ limit: 5 })],
    ["events", "CursorPageResponse<FineTuningJobEvent>", jobs.listEvents(job.id, { limit: 100 })],
    ["checkpoints", "CursorPageResponse<FineTuningJobCheckpoint>", jobs.checkpoints.list(job.id)],
    ["files", "CursorPageResponse<FileObject>", client.files.list()],
    ["models", "PageResponse<Model>", client.models.list()],
  ];
  for (const [name, type, page] of pages) {
    const body = keep(name, type, (await page).body);
    if (body.data.length === 0) throw new Error(`no ${name} listed`);
  }
  keep("model", "Model", await client.models.retrieve(job.fine_tuned_model));

  // `ftjobs up` starts the inference server beside the API: it answers 503 with Retry-After until it is up.
  const ask = { model: job.fine_tuned_model, max_tokens: 4, temperature: 0 };
  const messages = [{ role: "user", content: "Is this review positive or negative? A moving, funny film." }];
  const chat = await client.chat.completions.create({ ...ask, messages }, { maxRetries: 30 });
  keep("chat", "ChatCompletion", chat);
  const stream = await client.chat.completions.create({
    ...ask,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  let chunks = 0;
  for await (const chunk of stream) keep(`chunk${chunks++}`, "ChatCompletionChunk", chunk);
  const completion = await client.completions.create({ ...ask, prompt: "The film was" });
  keep("completion", "Completion", completion);
}

function typescript() {
  const lines = Object.entries(IMPORTS).map(
    ([module, names]) => `import type { ${names.join(", ")} } from "${module}";`,
  );
  // `as const` keeps each literal's type ("file", not string); Received drops the readonly it adds. The
  // assignment is then a structural check: keys the type does not declare (our extensions) are allowed.
  lines.push("", "type Received<T> = { -readonly [K in keyof T]: Received<T[K]> };", "");
  for (const [name, type, body] of received) {
    lines.push(`const ${name}_json = ${JSON.stringify(body, null, 2)} as const;`);
    lines.push(`export const ${name}: ${type} = ${name}_json as Received<typeof ${name}_json>;`, "");
  }
  return lines.join("\n");
}

await run();
fs.mkdirSync(outDir, { recursive: true });
fs.writeFileSync(path.join(outDir, "responses.ts"), typescript());
// tsc resolves `openai` from the directory of the file it checks.
const modules = path.join(outDir, "node_modules");
if (!fs.existsSync(modules)) fs.symlinkSync(path.join(HERE, "node_modules"), modules);
const tsc = spawnSync(
  path.join(HERE, "node_modules", ".bin", "tsc"),
  ["--strict", "--noEmit", "--module", "preserve", "--moduleResolution", "bundler", "--target", "es2022",
    "--skipLibCheck", path.join(outDir, "responses.ts")],
  { stdio: "inherit" },
);
process.exit(tsc.status ?? 1);
