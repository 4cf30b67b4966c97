// The groupwise playground. Ask sends the document and the questions as one streamed
// /v1/grouped_completions request (or, one by one, as plain chat requests with the same
// prompts), shows each answer as its chunks arrive, then the answer itself (the text in its
// <answer> tags, the raw text a click away) and the run's figures from the usage.
// Model text only ever goes into the page as text nodes, never parsed as HTML; the API key
// lives in its input field and is sent as a header, nowhere else.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("ask-form");
const documentInput = $("document");
const questionList = $("questions");
const maxTokensInput = $("max-tokens");
const temperatureInput = $("temperature");
const apiKeyField = $("api-key-field");
const apiKeyInput = $("api-key");
const oneByOneSwitch = $("one-by-one");
const askButton = $("ask");
const stopButton = $("stop");
const statusLine = $("status");
const errorBox = $("error");
const runsBody = document.querySelector("#runs tbody");

let serverFacts = {
  model: null, api_key_required: false, chat_messages: null, answer_pattern: null,
};
let inFlight = null; // the AbortController of the run being asked
let runsSoFar = 0;

// --- the question list ---------------------------------------------------------------------

function questionRows() {
  return [...questionList.children];
}

function addQuestion(text = "", after = null) {
  const row = $("question-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".question-text").value = text;
  questionList.insertBefore(row, after ? after.nextSibling : null);
  numberQuestions();
  return row;
}

function numberQuestions() {
  questionRows().forEach((row, index) => {
    const name = `Question ${index + 1}`;
    const input = row.querySelector(".question-text");
    input.id = `question-${index + 1}`;
    row.querySelector(".question-label").htmlFor = input.id;
    row.querySelector(".question-label").textContent = name;
    row.querySelector(".remove").setAttribute("aria-label", `Remove ${name.toLowerCase()}`);
  });
}

function removeQuestion(row) {
  const neighbour = row.nextElementSibling || row.previousElementSibling;
  row.remove();
  numberQuestions();
  (neighbour ? neighbour.querySelector(".question-text") : $("add-question")).focus();
}

// Several pasted lines become one question each: the first goes where the cursor is.
function pasteQuestions(input, text) {
  const lines = text.split(/\r?\n/).map((line) => line.trim()).filter(Boolean);
  if (lines.length < 2) return false;
  input.setRangeText(lines[0], input.selectionStart, input.selectionEnd, "end");
  let row = input.closest(".question");
  for (const line of lines.slice(1)) row = addQuestion(line, row);
  row.querySelector(".question-text").focus();
  return true;
}

questionList.addEventListener("click", (event) => {
  if (event.target.matches(".remove")) removeQuestion(event.target.closest(".question"));
});

questionList.addEventListener("keydown", (event) => {
  const plainEnter = event.key === "Enter" && !event.ctrlKey && !event.metaKey;
  if (!plainEnter || event.isComposing || !event.target.matches(".question-text")) return;
  event.preventDefault(); // Enter adds a question rather than asking
  addQuestion("", event.target.closest(".question")).querySelector(".question-text").focus();
});

questionList.addEventListener("paste", (event) => {
  if (!event.target.matches(".question-text")) return;
  if (pasteQuestions(event.target, event.clipboardData.getData("text"))) event.preventDefault();
});

$("add-question").addEventListener("click", () => {
  addQuestion().querySelector(".question-text").focus();
});

// --- asking ------------------------------------------------------------------------------

class ServerError extends Error {
  constructor(status, message, param, retryAfter) {
    super(message);
    Object.assign(this, { status, param, retryAfter });
  }
}

class ConnectionDropped extends Error {}

async function post(path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  const key = apiKeyInput.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body), signal });
  } catch (error) {
    throw error.name === "AbortError" ? error : new ConnectionDropped();
  }
  if (!response.ok) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch {
      // not the server's JSON (a proxy's error page): the status says enough
    }
    throw new ServerError(response.status, error.message || response.statusText, error.param,
                          response.headers.get("Retry-After"));
  }
  return response;
}

// The data of each server-sent event, parsed; a stream that ends before [DONE] was cut off.
async function* streamedEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let read;
    try {
      read = await reader.read();
    } catch (error) {
      throw error.name === "AbortError" ? error : new ConnectionDropped();
    }
    if (read.done) throw new ConnectionDropped();
    buffer += read.value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (!data) continue;
      const event = JSON.parse(data);
      if (event.error) throw new ServerError(500, event.error.message, event.error.param, null);
      yield event;
    }
  }
}

