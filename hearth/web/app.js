// Hearth's web page: every capability through the server's own HTTP API, with no build step and no CDN.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const md = () => window.HearthMarkdown;
  const ORIGIN = window.location.origin;
  const store = {
    get(key, fallback) {
      try { const v = localStorage.getItem("hearth." + key); return v === null ? fallback : JSON.parse(v); }
      catch { return fallback; }
    },
    set(key, value) {
      try { localStorage.setItem("hearth." + key, JSON.stringify(value)); } catch { /* storage full or off */ }
    },
  };
  let apiKey = store.get("apiKey", "");
  let models = [];

  // -- talking to the API ---------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  async function errorMessage(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      const error = body.error;
      if (typeof error === "string") return error;
      if (error && error.message) return error.message;
      if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch { /* not JSON */ }
    return text.trim() || `${response.status} ${response.statusText}`;
  }

  async function api(path, { method = "GET", json, form, signal } = {}) {
    const headers = {};
    if (apiKey) headers.Authorization = "Bearer " + apiKey;
    let body;
    if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
    if (form !== undefined) body = form;
    let response;
    try {
      response = await fetch(path, { method: json || form ? "POST" : method, headers, body, signal });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError("Could not reach the server: " + err.message, 0);
    }
    if (!response.ok) {
      const message = await errorMessage(response);
      if (response.status === 401) askForKey(message);
      throw new ApiError(message, response.status);
    }
    return response;
  }

  function showError(id, err) {
    const box = $(id);
    if (!err) { box.hidden = true; box.textContent = ""; return; }
    if (err.name === "AbortError") return;
    box.textContent = err.status ? `${err.message} (HTTP ${err.status})` : err.message;
    box.hidden = false;
  }

  // -- API key --------------------------------------------------------------------------------------------------

  function askForKey(reason) {
    const dialog = $("key-dialog");
    $("key-why").textContent = reason ? `The server said: ${reason}. The key is kept in this browser only.` :
      "Send this key with every request. It is kept in this browser only.";
    $("key-input").value = apiKey;
    if (!dialog.open) dialog.showModal();
  }

  $("key-button").addEventListener("click", () => askForKey(""));
  $("key-dialog").addEventListener("close", () => {
    const choice = $("key-dialog").returnValue;
    if (choice === "save") { apiKey = $("key-input").value.trim(); store.set("apiKey", apiKey); refreshModels(); }
    if (choice === "clear") { apiKey = ""; store.set("apiKey", ""); }
  });

  // -- snippets -------------------------------------------------------------------------------------------------

  const shellQuote = (s) => "'" + String(s).replace(/'/g, "'\\''") + "'";
  const py = (value) => JSON.stringify(value, null, 4).replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False")
    .replace(/\bnull\b/g, "None");

  // The request just made, as curl and as Python: with the openai client, or with httpx (`plain`) for routes that
  // are not part of the OpenAI API.
  function showSnippet(tab, { path, json, form, python, plain = false }) {
    const auth = apiKey ? ' \\\n  -H "Authorization: Bearer $HEARTH_API_KEY"' : "";
    let curl = `curl ${ORIGIN}${path}${auth}`;
    if (json !== undefined) curl += ` \\\n  -H "Content-Type: application/json" \\\n  -d ${shellQuote(JSON.stringify(json))}`;
    for (const [name, value] of form || []) curl += ` \\\n  -F ${shellQuote(`${name}=${value}`)}`;
    const key = apiKey ? 'os.environ["HEARTH_API_KEY"]' : '"not-needed"';
    const client = plain ? `import os\nimport httpx\n\nheaders = ${apiKey ? '{"Authorization": "Bearer " + os.environ["HEARTH_API_KEY"]}' : "{}"}\n` :
      `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${ORIGIN}/v1", api_key=${key})\n`;
    const box = document.querySelector(`.snippet[data-for="${tab}"]`);
    box.innerHTML = "<details open><summary>The same request in code</summary><h3>curl</h3><pre><code></code></pre>" +
      `<h3>Python (${plain ? "httpx" : "openai"})</h3><pre><code></code></pre></details>`;
    const codes = box.querySelectorAll("code");
    codes[0].textContent = curl;
    codes[1].textContent = client + "\n" + python;
  }

  // -- models ---------------------------------------------------------------------------------------------------

  const PICKERS = {
    "chat-model": ["chat"], "stt-model": ["transcript"], "tts-model": ["tts"], "img-model": ["image"],
    "emb-model": ["embeddings", "rerank"], "voice-model": ["realtime"],
  };

  function fillPickers() {
    for (const [id, uses] of Object.entries(PICKERS)) {
      const select = $(id);
      const chosen = select.value || store.get("pick." + id, "");
      const fitting = models.filter((m) => m.usecases.some((u) => uses.includes(u)));
      select.replaceChildren(...fitting.map((m) => new Option(m.aliases.length ? `${m.name} (${m.aliases.join(", ")})` : m.name, m.name)));
      if (!fitting.length) select.append(new Option("(no model installed for this)", ""));
      if (fitting.some((m) => m.name === chosen)) select.value = chosen;
    }
    chatModelChanged();
    fillVoices();
    fillSizes();
  }

  for (const id of Object.keys(PICKERS)) $(id).addEventListener("change", () => store.set("pick." + id, $(id).value));

  let refreshFailed = false;  // the list could not be read: that error clears once it can (an action's error stays)

  async function refreshModels() {
    try {
      const response = await api("/runners/models");
      models = (await response.json()).models;
      if (refreshFailed) showError("models-error", null);
      refreshFailed = false;
      fillPickers();
      renderModelTable();
    } catch (err) {
      refreshFailed = true;
      showError("models-error", err);
    }
  }

  const modelNamed = (name) => models.find((m) => m.name === name);

  function renderModelTable() {
    const rows = models.map((m) => {
      const tr = document.createElement("tr");
      tr.dataset.model = m.name;
      const name = document.createElement("td");
      name.textContent = m.name;
      if (m.aliases.length) name.append(Object.assign(document.createElement("div"), { className: "muted", textContent: "also " + m.aliases.join(", ") }));
      const backend = Object.assign(document.createElement("td"), { textContent: m.backend });
      const uses = Object.assign(document.createElement("td"), { textContent: (m.capabilities.length ? m.capabilities : m.usecases).join(", ") });
      const state = document.createElement("td");
      const label = Object.assign(document.createElement("span"), { className: `state state-${m.state.replace(" ", "-")}`, textContent: m.state });
      label.dataset.state = m.state;
      state.append(label);
      if (m.reason) state.append(Object.assign(document.createElement("div"), { className: "reason", textContent: m.reason }));
      for (const r of m.replicas || []) {  // on a Ray cluster: each copy, its node and state
        const line = Object.assign(document.createElement("div"), { className: "replica",
          textContent: `replica ${r.replica} on ${r.node || "this machine"}: ${r.state}` });
        line.dataset.replica = r.replica;
        state.append(line);
      }
      const actions = document.createElement("td");
      const loaded = ["idle", "busy", "loading"].includes(m.state);
      const button = Object.assign(document.createElement("button"), {
        type: "button", className: loaded ? "quiet" : "", textContent: loaded ? "Unload" : "Load",
      });
      button.setAttribute("aria-label", `${loaded ? "Unload" : "Load"} ${m.name}`);
      button.disabled = m.state === "loading" || m.state === "stopping";
      button.addEventListener("click", () => loadOrUnload(m.name, !loaded));
      actions.append(button);
      tr.append(name, backend, uses, state, actions);
      return tr;
    });
    $("models-table").tBodies[0].replaceChildren(...rows);
  }

  async function loadOrUnload(name, load) {
    const path = load ? "/runners/load" : "/runners/unload";
    showSnippet("models", { path, json: { model: name }, plain: true,
      python: `print(httpx.post("${ORIGIN}${path}", json={"model": ${JSON.stringify(name)}}, headers=headers, timeout=600).json())\n` });
    const model = modelNamed(name);
    if (model && load) { model.state = "loading"; renderModelTable(); }
    showError("models-error", null);
    try {
      await api(path, { json: { model: name } });
    } catch (err) {
      showError("models-error", err);
    }
    await refreshModels();
  }

  // -- gallery --------------------------------------------------------------------------------------------------

  let gallery = [];
  let galleryErrors = [];
  const jobs = {};  // entry name -> {uuid, progress, error, notes}
  const SHOWN = 200;  // entries drawn at once; the search narrows a large gallery (LocalAI's has 1,700)

  async function refreshGallery() {
    try {
      gallery = await (await api("/models/available")).json();
      galleryErrors = (await (await api("/models/galleries")).json()).filter((g) => g.error);
      renderGallery();
    } catch (err) {
      showError("models-error", err);
    }
  }

  function renderGallery() {
    const words = $("gallery-search").value.trim().toLowerCase();
    const onlyInstallable = $("gallery-installable").checked;
    const matching = gallery.filter((e) => (!onlyInstallable || e.available !== false) &&
      (!words || [e.name, e.description || "", e.backend || "", ...(e.tags || [])].join(" ").toLowerCase().includes(words)));
    const shown = matching.slice(0, SHOWN);
    const cannot = gallery.filter((e) => e.available === false).length;
    const summary = [`${gallery.length} entries` + (cannot ? `, ${cannot} cannot be installed here` : ""),
      ...(matching.length > SHOWN ? [`showing ${SHOWN} of ${matching.length} matches: narrow the search`] : []),
      ...galleryErrors.map((g) => `gallery ${g.name} (${g.url}) cannot be read: ${g.error}`)];
    $("gallery-summary").textContent = summary.join(" · ");
    $("gallery-list").replaceChildren(...shown.map((entry) => {
      const li = document.createElement("li");
      li.dataset.entry = entry.name;
      const about = document.createElement("div");
      about.className = "about";
      about.append(Object.assign(document.createElement("strong"), { textContent: entry.name }));
      if (entry.backend) about.append(Object.assign(document.createElement("span"), { className: "muted", textContent: ` ${entry.backend}` }));
      if (entry.description) about.append(Object.assign(document.createElement("div"), { className: "muted", textContent: entry.description.split("\n")[0] }));
      if (entry.available === false) about.append(Object.assign(document.createElement("div"), { className: "reason", textContent: "Cannot be installed here: " + entry.reason }));
      li.append(about);
      const job = jobs[entry.name];
      if (job && !job.done) {
        const bar = Object.assign(document.createElement("progress"), { max: 100, value: job.progress || 0 });
        bar.setAttribute("aria-label", `Installing ${entry.name}`);
        li.append(bar, Object.assign(document.createElement("span"), { className: "muted", textContent: `${Math.floor(job.progress || 0)}%` }));
      } else if (entry.installed) {
        li.append(Object.assign(document.createElement("span"), { className: "muted", textContent: "installed" }));
      } else if (entry.available !== false) {
        const button = Object.assign(document.createElement("button"), { type: "button", textContent: "Install" });
        button.setAttribute("aria-label", `Install ${entry.name}`);
        button.addEventListener("click", () => install(entry.name, entry.id || entry.name));
        li.append(button);
      }
      if (job && job.error) li.append(Object.assign(document.createElement("div"), { className: "error", textContent: job.error, role: "alert" }));
      if (job && job.done && !job.error && job.notes && job.notes.length) li.append(Object.assign(document.createElement("div"), { className: "muted", textContent: job.notes.join("; ") }));
      return li;
    }));
  }

  async function install(name, id) {
    showSnippet("models", { path: "/models/apply", json: { id }, plain: true,
      python: `job = httpx.post("${ORIGIN}/models/apply", json={"id": ${JSON.stringify(id)}}, headers=headers).json()\nprint(httpx.get("${ORIGIN}/models/jobs/" + job["uuid"], headers=headers).json())\n` });
    jobs[name] = { progress: 0 };
    renderGallery();
    try {
      const { uuid } = await (await api("/models/apply", { json: { id } })).json();
      jobs[name].uuid = uuid;
      for (;;) {
        const job = await (await api("/models/jobs/" + uuid)).json();
        jobs[name].progress = job.progress || 0;
        if (job.processed) {
          jobs[name].done = true;
          jobs[name].error = job.error || null;
          jobs[name].notes = job.notes || [];
          break;
        }
        renderGallery();
        await new Promise((resolve) => setTimeout(resolve, 400));
      }
    } catch (err) {
      jobs[name].done = true;
      jobs[name].error = err.message;
    }
    await Promise.all([refreshGallery(), refreshModels()]);
  }

  $("gallery-search").addEventListener("input", renderGallery);
  $("gallery-installable").addEventListener("change", renderGallery);

  // -- chat -----------------------------------------------------------------------------------------------------

  let conversation = store.get("chat", []);
  let attached = [];  // data: URLs
  let controller = null;

  // Max tokens follows the chosen model's context (what one request may use): at most half of it, so the
  // conversation keeps room; the value the user typed is kept for models with room for it.
  let wantedMaxTokens = Number($("chat-max-tokens").value);
  $("chat-max-tokens").addEventListener("input", () => { wantedMaxTokens = Number($("chat-max-tokens").value) || wantedMaxTokens; });

  function chatModelChanged() {
    const model = modelNamed($("chat-model").value);
    const sees = !!model && (model.usecases.includes("vision") || model.capabilities.includes("vision"));
    $("chat-attach").disabled = !sees;
    $("chat-attach-label").title = sees ? "" : "This model does not take images";
    const box = $("chat-max-tokens");
    const context = model && model.context_size;
    if (context) {
      box.max = context;
      box.value = Math.max(1, Math.min(wantedMaxTokens, Math.floor(context / 2)));
    } else {
      box.removeAttribute("max");
      box.value = wantedMaxTokens;
    }
  }
  $("chat-model").addEventListener("change", chatModelChanged);

  function messageElement(message) {
    const div = document.createElement("div");
    div.className = "msg " + message.role;
    div.append(Object.assign(document.createElement("div"), { className: "who", textContent: message.role === "user" ? "You" : message.model || "Assistant" }));
    for (const url of message.images || []) div.append(Object.assign(document.createElement("img"), { src: url, alt: "attached image" }));
    // A thinking model's thoughts (reasoning_content), folded away above its answer.
    const thoughts = Object.assign(document.createElement("details"), { className: "thoughts" });
    thoughts.append(Object.assign(document.createElement("summary"), { textContent: "Thoughts" }),
      Object.assign(document.createElement("div"), { className: "thinking", textContent: message.thinking || "" }));
    thoughts.hidden = !message.thinking;
    div.append(thoughts);
    const body = document.createElement("div");
    body.className = "md";
    if (message.role === "user") body.textContent = message.content; else body.innerHTML = md().render(message.content || "");
    div.append(body);
    const meta = Object.assign(document.createElement("div"), { className: "meta", textContent: message.meta || "" });
    div.append(meta);
    return div;
  }

  function renderConversation() {
    $("chat-log").replaceChildren(...conversation.map(messageElement));
  }

  function apiMessages() {
    const out = [];
    const system = $("chat-system").value.trim();
    if (system) out.push({ role: "system", content: system });
    for (const m of conversation) {
      if (m.role === "user" && m.images && m.images.length) {
        out.push({ role: "user", content: [...m.images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text: m.content }] });
      } else {
        out.push({ role: m.role, content: m.content });
      }
    }
    return out;
  }

  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
      }
    }
  }

  async function sendChat(event) {
    event.preventDefault();
    const text = $("chat-input").value.trim();
    const model = $("chat-model").value;
    if (!text || controller) return;
    showError("chat-error", null);
    conversation.push({ role: "user", content: text, images: attached });
    $("chat-input").value = "";
    attached = [];
    $("chat-attached").textContent = "";
    $("chat-attach").value = "";
    const temperature = Number($("chat-temperature").value);
    const maxTokens = Number($("chat-max-tokens").value);
    const request = { model, messages: apiMessages(), temperature, max_tokens: maxTokens, stream: true, stream_options: { include_usage: true } };
    const shown = { ...request, messages: request.messages.map((m) => Array.isArray(m.content) ? { ...m, content: m.content.map((p) => p.type === "image_url" ? { type: "image_url", image_url: { url: "data:image/png;base64,..." } } : p) } : m) };
    showSnippet("chat", { path: "/v1/chat/completions", json: shown,
      python: `stream = client.chat.completions.create(\n    model=${JSON.stringify(model)},\n    messages=${py(shown.messages).replace(/\n/g, "\n    ")},\n    temperature=${temperature},\n    max_tokens=${maxTokens},\n    stream=True,\n)\nfor chunk in stream:\n    if chunk.choices:\n        print(chunk.choices[0].delta.content or "", end="", flush=True)\n` });
    const reply = { role: "assistant", content: "", model, meta: "…" };
    conversation.push(reply);
    renderConversation();
    const element = $("chat-log").lastElementChild;
    const body = element.querySelector(".md");
    const meta = element.querySelector(".meta");
    const thoughts = element.querySelector(".thoughts");
    controller = new AbortController();
    $("chat-stop").disabled = false;
    $("chat-send").disabled = true;
    let first = 0, pieces = 0, usage = null, finish = "", pending = false;
    const paint = () => {
      pending = false;
      body.innerHTML = md().render(reply.content);
      thoughts.hidden = !reply.thinking;
      thoughts.querySelector(".thinking").textContent = reply.thinking || "";
    };
    try {
      const response = await api("/v1/chat/completions", { json: request, signal: controller.signal });
      await readEvents(response, (chunk) => {
        if (chunk.error) throw new ApiError(chunk.error.message || String(chunk.error), chunk.error.code || 0);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        if (choice.finish_reason) finish = choice.finish_reason;
        const piece = choice.delta && choice.delta.content;
        const thought = choice.delta && choice.delta.reasoning_content;
        if (piece || thought) {
          if (!first) first = performance.now();
          pieces += 1;
          if (piece) reply.content += piece;
          if (thought) reply.thinking = (reply.thinking || "") + thought;
          if (!pending) { pending = true; requestAnimationFrame(paint); }
        }
      });
    } catch (err) {
      if (err.name === "AbortError") finish = "stopped";
      else {
        showError("chat-error", err);
        if (!reply.content) {  // nothing came back: take the message back into the box, to fix and send again
          const asked = conversation.splice(conversation.length - 2, 2)[0];
          $("chat-input").value = asked.content;
          attached = asked.images || [];
          $("chat-attached").textContent = attached.length ? `${attached.length} image(s) attached` : "";
        }
      }
    } finally {
      controller = null;
      $("chat-stop").disabled = true;
      $("chat-send").disabled = false;
    }
    paint();
    const tokens = usage ? usage.completion_tokens : pieces;
    const seconds = first ? (performance.now() - first) / 1000 : 0;
    reply.meta = `${tokens} tokens` + (seconds > 0 && tokens > 1 ? ` · ${((tokens - 1) / seconds).toFixed(1)} tokens/s` : "") + (finish && finish !== "stop" ? ` · ${finish}` : "");
    meta.textContent = reply.meta;
    store.set("chat", conversation);
    if (!conversation.includes(reply)) renderConversation();
  }

  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("chat-new").addEventListener("click", () => { conversation = []; store.set("chat", conversation); renderConversation(); showError("chat-error", null); });
  $("chat-system").value = store.get("system", "");
  $("chat-system").addEventListener("change", () => store.set("system", $("chat-system").value));
  $("chat-attach").addEventListener("change", async () => {
    const files = [...$("chat-attach").files];
    attached = await Promise.all(files.map((file) => new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    })));
    $("chat-attached").textContent = files.map((f) => f.name).join(", ");
  });

  // -- speech ---------------------------------------------------------------------------------------------------

  let recorded = null;  // a Blob from the microphone
  let recorder = null;

  $("stt-file").addEventListener("change", () => {
    recorded = null;
    const file = $("stt-file").files[0];
    $("stt-source").textContent = file ? `File: ${file.name}` : "";
  });

  $("stt-record").addEventListener("click", async () => {
    if (recorder) { recorder.stop(); return; }
    showError("stt-error", null);
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      showError("stt-error", new Error("This browser cannot record here (recording needs https or localhost)."));
      return;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      const parts = [];
      recorder = new MediaRecorder(stream);
      recorder.ondataavailable = (e) => parts.push(e.data);
      recorder.onstop = () => {
        stream.getTracks().forEach((t) => t.stop());
        recorded = new Blob(parts, { type: recorder.mimeType || "audio/webm" });
        recorder = null;
        $("stt-record").textContent = "Record";
        $("stt-source").textContent = `Recording: ${(recorded.size / 1024).toFixed(0)} KB`;
      };
      recorder.start();
      $("stt-record").textContent = "Stop recording";
      $("stt-source").textContent = "Recording…";
    } catch (err) {
      showError("stt-error", new Error("The microphone is not available: " + err.message));
    }
  });

  $("stt-go").addEventListener("click", async () => {
    showError("stt-error", null);
    const model = $("stt-model").value;
    const file = recorded || $("stt-file").files[0];
    if (!file) { showError("stt-error", new Error("Choose an audio file or record one first.")); return; }
    const name = recorded ? "recording.webm" : file.name;
    const form = new FormData();
    form.append("model", model);
    form.append("file", file, name);
    form.append("response_format", "json");
    showSnippet("speech", { path: "/v1/audio/transcriptions", form: [["model", model], ["file", "@" + name]],
      python: `with open(${JSON.stringify(name)}, "rb") as audio:\n    print(client.audio.transcriptions.create(model=${JSON.stringify(model)}, file=audio).text)\n` });
    $("stt-go").disabled = true;
    $("stt-result").textContent = "Transcribing…";
    try {
      const { text } = await (await api("/v1/audio/transcriptions", { form })).json();
      $("stt-result").textContent = text;
    } catch (err) {
      $("stt-result").textContent = "";
      showError("stt-error", err);
    } finally {
      $("stt-go").disabled = false;
    }
  });

  function fillVoices() {
    const model = modelNamed($("tts-model").value);
    $("tts-voices").replaceChildren(...((model && model.voices) || []).map((v) => new Option(v, v)));
  }
  $("tts-model").addEventListener("change", fillVoices);

  $("tts-go").addEventListener("click", async () => {
    showError("tts-error", null);
    const request = { model: $("tts-model").value, input: $("tts-text").value, voice: $("tts-voice").value || "alloy", response_format: $("tts-format").value };
    showSnippet("speech", { path: "/v1/audio/speech", json: request,
      python: `speech = client.audio.speech.create(\n    model=${JSON.stringify(request.model)},\n    voice=${JSON.stringify(request.voice)},\n    input=${JSON.stringify(request.input)},\n    response_format=${JSON.stringify(request.response_format)},\n)\nspeech.write_to_file("speech.${request.response_format}")\n` });
    $("tts-go").disabled = true;
    try {
      const blob = await (await api("/v1/audio/speech", { json: request })).blob();
      const url = URL.createObjectURL(blob);
      const audio = Object.assign(document.createElement("audio"), { controls: true, src: url });
      audio.setAttribute("aria-label", "Synthesised speech");
      const link = Object.assign(document.createElement("a"), { href: url, download: `speech.${request.response_format}`, textContent: "Download" });
      $("tts-result").replaceChildren(audio, document.createElement("br"), link);
    } catch (err) {
      showError("tts-error", err);
    } finally {
      $("tts-go").disabled = false;
    }
  });

  // -- images ---------------------------------------------------------------------------------------------------

  function fillSizes() {
    const model = modelNamed($("img-model").value);
    const sizes = (model && model.image_sizes && model.image_sizes.length) ? model.image_sizes : ["256x256", "512x512", "768x768", "1024x1024"];
    $("img-sizes").replaceChildren(...sizes.map((v) => new Option(v, v)));
  }
  $("img-model").addEventListener("change", fillSizes);

  $("img-go").addEventListener("click", async () => {
    showError("img-error", null);
    const request = { model: $("img-model").value, prompt: $("img-prompt").value, size: $("img-size").value,
      n: Number($("img-n").value) || 1, steps: Number($("img-steps").value) || undefined, response_format: "b64_json" };
    if ($("img-seed").value !== "") request.seed = Number($("img-seed").value);
    const extra = { steps: request.steps, ...(request.seed !== undefined ? { seed: request.seed } : {}) };
    showSnippet("images", { path: "/v1/images/generations", json: request,
      python: `import base64\n\nresult = client.images.generate(\n    model=${JSON.stringify(request.model)},\n    prompt=${JSON.stringify(request.prompt)},\n    size=${JSON.stringify(request.size)},\n    n=${request.n},\n    response_format="b64_json",\n    extra_body=${py(extra)},\n)\nfor i, image in enumerate(result.data):\n    open(f"image-{i}.png", "wb").write(base64.b64decode(image.b64_json))\n` });
    $("img-go").disabled = true;
    $("img-status").textContent = "Generating…";
    const started = performance.now();
    try {
      const { data } = await (await api("/v1/images/generations", { json: request })).json();
      $("img-grid").replaceChildren(...data.map((item, i) => {
        const src = "data:image/png;base64," + item.b64_json;
        const figure = document.createElement("figure");
        figure.append(Object.assign(document.createElement("img"), { src, alt: `Generated image ${i + 1}: ${request.prompt}` }),
          Object.assign(document.createElement("a"), { href: src, download: `hearth-${i + 1}.png`, textContent: "Download" }));
        return figure;
      }));
      $("img-status").textContent = `${data.length} image(s) in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    } catch (err) {
      $("img-status").textContent = "";
      showError("img-error", err);
    } finally {
      $("img-go").disabled = false;
    }
  });

  // -- embeddings and reranking ---------------------------------------------------------------------------------

  $("emb-rank").addEventListener("click", async () => {
    showError("emb-error", null);
    const documents = $("emb-docs").value.split("\n").map((d) => d.trim()).filter(Boolean);
    const request = { model: $("emb-model").value, query: $("emb-query").value, documents };
    showSnippet("embeddings", { path: "/v1/rerank", json: request,
      plain: true,
      python: `result = httpx.post("${ORIGIN}/v1/rerank", headers=headers, json=${py(request).replace(/\n/g, "\n    ")}).json()\nfor item in result["results"]:\n    print(round(item["relevance_score"], 3), item["document"]["text"])\n` });
    try {
      const { results } = await (await api("/v1/rerank", { json: request })).json();
      $("emb-result").replaceChildren(...results.map((r) => {
        const li = document.createElement("li");
        li.append(document.createTextNode(documents[r.index]),
          Object.assign(document.createElement("span"), { className: "score", textContent: r.relevance_score.toFixed(3) }));
        return li;
      }));
    } catch (err) {
      showError("emb-error", err);
    }
  });

  $("emb-embed").addEventListener("click", async () => {
    showError("emb-error", null);
    const request = { model: $("emb-model").value, input: $("emb-query").value };
    showSnippet("embeddings", { path: "/v1/embeddings", json: request,
      python: `vector = client.embeddings.create(model=${JSON.stringify(request.model)}, input=${JSON.stringify(request.input)}).data[0].embedding\nprint(len(vector), vector[:5])\n` });
    try {
      const { data, usage } = await (await api("/v1/embeddings", { json: request })).json();
      const vector = data[0].embedding;
      $("emb-vector").textContent = `${vector.length} dimensions, ${usage.prompt_tokens} tokens: [${vector.slice(0, 5).map((v) => v.toFixed(4)).join(", ")}, …]`;
    } catch (err) {
      showError("emb-error", err);
    }
  });

  // -- voice: the Realtime API over a WebSocket ------------------------------------------------------------------
  // The microphone is read at 24 kHz by an AudioWorklet, sent as pcm16 100 ms at a time; the answer's audio deltas
  // are queued to play one after the other, and dropped at once when the user speaks over them.

  const VOICE_RATE = 24000;
  let voice = null;  // { socket, context, stream, playing: [], playAt, lines: Map }

  function voiceStatus(text) { $("voice-status").textContent = text; }

  function voiceLine(itemId, role) {
    let line = voice.lines.get(itemId);
    if (!line) {
      line = document.createElement("div");
      line.className = "msg " + role;
      line.dataset.role = role;
      const who = document.createElement("div");
      who.className = "who";
      who.textContent = role === "user" ? "You" : "Assistant";
      const text = document.createElement("div");
      text.className = "text";
      line.append(who, text);
      $("voice-log").append(line);
      voice.lines.set(itemId, line);
    }
    return line.querySelector(".text");
  }

  function base64Pcm(samples) {
    const pcm = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) pcm[i] = Math.max(-1, Math.min(1, samples[i])) * 0x7fff;
    let binary = "";
    const bytes = new Uint8Array(pcm.buffer);
    for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(binary);
  }

  function playDelta(delta) {
    const bytes = Uint8Array.from(atob(delta), (c) => c.charCodeAt(0));
    const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
    if (!pcm.length) return;
    const buffer = voice.context.createBuffer(1, pcm.length, VOICE_RATE);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 0x8000;
    const source = voice.context.createBufferSource();
    source.buffer = buffer;
    source.connect(voice.context.destination);
    voice.playAt = Math.max(voice.playAt, voice.context.currentTime);
    source.start(voice.playAt);
    voice.playAt += buffer.duration;
    voice.playing.push(source);
    source.onended = () => { voice && (voice.playing = voice.playing.filter((s) => s !== source)); };
    $("voice-log").dataset.audioSeconds = String(Number($("voice-log").dataset.audioSeconds || 0) + buffer.duration);
  }

  function silenceAnswer() {
    for (const source of voice.playing) source.stop();
    voice.playing = [];
    voice.playAt = 0;
  }

  function voiceEvent(event) {
    if (!voice) return;  // stopped: what was still on its way is dropped
    switch (event.type) {
      case "session.created": voiceStatus("Listening… speak now."); break;
      case "input_audio_buffer.speech_started":
        silenceAnswer();
        voiceLine(event.item_id, "user").textContent = "…";
        voiceStatus("Hearing you…");
        break;
      case "input_audio_buffer.speech_stopped": voiceStatus("Thinking…"); break;
      case "conversation.item.input_audio_transcription.completed":
        voiceLine(event.item_id, "user").textContent = event.transcript || "(nothing heard)";
        break;
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta":
        voiceLine(event.item_id, "assistant").textContent += event.delta;
        voiceStatus("Answering… speak to interrupt.");
        break;
      case "response.output_audio.delta": playDelta(event.delta); break;
      case "response.done":
        if (event.response.status === "failed") showError("voice-error", new Error(event.response.status_details.error.message));
        voiceStatus("Listening…");
        break;
      case "error": showError("voice-error", new Error(event.error.message)); break;
    }
  }

  async function startVoice() {
    showError("voice-error", null);
    const model = $("voice-model").value;
    if (!model) return showError("voice-error", new Error("No realtime model is installed (hearth run installs gpt-realtime)."));
    if (!navigator.mediaDevices || !window.AudioWorkletNode) {
      return showError("voice-error", new Error("This browser cannot use the microphone here (it needs https or localhost)."));
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
    } catch (err) {
      return showError("voice-error", new Error("The microphone is not available: " + err.message));
    }
    const context = new AudioContext({ sampleRate: VOICE_RATE });
    await context.audioWorklet.addModule("/web/mic-worklet.js");
    const tap = new AudioWorkletNode(context, "microphone-tap");
    context.createMediaStreamSource(stream).connect(tap);
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const protocols = ["realtime", ...(apiKey ? ["openai-insecure-api-key." + apiKey] : [])];
    const socket = new WebSocket(`${scheme}${location.host}/v1/realtime?model=${encodeURIComponent(model)}`, protocols);
    voice = { socket, context, stream, playing: [], playAt: 0, lines: new Map() };
    $("voice-log").replaceChildren();
    $("voice-log").dataset.audioSeconds = "0";
    let pending = [], count = 0;
    tap.port.onmessage = (e) => {
      if (socket.readyState !== WebSocket.OPEN) return;
      pending.push(e.data);
      count += e.data.length;
      if (count < VOICE_RATE / 10) return;
      const samples = new Float32Array(count);
      let at = 0;
      for (const part of pending) { samples.set(part, at); at += part.length; }
      pending = []; count = 0;
      socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64Pcm(samples) }));
    };
    socket.onopen = () => {
      const instructions = $("voice-instructions").value.trim();
      if (instructions) socket.send(JSON.stringify({ type: "session.update", session: { type: "realtime", instructions } }));
    };
    socket.onmessage = (e) => voiceEvent(JSON.parse(e.data));
    socket.onclose = (e) => {
      if (voice && voice.socket === socket) {
        if (e.code !== 1000 && e.code !== 1005) showError("voice-error", new Error(`The connection closed (${e.code}${e.reason ? ": " + e.reason : ""}).`));
        stopVoice();
      }
    };
    voiceStatus("Connecting…");
    $("voice-start").disabled = true;
    $("voice-stop").disabled = false;
  }

  function stopVoice() {
    if (!voice) return;
    const { socket, context, stream } = voice;
    voice = null;
    stream.getTracks().forEach((t) => t.stop());
    context.close();
    if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
    voiceStatus("Stopped.");
    $("voice-start").disabled = false;
    $("voice-stop").disabled = true;
  }

  $("voice-start").addEventListener("click", startVoice);
  $("voice-stop").addEventListener("click", stopVoice);

  // -- tabs -----------------------------------------------------------------------------------------------------

  const tabs = [...document.querySelectorAll("[role=tab]")];
  let poll = null;

  function select(tab, focus) {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    const panel = tab.getAttribute("aria-controls");
    if (window.location.hash !== "#" + panel) history.replaceState(null, "", "#" + panel);
    clearInterval(poll);
    if (panel === "models") {
      refreshModels();
      refreshGallery();
      poll = setInterval(refreshModels, 2000);
    }
  }

  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 };
      if (e.key in moves) {
        e.preventDefault();
        select(tabs[(moves[e.key] + tabs.length) % tabs.length], true);
      }
    });
  });

  renderConversation();
  refreshModels();
  const start = tabs.find((t) => "#" + t.getAttribute("aria-controls") === window.location.hash) || tabs[0];
  select(start, false);
})();
