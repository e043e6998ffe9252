// ComfyUI-LiteVSR front end (no build step, no framework, nothing fetched from outside the ComfyUI server).
//
//  1. Before/after view: on any node whose execution message carries `litevsr_compare` (Compare Before/After,
//     Upscale Video File), a DOM widget with a split view:
//       div.litevsr-compare > div.litevsr-compare-stage > img.litevsr-before, img.litevsr-after (clipped at the
//       split), span.litevsr-label-before "LR (bicubic)", span.litevsr-label-after "LiteVSR";
//       div.litevsr-compare-controls > input[type=range].litevsr-slider (0..100), span.litevsr-compare-info
//  2. Progress: `litevsr.progress` websocket messages ({node, stage, done, total, eta_s, plan, ...}) become a
//     status line (div.litevsr-status > div.litevsr-progress) on that node.
//  3. Warnings: pack nodes are checked against the rules in litevsr_rules.js as their widgets change; problems
//     show as div.litevsr-status > div.litevsr-warning lines and a red outline, and queueing is refused while any
//     active node has one.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { RULES, RULE_NODES, formatProgress, validate } from "./litevsr_rules.js";

const PACK_CATEGORY = "LiteVSR";
const COMPARE_KEY = "litevsr_compare";
const PROGRESS_EVENT = "litevsr.progress";
const WARNINGS = Symbol("litevsrWarnings");
const STATUS = Symbol("litevsrStatus");
const COMPARE = Symbol("litevsrCompare");
const MODE_NEVER = 2, MODE_BYPASS = 4;

const STYLE = `
.litevsr-compare { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%;
  box-sizing: border-box; font: 12px sans-serif; color: var(--input-text, #ddd); }
.litevsr-compare-stage { position: relative; flex: 1 1 auto; min-height: 60px; overflow: hidden;
  background: #111; border-radius: 4px; cursor: ew-resize; touch-action: none; user-select: none; }
.litevsr-compare-stage img { position: absolute; display: block; max-width: none; pointer-events: none;
  image-rendering: auto; }
.litevsr-compare-divider { position: absolute; top: 0; bottom: 0; width: 2px; margin-left: -1px;
  background: rgba(255,255,255,0.85); box-shadow: 0 0 3px rgba(0,0,0,0.8); pointer-events: none; }
.litevsr-compare-label { position: absolute; top: 4px; padding: 1px 5px; border-radius: 3px;
  background: rgba(0,0,0,0.6); color: #fff; pointer-events: none; white-space: nowrap; }
.litevsr-compare-controls { display: flex; align-items: center; gap: 8px; flex: 0 0 auto; }
.litevsr-slider { flex: 1 1 auto; min-width: 40px; margin: 0; }
.litevsr-compare-info { flex: 0 0 auto; opacity: 0.75; white-space: nowrap; }
.litevsr-status { width: 100%; height: 100%; box-sizing: border-box; overflow: hidden;
  font: 11px/15px sans-serif; color: var(--input-text, #ddd); overflow-wrap: anywhere; }
.litevsr-warning { color: #ff6b6b; font-weight: 600; }
.litevsr-warning > div::before { content: "\\26A0\\00A0"; }
.litevsr-progress { opacity: 0.9; }
`;

function injectStyle() {
  if (document.getElementById("litevsr-style")) return;
  const style = document.createElement("style");
  style.id = "litevsr-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function isPackNode(node) {
  const type = node?.comfyClass ?? node?.type;
  return RULE_NODES.has(type) || String(node?.constructor?.nodeData?.category ?? "").split("/")[0] === PACK_CATEGORY;
}