// One Ask: the answers' places in the page, the usage summed so far, and the clock.
class Run {
  constructor(rows, mode) {
    this.mode = mode;
    this.answers = rows.map((row) => ({
      text: row.querySelector(".answer"), meta: row.querySelector(".answer-meta"),
      raw: row.querySelector(".raw"), rawText: row.querySelector(".raw-text"), streamed: "",
    }));
    for (const answer of this.answers) {
      answer.text.textContent = "";
      answer.meta.textContent = "";
      answer.rawText.textContent = "";
      answer.raw.hidden = true;
      answer.raw.open = false;
      answer.text.setAttribute("aria-busy", "true");
    }
    this.billed = 0;
    this.computed = 0;
    this.generated = 0;
    this.started = performance.now();
    this.firstToken = null;
  }

  append(index, delta) {
    if (!delta) return;
    this.firstToken ??= performance.now() - this.started;
    this.answers[index].streamed += delta;
    this.answers[index].text.append(delta); // a text node: markup stays text
  }

  // The answer in its tags takes the row; the raw text stays a click away. Without tags the
  // raw text is all there is.
  showAnswer(index, extracted) {
    const answer = this.answers[index];
    if (extracted === null || extracted === undefined || extracted === answer.streamed) return;
    answer.text.textContent = extracted;
    answer.rawText.textContent = answer.streamed;
    answer.raw.hidden = false;
  }

  finish(index, finishReason, usage) {
    const answer = this.answers[index];
    const cached = usage.prompt_tokens - usage.computed_prompt_tokens;
    const ending = finishReason === "length" ? "cut at max tokens" : "finished";
    answer.meta.textContent = `${ending} · ${usage.completion_tokens} tokens · ` +
      `${cached} of ${usage.prompt_tokens} prompt tokens reused`;
    answer.text.setAttribute("aria-busy", "false");
  }

  count(usage) {
    this.billed += usage.prompt_tokens;
    this.computed += usage.computed_prompt_tokens;
    this.generated += usage.completion_tokens;
  }

  end() {
    for (const answer of this.answers) answer.text.setAttribute("aria-busy", "false");
    this.total = performance.now() - this.started;
  }
}

async function askAsOneGroup(request, run, signal) {
  const body = {
    context: request.context, questions: request.questions,
    max_tokens: request.maxTokens, temperature: request.temperature, stream: true,
  };
  const response = await post("/v1/grouped_completions", body, signal);
  for await (const chunk of streamedEvents(response)) {
    for (const entry of chunk.answers) {
      run.append(entry.index, entry.delta);
      if (entry.finish_reason) {
        run.showAnswer(entry.index, entry.answer);
        run.finish(entry.index, entry.finish_reason, entry.usage);
      }
    }
    if (chunk.usage) run.count(chunk.usage); // the last chunk: the whole request's usage
  }
}

function chatMessages(context, question) {
  const slots = { "{context}": context, "{question}": question };
  return serverFacts.chat_messages.map(({ role, content }) => ({
    role, content: content.replace(/\{context\}|\{question\}/g, (slot) => slots[slot]),
  }));
}

// As the grouped API extracts `answer`, with the pattern the server uses (its config).
function extractAnswer(text) {
  if (!serverFacts.answer_pattern) return null;
  const match = new RegExp(serverFacts.answer_pattern, "s").exec(text);
  return match ? match[1].trim() : null;
}

async function askOneByOne(request, run, signal) {
  for (const [index, question] of request.questions.entries()) {
    const body = {
      messages: chatMessages(request.context, question),
      max_tokens: request.maxTokens, temperature: request.temperature,
      stream: true, stream_options: { include_usage: true },
    };
    let finishReason = null;
    try {
      const response = await post("/v1/chat/completions", body, signal);
      for await (const chunk of streamedEvents(response)) {
        for (const choice of chunk.choices) {
          run.append(index, choice.delta.content);
          finishReason = choice.finish_reason || finishReason;
        }
        if (chunk.usage) {
          run.showAnswer(index, extractAnswer(run.answers[index].streamed));
          run.finish(index, finishReason, chunk.usage);
          run.count(chunk.usage);
        }
      }
    } catch (error) {
      error.questionIndex = index;
      throw error;
    }
  }
}

function readForm() {
  const rows = questionRows();
  const number = (text) => (text.trim() === "" ? null : Number(text)); // the server judges it
  return {
    rows,
    context: documentInput.value,
    questions: rows.map((row) => row.querySelector(".question-text").value),
    maxTokens: number(maxTokensInput.value),
    temperature: number(temperatureInput.value),
  };
}

