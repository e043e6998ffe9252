// ComfyUI-LiteVSR: pure front-end logic, no ComfyUI imports (tests run it under node).
//  - RULES: settings that cannot work, checked on the node as widgets change and again before queueing. Each rule
//    mirrors an error the Python side raises at run time (named in `python`); the messages match them.
//  - formatProgress: the status line for a `litevsr.progress` websocket message.

export const TEMPORAL_STRIDE = 4; // Wan VAE: latent 0 = frame 0, then groups of 4 frames (clips are 4n+1)
export const MIN_CHUNK_FRAMES = TEMPORAL_STRIDE + 1; // nodes/core/memory_plan.py MIN_CHUNK_FRAMES
export const MIN_GRID_PX = 16; // one DiT token on the finest grid of nodes/core/backbones.py (tests/test_registry.py)

// Fields of the degradation overrides (nodes/core/degrade.py StageConfig / FinalConfig) and what they take:
// 0 = a number, n > 0 = a list of n values, -1 = a list of any length.
const STAGE_FIELDS = {
  jpeg_prob: 0, jpeg_quality: 2, codec_prob: 0, codecs: -1, bitrate: 2, blur_prob: 0, kernel_probs: 7,
  kernel_sizes: -1, blur_sigma: 2, beta_gaussian: 2, beta_plateau: 2, resize_probs: 3, resize_scale: 2,
  resize_modes: -1, noise_prob: 0, gaussian_noise_prob: 0, noise_sigma: 2, poisson_scale: 2, gray_noise_prob: 0,
};
export const DEGRADATION_FIELDS = {
  stage1: STAGE_FIELDS,
  stage2: STAGE_FIELDS,
  final: {
    jpeg_prob: 0, jpeg_quality: 2, codec_prob: 0, codecs: -1, bitrate: 2, sinc_prob: 0, sinc_omega: 2,
    kernel_sizes: -1, resize_modes: -1,
  },
};

const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const isChunk = (c) => isNum(c) && c >= MIN_CHUNK_FRAMES && (c - 1) % TEMPORAL_STRIDE === 0;
const onGrid = (n) => Math.ceil((Math.max(n, 1) - 1) / TEMPORAL_STRIDE) * TEMPORAL_STRIDE + 1; // frames_on_grid

/** Problems with the JSON of the degradation overrides, as nodes/core/degrade.py with_overrides words them. */
export function overridesProblem(text) {
  if (typeof text !== "string" || !text.trim()) return null;
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    return `overrides are not valid JSON (${error.message})`;
  }
  if (!parsed || (Array.isArray(parsed) && !parsed.length)) return null; // empty: no overrides, as in Python
  if (typeof parsed !== "object" || Array.isArray(parsed)) {
    return "overrides must be a JSON object: {\"stage1\": {...}, \"stage2\": {...}, \"final\": {...}}";
  }
  for (const [part, fields] of Object.entries(parsed)) {
    const valid = DEGRADATION_FIELDS[part];
    if (!valid || fields === null || typeof fields !== "object" || Array.isArray(fields)) {
      return `degradation overrides: '${part}' is not a part; use stage1, stage2 or final, each mapping field ` +
        "names to values";
    }
    const unknown = Object.keys(fields).filter((name) => !(name in valid)).sort();
    if (unknown.length) {
      return `degradation overrides: unknown ${part} field(s) ${unknown.join(", ")}; valid: ` +
        Object.keys(valid).sort().join(", ");
    }
    for (const [name, value] of Object.entries(fields)) {
      const kind = valid[name];
      if (kind === 0 && !isNum(value)) {
        return `degradation overrides: ${part}.${name} takes a number, got ${JSON.stringify(value)}`;
      }
      if (kind !== 0 && (!Array.isArray(value) || (kind > 0 && value.length !== kind))) {
        return `degradation overrides: ${part}.${name} takes a list` + (kind > 0 ? ` of ${kind} values` : "") +
          `, got ${JSON.stringify(value)}`;
      }
    }
  }
  return null;
}

// The nodes that train an adapter on a Video Dataset and a Video Degradation (nodes/train_nodes.py training_inputs).
const TRAINING_NODES = ["LiteVSRTrainAdapter", "LiteVSRDistillAdapter"];