function redraw(node) {
  node?.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

/** Grows the node to at least its computed size (never shrinks what the user sized). */
function fitNode(node, minWidth = 0, extraHeight = 0) {
  const size = node.computeSize?.() ?? node.size;
  const width = Math.max(node.size[0], size[0], minWidth);
  const height = Math.max(node.size[1], size[1] + extraHeight);
  if (width !== node.size[0] || height !== node.size[1]) node.setSize([width, height]);
  redraw(node);
}

function addWidget(node, name, element, options) {
  const widget = node.addDOMWidget(name, name, element, { serialize: false, hideOnZoom: false, ...options });
  widget.serialize = false; // never in widgets_values or the API prompt
  return widget;
}

// --- status line: warnings and progress --------------------------------------------------------------------

const STATUS_FONT = "11px sans-serif", WARNING_FONT = "600 11px sans-serif", LINE_HEIGHT = 15, STATUS_MARGIN = 6;
let measure = null;

/** How many lines `text` takes when wrapped at word boundaries to `width` px in `font`. */
function wrappedLines(text, width, font) {
  measure ??= document.createElement("canvas").getContext("2d");
  measure.font = font;
  let lines = 1, line = "";
  for (const word of text.split(/\s+/)) {
    const next = line ? `${line} ${word}` : word;
    if (line && measure.measureText(next).width > width) {
      lines += 1 + Math.floor(measure.measureText(word).width / Math.max(width, 1));
      line = word;
    } else {
      line = next;
    }
  }
  return lines;
}

function element(tag, className) {
  const made = document.createElement(tag);
  made.className = className;
  return made;
}

function status(node) {
  if (node[STATUS]) return node[STATUS];
  const root = element("div", "litevsr-status");
  const warning = element("div", "litevsr-warning");
  const progress = element("div", "litevsr-progress");
  root.append(warning, progress);
  // Lines wrap at the widget's width (the node's, less the widget margins): count them as the browser will.
  const width = () => node.size[0] - 2 * STATUS_MARGIN - 4;
  const lines = () => [...warning.children].reduce((sum, line) => sum + wrappedLines(`\u26A0 ${line.textContent}`,
    width(), WARNING_FONT), 0) + (progress.textContent ? wrappedLines(progress.textContent, width(), STATUS_FONT) : 0);
  const height = () => (lines() ? lines() * LINE_HEIGHT + 4 + 2 * STATUS_MARGIN : 0); // the margins are inside
  const state = { root, warning, progress, widget: null };
  state.widget = addWidget(node, "litevsr_status", root, {
    getMinHeight: height, getMaxHeight: height, margin: STATUS_MARGIN, getValue: () => "", setValue: () => {},
  });
  node[STATUS] = state;
  return state;
}

function refreshStatus(node) {
  const state = node[STATUS];
  if (!state) return;
  state.root.style.display = state.warning.textContent || state.progress.textContent ? "" : "none";
  fitNode(node);
}

function setWarnings(node, messages) {
  const before = node[WARNINGS] ?? [];
  if (before.length === messages.length && before.every((m, i) => m === messages[i])) return;
  node[WARNINGS] = messages;
  if (!messages.length && !node[STATUS]) return redraw(node);
  const state = status(node);
  state.warning.replaceChildren(...messages.map((text) => {
    const line = document.createElement("div");
    line.textContent = text;
    return line;
  }));
  state.warning.style.display = messages.length ? "" : "none";
  state.root.title = messages.join("\n");
  refreshStatus(node);
}

function setProgress(node, text) {
  if (!text && !node[STATUS]) return;
  const state = status(node);
  state.progress.textContent = text;
  refreshStatus(node);
}

// --- validation ----------------------------------------------------------------------------------------------

function widgetValues(node) {
  const values = {};
  for (const widget of node?.widgets ?? []) {
    if (!widget?.name) continue;
    const driven = node.inputs?.some((input) => input?.widget?.name === widget.name && input.link != null);
    values[widget.name] = driven ? undefined : widget.value;
  }
  return values;
}

function upstreamValues(node) {
  const upstream = {};
  const type = node.comfyClass ?? node.type;
  for (const rule of RULES) {
    if (rule.node !== type || !rule.upstream) continue;
    for (const input of Object.keys(rule.upstream)) {
      const slot = node.findInputSlot?.(input) ?? -1;
      const source = slot >= 0 ? node.getInputNode?.(slot) : null;
      if (source) upstream[input] = widgetValues(source);
    }
  }
  return upstream;
}

function checkNode(node) {
  const type = node.comfyClass ?? node.type;
  if (!RULE_NODES.has(type)) return [];
  return validate(type, widgetValues(node), upstreamValues(node));
}

function graphNodes() {
  const nodes = [...(app.graph?.nodes ?? [])];
  for (const subgraph of app.graph?.subgraphs?.values?.() ?? []) nodes.push(...(subgraph.nodes ?? []));
  return nodes;
}

function validateAll() {
  const problems = [];
  for (const node of graphNodes()) {
    if (!RULE_NODES.has(node.comfyClass ?? node.type)) continue;
    const messages = checkNode(node);
    setWarnings(node, messages);
    if (messages.length && node.mode !== MODE_NEVER && node.mode !== MODE_BYPASS) problems.push({ node, messages });
  }
  return problems;
}

let pending = null;
function scheduleValidation() {
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    validateAll();
  }, 0);
}