async function ask() {
  if (inFlight) return;
  const request = readForm();
  const oneByOne = oneByOneSwitch.checked;
  const run = new Run(request.rows, oneByOne ? "one by one" : "grouped");
  showError(null);
  inFlight = new AbortController();
  setAsking(true);
  const count = `${request.questions.length} question${request.questions.length === 1 ? "" : "s"}`;
  statusLine.textContent = oneByOne ? `Asking ${count} one by one…` : `Asking ${count} as one group…`;
  try {
    await (oneByOne ? askOneByOne : askAsOneGroup)(request, run, inFlight.signal);
    run.end();
    addRunRow(run, request.questions.length);
    statusLine.textContent = `Answered ${count} in ${seconds(run.total)}; ` +
      `${savedShare(run)} of the prompt tokens billed were not computed.`;
  } catch (error) {
    run.end();
    if (error.name === "AbortError") {
      statusLine.textContent = "Stopped. The text that arrived is kept.";
    } else {
      statusLine.textContent = "";
      showError(error, request);
    }
  } finally {
    inFlight = null;
    setAsking(false);
  }
}

function setAsking(asking) {
  askButton.disabled = asking;
  stopButton.disabled = !asking;
  form.setAttribute("aria-busy", String(asking));
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  ask();
});

form.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    ask();
  }
});

stopButton.addEventListener("click", () => inFlight?.abort());

// --- figures -----------------------------------------------------------------------------

const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;
// one decimal: 1008 of 1011 tokens saved is 99.7%, not "100%"
const savedShare = (run) =>
  `${run.billed ? ((100 * (run.billed - run.computed)) / run.billed).toFixed(1) : "0.0"}%`;

function addRunRow(run, questions) {
  runsSoFar += 1;
  const figures = {
    run: runsSoFar, mode: run.mode, questions, billed: run.billed, computed: run.computed,
    saved: savedShare(run), generated: run.generated,
    "first-token": run.firstToken === null ? "no tokens" : seconds(run.firstToken),
    total: seconds(run.total),
  };
  const row = runsBody.insertRow();
  for (const [name, value] of Object.entries(figures)) {
    const cell = row.insertCell();
    cell.dataset.figure = name;
    cell.textContent = String(value);
  }
}

// --- errors, in words --------------------------------------------------------------------

function describe(error) {
  if (error instanceof ConnectionDropped) {
    return "The connection to the server dropped before the answers were complete. " +
      "The text that arrived is kept; ask again to retry.";
  }
  if (!(error instanceof ServerError)) return `The page failed: ${error.message}`;
  const said = error.message;
  switch (error.status) {
    case 400: return `The server refused the request: ${said}`;
    case 401: return `The server needs a valid API key (${said}). ` +
      "Enter it in the API key field and ask again.";
    case 413: return `The request is too large for this server: ${said}. ` +
      "Shorten the document or ask fewer questions.";
    case 429: return `The server is busy (${said}). ` +
      `Retry after ${error.retryAfter || "a few"} second${error.retryAfter === "1" ? "" : "s"}.`;
    case 503: return `The server is not taking requests now: ${said}.`;
    default: return `The server failed (HTTP ${error.status}): ${said}.`;
  }
}

// The input a refused field names, so the page can point at it.
function inputNamed(param, request) {
  if (param === "context") return documentInput;
  if (param === "max_tokens") return maxTokensInput;
  if (param === "temperature") return temperatureInput;
  const question = /^questions\[(\d+)\]/.exec(param || "");
  return question ? request.rows[Number(question[1])]?.querySelector(".question-text") : null;
}

function showError(error, request) {
  for (const marked of form.querySelectorAll("[aria-invalid]")) {
    marked.removeAttribute("aria-invalid");
  }
  errorBox.textContent = "";
  if (!error) return;
  let words = describe(error);
  if (error.questionIndex !== undefined) words = `Question ${error.questionIndex + 1}: ${words}`;
  let culprit = error.status === 400 ? inputNamed(error.param, request) : null;
  if (error.status === 401) {
    apiKeyField.hidden = false;
    culprit = apiKeyInput;
  }
  const paragraph = document.createElement("p");
  paragraph.textContent = words;
  errorBox.append(paragraph);
  if (culprit) {
    const label = document.querySelector(`label[for="${culprit.id}"]`);
    const pointer = document.createElement("p");
    pointer.textContent = `Field: ${label.textContent}.`;
    errorBox.append(pointer);
    culprit.setAttribute("aria-invalid", "true");
    culprit.focus();
  }
}

// --- start -------------------------------------------------------------------------------

async function learnAboutTheServer() {
  try {
    const response = await fetch("/playground/config.json");
    if (!response.ok) throw new Error(response.statusText);
    serverFacts = await response.json();
    $("model-name").textContent = serverFacts.model;
    apiKeyField.hidden = !serverFacts.api_key_required;
  } catch {
    $("model-name").textContent = "unknown (the server did not answer)";
  }
}

addQuestion();
learnAboutTheServer();