// One table: node type, the widgets it reads (`widgets`, on the node itself; `upstream`: {input name: [widgets]}
// of the nodes linked to those inputs), the Python check it mirrors, and check(values) -> message or null.
// A value that is unknown (widget driven by a link, or nothing connected upstream) is undefined and skips the rule.
export const RULES = [
  {
    node: "LiteVSRSampler", widgets: ["tile_size", "tile_overlap"], python: "core/dit_tiling.py latent_tiling",
    check: ({ tile_size: t, tile_overlap: o }) => isNum(t) && isNum(o) && t > 0 && o > 0 && o >= t ?
      `DiT tile overlap (${o} px) must be smaller than the tile (${t} px); raise the tile size or lower the overlap` :
      null,
  },
  {
    node: "LiteVSRTiledDecode", widgets: ["tile_size", "overlap"], python: "core/decode.py decode_latent_tiling",
    check: ({ tile_size: t, overlap: o }) => isNum(t) && isNum(o) && t <= o ?
      `tile size (${t} px) must be larger than the overlap (${o} px); raise the tile size or lower the overlap` :
      null,
  },
  {
    node: "LiteVSRUpscaleVideoFile", widgets: ["chunk_frames"], python: "core/memory_plan.py check_chunk",
    check: ({ chunk_frames: c }) => {
      if (!isNum(c) || c === 0 || isChunk(c)) return null;
      const low = Math.max(MIN_CHUNK_FRAMES, Math.floor((c - 1) / TEMPORAL_STRIDE) * TEMPORAL_STRIDE + 1);
      return `chunk_frames must be 4n+1 (5, 9, ..., 33, 81) or 0 (auto), got ${c}; use ${low} or ` +
        `${low + TEMPORAL_STRIDE}`;
    },
  },
  {
    node: "LiteVSRUpscaleVideoFile", widgets: ["overlap_frames"], python: "core/memory_plan.py plan",
    check: ({ overlap_frames: o }) => isNum(o) && (o < 0 || o % TEMPORAL_STRIDE) ?
      `overlap_frames must be a multiple of ${TEMPORAL_STRIDE}, got ${o}` : null,
  },
  {
    node: "LiteVSRUpscaleVideoFile", widgets: ["chunk_frames", "overlap_frames"],
    python: "core/memory_plan.py check_chunk",
    check: ({ chunk_frames: c, overlap_frames: o }) => isChunk(c) && isNum(o) && o % TEMPORAL_STRIDE === 0 &&
      c - 1 - o < TEMPORAL_STRIDE ?
      `chunk_frames ${c} leaves no new frames with an overlap of ${o} (the overlap must be at most ` +
      `${c - 1 - TEMPORAL_STRIDE})` : null,
  },
  {
    node: "LiteVSRVideoDataset", widgets: ["clip_frames"], python: "core/dataset.py VideoClipDataset",
    check: ({ clip_frames: c }) => isNum(c) && (c < 1 || onGrid(c) !== c) ?
      `clip_frames must be 4n+1 (the Wan VAE's frame grid), got ${c}; the nearest valid counts are ` +
      `${onGrid(c) - TEMPORAL_STRIDE} and ${onGrid(c)}` : null,
  },
  {
    node: "LiteVSRVideoDataset", widgets: ["width", "height"], python: "training_run.py check_clip_geometry",
    check: ({ width: w, height: h }) => isNum(w) && isNum(h) && (w % MIN_GRID_PX || h % MIN_GRID_PX) ?
      `training crop ${w}x${h} must be a multiple of ${MIN_GRID_PX} px (32 px for Wan2.2 TI2V-5B); e.g. ` +
      `${w - (w % MIN_GRID_PX) || MIN_GRID_PX}x${h - (h % MIN_GRID_PX) || MIN_GRID_PX}` : null,
  },
  ...TRAINING_NODES.map((node) => ({
    node, upstream: { dataset: ["width", "height"], degradation: ["scale"] },
    python: "training_run.py check_clip_geometry",
    check: ({ dataset, degradation }) => {
      const w = dataset?.width, h = dataset?.height, s = degradation?.scale;
      return isNum(w) && isNum(h) && isNum(s) && s > 0 && (w % s || h % s) ?
        `training crop ${w}x${h} (Video Dataset) must be divisible by the degradation scale ${s}` : null;
    },
  })),
  {
    node: "LiteVSRDegradation", widgets: ["overrides"], python: "train_nodes.py LiteVSRDegradation, degrade.py",
    check: ({ overrides }) => overridesProblem(overrides),
  },
];

export const RULE_NODES = new Set(RULES.map((rule) => rule.node));

/**
 * The warnings for one node.
 * type: the node's type (comfyClass); values: {widget name: value}; upstream: {input name: {widget: value}} of the
 * nodes linked to the inputs the rules name (missing when nothing is connected).
 */