function describeProblems(problems) {
  return problems.map(({ node, messages }) => `#${node.id} ${node.title ?? node.type}: ${messages.join("; ")}`)
    .join("\n");
}

function refuse(problems) {
  const summary = "LiteVSR: not queued, fix these settings first";
  const detail = describeProblems(problems);
  console.warn(`${summary}\n${detail}`);
  const toast = app.extensionManager?.toast;
  if (toast?.add) {
    toast.add({ severity: "error", summary, detail, life: 12000 });
  } else {
    window.alert(`${summary}:\n\n${detail}`);
  }
}

function guardQueueing() {
  // app.queuePrompt is what the Queue button, Ctrl+Enter and the queue commands call: refuse before anything is
  // queued (and before seeds are advanced).
  const appQueue = app.queuePrompt;
  if (typeof appQueue === "function" && !appQueue.litevsrGuard) {
    const guarded = async function (...args) {
      const problems = validateAll();
      if (problems.length) {
        refuse(problems);
        return false;
      }
      return appQueue.apply(this, args);
    };
    guarded.litevsrGuard = true;
    app.queuePrompt = guarded;
  }
  // A second guard on the request itself, for front ends that queue without app.queuePrompt: the error is shown in
  // the front end's prompt-error dialog.
  const apiQueue = api.queuePrompt;
  if (typeof apiQueue === "function" && !apiQueue.litevsrGuard) {
    const guarded = async function (...args) {
      const problems = validateAll();
      if (problems.length) {
        throw new Error(`LiteVSR: not queued, fix these settings first:\n${describeProblems(problems)}`);
      }
      return apiQueue.apply(this, args);
    };
    guarded.litevsrGuard = true;
    api.queuePrompt = guarded;
  }
}

// --- before/after view ---------------------------------------------------------------------------------------

function viewURL(file) {
  const params = new URLSearchParams({
    filename: file.filename ?? "", subfolder: file.subfolder ?? "", type: file.type ?? "temp",
  });
  return api.apiURL(`/view?${params.toString()}`);
}

function compareView(node) {
  if (node[COMPARE]) return node[COMPARE];
  const root = element("div", "litevsr-compare");
  const stage = element("div", "litevsr-compare-stage");
  const before = element("img", "litevsr-before");
  before.alt = "LR (bicubic)";
  before.draggable = false;
  const after = element("img", "litevsr-after");
  after.alt = "LiteVSR";
  after.draggable = false;
  const divider = element("div", "litevsr-compare-divider");
  const labelBefore = element("span", "litevsr-compare-label litevsr-label-before");
  labelBefore.textContent = "LR (bicubic)";
  const labelAfter = element("span", "litevsr-compare-label litevsr-label-after");
  labelAfter.textContent = "LiteVSR";
  stage.append(before, after, divider, labelBefore, labelAfter);

  const controls = element("div", "litevsr-compare-controls");
  const slider = element("input", "litevsr-slider");
  slider.type = "range";
  slider.min = "0";
  slider.max = "100";
  slider.step = "0.1";
  slider.value = "50";
  slider.title = "Split position: LR (bicubic) on the left, LiteVSR on the right";
  const info = element("span", "litevsr-compare-info");
  controls.append(slider, info);
  root.append(stage, controls);

  const view = { root, stage, before, after, slider, info, size: [1, 1], widget: null };

  const layout = () => {
    const [w, h] = view.size;
    const boxW = stage.clientWidth, boxH = stage.clientHeight;
    if (!boxW || !boxH || !w || !h) return;
    const scale = Math.min(boxW / w, boxH / h);
    const width = w * scale, height = h * scale;
    const left = (boxW - width) / 2, top = (boxH - height) / 2;
    for (const img of [before, after]) {
      Object.assign(img.style, { left: `${left}px`, top: `${top}px`, width: `${width}px`, height: `${height}px` });
    }
    const split = Number(slider.value);
    after.style.clipPath = `inset(0 0 0 ${split}%)`;
    divider.style.left = `${left + (width * split) / 100}px`;
    labelBefore.style.left = `${left + 4}px`;
    labelAfter.style.right = `${boxW - left - width + 4}px`;
  };
  view.layout = layout;

  const fromPointer = (event) => {
    const rect = after.getBoundingClientRect();
    if (!rect.width) return;
    slider.value = String(Math.min(100, Math.max(0, ((event.clientX - rect.left) / rect.width) * 100)));
    layout();
  };
  stage.addEventListener("pointerdown", (event) => {
    event.stopPropagation();
    stage.setPointerCapture?.(event.pointerId);
    fromPointer(event);
  });
  stage.addEventListener("pointermove", (event) => {
    if (stage.hasPointerCapture?.(event.pointerId)) {
      event.stopPropagation();
      fromPointer(event);
    }
  });
  for (const type of ["pointerdown", "pointermove", "wheel"]) {
    slider.addEventListener(type, (event) => event.stopPropagation());
  }
  slider.addEventListener("input", layout);
  before.addEventListener("load", layout);
  after.addEventListener("load", layout);
  for (const img of [before, after]) {
    img.addEventListener("error", () => { info.textContent = `could not load ${img.alt} image`; });
  }
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(layout).observe(stage);

  view.widget = addWidget(node, COMPARE_KEY, root, {
    getMinHeight: () => 140, getValue: () => "", setValue: () => {},
  });
  node[COMPARE] = view;
  return view;
}