export function validate(type, values, upstream = {}) {
  const messages = [];
  for (const rule of RULES) {
    if (rule.node !== type) continue;
    const args = {};
    for (const name of rule.widgets ?? []) args[name] = values?.[name];
    for (const [input, names] of Object.entries(rule.upstream ?? {})) {
      const source = upstream?.[input];
      args[input] = source ? Object.fromEntries(names.map((name) => [name, source[name]])) : undefined;
    }
    let message = null;
    try {
      message = rule.check(args);
    } catch (error) {
      message = null; // a rule must never break the editor
    }
    if (message) messages.push(message);
  }
  return messages;
}

/** 84 -> "1:24", 3723 -> "1:02:03". */
export function formatDuration(seconds) {
  if (!isNum(seconds)) return "?";
  const total = Math.max(0, Math.round(seconds));
  const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${m}:${pad(s)}`;
}

const STAGE_LABELS = { chunk: "chunk", step: "step", sampling: "step", decode: "tile", scene_cuts: "scene-cut scan" };

function planText(stage, plan) {
  if (!plan || typeof plan !== "object") return "";
  const parts = [];
  const auto = new Set(plan.auto ?? []);
  const tag = (name) => (auto.has(name) ? " (auto)" : "");
  const size = (pair) => (Array.isArray(pair) ? `${pair[0]}x${pair[1]}` : String(pair));
  if (isNum(plan.chunk_frames)) {
    parts.push(plan.chunks === 1 ? `1 chunk of ${plan.chunk_frames} frames${tag("chunk_frames")}` :
      `chunks ${plan.chunk_frames} frames${tag("chunk_frames")}`);
    if (isNum(plan.overlap_frames) && plan.chunks !== 1) parts.push(`overlap ${plan.overlap_frames}`);
  }
  if (plan.dit_tile !== undefined) {
    const overlap = plan.dit_overlap && plan.dit_tiled ? ` (overlap ${size(plan.dit_overlap)})` : "";
    parts.push(plan.dit_tiled === false ? `DiT untiled${tag("dit_tile")}` :
      `DiT tile ${size(plan.dit_tile)}${tag("dit_tile")}${overlap}`);
  }
  if (plan.decode_tile !== undefined) {
    const overlap = isNum(plan.decode_overlap) ? `, overlap ${plan.decode_overlap}` : "";
    parts.push(plan.decode_tiled === false ? `decode untiled${tag("decode_tile")}` :
      `decode tile ${plan.decode_tile}${tag("decode_tile")}${overlap}`);
  }
  if (isNum(plan.scene_cuts) && plan.scene_cuts > 0) {
    parts.push(`${plan.scene_cuts} scene cut${plan.scene_cuts === 1 ? "" : "s"}`);
  }
  if (isNum(plan.batch_size)) {
    const crop = Array.isArray(plan.crop) && isNum(plan.crop[0]) ? ` ${plan.crop[0]}x${plan.crop[1]}` : "";
    const frames = isNum(plan.clip_frames) ? `, clips ${plan.clip_frames} frames${crop}` : "";
    parts.push(`batch ${plan.batch_size}x${plan.grad_accumulation ?? 1}${frames}`);
  }
  return parts.join(", ");
}

/**
 * The status line for a `litevsr.progress` message: {stage, done, total, eta_s, plan, loss?, validation_loss?}
 * -> e.g. "chunk 3/12 · ETA 1:24 · chunks 33 frames, overlap 8, DiT tile 832x480, decode tile 512".
 */
export function formatProgress(message) {
  if (!message || typeof message !== "object") return "";
  const { stage, done, total } = message;
  const parts = [];
  if (stage === "scene_cuts") {
    parts.push(`scene-cut scan ${done}/${total} frames`);
  } else {
    parts.push(`${STAGE_LABELS[stage] ?? stage ?? "progress"} ${done}/${total}`);
  }
  if (isNum(done) && isNum(total) && done >= total && total > 0 && stage !== "scene_cuts") {
    parts.push("done");
  } else {
    parts.push(`ETA ${isNum(message.eta_s) ? formatDuration(message.eta_s) : "…"}`);
  }
  if (isNum(message.loss)) parts.push(`loss ${message.loss.toFixed(4)}`);
  if (isNum(message.validation_loss)) parts.push(`val ${message.validation_loss.toFixed(4)}`);
  const plan = planText(stage, message.plan);
  if (plan) parts.push(plan);
  return parts.join(" · ");
}