function showCompare(node, entry) {
  if (!entry?.before || !entry?.after) return;
  const firstTime = !node[COMPARE];
  const view = compareView(node);
  const [w, h] = Array.isArray(entry.size) && entry.size[0] > 0 && entry.size[1] > 0 ? entry.size : [16, 9];
  view.size = [w, h];
  view.info.textContent = `frame ${entry.frame ?? "?"} · ${w}x${h}`;
  view.before.src = viewURL(entry.before);
  view.after.src = viewURL(entry.after);
  if (firstTime) {
    const width = Math.max(node.size[0], 360);
    const imageHeight = Math.min(640, Math.round(((width - 20) * h) / w));
    fitNode(node, width, Math.max(0, imageHeight + 30 - 140));
  }
  requestAnimationFrame(view.layout);
}

// --- registration --------------------------------------------------------------------------------------------

function chain(object, method, after) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function findNode(id) {
  if (id === undefined || id === null) return null;
  const graph = app.graph;
  const text = String(id);
  return graph?.getNodeById?.(Number(text)) ?? graph?.getNodeById?.(text) ?? null;
}

app.registerExtension({
  name: "ComfyUI-LiteVSR",

  setup() {
    injectStyle();
    guardQueueing();
    api.addEventListener(PROGRESS_EVENT, ({ detail }) => {
      const node = findNode(detail?.node);
      if (node) setProgress(node, formatProgress(detail));
    });
    api.addEventListener("execution_start", () => {
      for (const node of graphNodes()) if (node[STATUS]?.progress.textContent) setProgress(node, "");
    });
    scheduleValidation();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    // Any node whose execution message carries a comparison shows it (the pack's Compare and streaming nodes).
    chain(nodeType.prototype, "onExecuted", function (message) {
      const entries = message?.[COMPARE_KEY];
      if (Array.isArray(entries) && entries.length) showCompare(this, entries[entries.length - 1]);
    });
    const pack = RULE_NODES.has(nodeData?.name) || String(nodeData?.category ?? "").split("/")[0] === PACK_CATEGORY;
    if (!pack) return;
    chain(nodeType.prototype, "onWidgetChanged", scheduleValidation);
    chain(nodeType.prototype, "onConnectionsChange", scheduleValidation);
    chain(nodeType.prototype, "onConfigure", scheduleValidation);
    chain(nodeType.prototype, "onDrawForeground", function (ctx) {
      if (!this[WARNINGS]?.length || this.flags?.collapsed) return;
      const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
      ctx.save();
      ctx.strokeStyle = "#ff4d4d";
      ctx.lineWidth = 2;
      ctx.strokeRect(-1, -title - 1, this.size[0] + 2, this.size[1] + title + 2);
      ctx.restore();
    });
  },

  nodeCreated(node) {
    if (!isPackNode(node)) return;
    // Values edited through DOM widgets (the overrides textarea) or by other extensions reach the callback or
    // the element, not always onWidgetChanged.
    for (const widget of node.widgets ?? []) {
      chain(widget, "callback", scheduleValidation);
      widget.element?.addEventListener?.("input", scheduleValidation);
    }
    scheduleValidation();
  },

  loadedGraphNode(node) {
    if (isPackNode(node)) scheduleValidation();
  },

  afterConfigureGraph() {
    scheduleValidation();
  },
});
