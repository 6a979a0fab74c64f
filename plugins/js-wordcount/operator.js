// `js-wordcount`: the keyed running count of `plugins/wordcount`, in
// JavaScript.
//
// For every input event the count of its key goes up by one and the operator
// emits `(key, count)`, the count as decimal text, with the event's timestamp.
// With config `split = "words"` it counts the whitespace-separated words of
// the value instead. Same output as the Rust `wordcount` for the same input.
//
// Built against `wit/operator.wit` alone with componentize-js, the WASI
// features the host does not provide disabled:
//   componentize-js operator.js --wit ../../wit --world-name plugin \
//     -d http -d fetch-event -d stdio -d random -d clocks -o js_wordcount.wasm
// Its canonical snapshot is its own format (JSON, keys as hex).
//
// Errors: an export fails the task by throwing a string (the `string` of
// its `result`). componentize-js 0.23 aborts without a word on any other
// thrown value, so every export goes through `guarded`, which turns an
// uncaught `Error` into "TypeError: message".
//
// Test hooks: config `fail_on = "KEY"` throws a TypeError when that key
// arrives; `print = "TEXT"` writes TEXT to stdout in `open` (which the host
// discards), so tests can see how a printing interpreter is snapshotted.

import { log } from "memento:operator/log@0.2.0";

// The canonical state format: bump on an incompatible change, and keep
// reading the older ones.
const STATE_VERSION = 1;

// Keys as "binary strings" (one char per byte): cheap Map keys that keep
// every byte, whatever the encoding.
let counts = new Map();
let splitWords = false;
let failOn = null;

function bytesToKey(bytes, start, end) {
  let s = "";
  for (let i = start; i < end; i++) s += String.fromCharCode(bytes[i]);
  return s;
}

function hex(key) {
  let s = "";
  for (let i = 0; i < key.length; i++) s += key.charCodeAt(i).toString(16).padStart(2, "0");
  return s;
}

function unhex(h) {
  if (typeof h !== "string" || h.length % 2 !== 0 || !/^[0-9a-f]*$/.test(h)) {
    throw `js-wordcount: corrupt snapshot: bad key ${JSON.stringify(String(h).slice(0, 40))}`;
  }
  let s = "";
  for (let i = 0; i < h.length; i += 2) s += String.fromCharCode(parseInt(h.slice(i, i + 2), 16));
  return s;
}

// Output batch under construction.
class Out {
  constructor() {
    this.parts = [];
    this.size = 0;
    this.lengths = [];
    this.stamps = [];
  }
  push(key, value, ts) {
    this.parts.push(key, value);
    this.size += key.length + value.length;
    this.lengths.push(key.length, value.length);
    this.stamps.push(ts);
  }
  batch() {
    const data = new Uint8Array(this.size);
    let pos = 0;
    for (const p of this.parts) {
      for (let i = 0; i < p.length; i++) data[pos++] = p.charCodeAt(i);
    }
    return {
      data,
      lengths: new Uint32Array(this.lengths),
      timestamps: new BigInt64Array(this.stamps),
    };
  }
}

function bump(key, ts, out) {
  const n = (counts.get(key) || 0) + 1;
  counts.set(key, n);
  out.push(key, String(n), ts);
}

/// `fn` with any thrown value turned into the string a `result` carries.
function guarded(fn) {
  return function (...args) {
    try {
      return fn.apply(this, args);
    } catch (e) {
      if (typeof e === "string") throw e;
      if (e instanceof Error) throw `${e.name}: ${e.message}`;
      throw `uncaught ${typeof e}: ${String(e)}`;
    }
  };
}

function guardAll(exports) {
  for (const name of Object.keys(exports)) exports[name] = guarded(exports[name]);
  return exports;
}

export const operator = guardAll({
  open(ctx) {
    const config = new Map(ctx.config);
    const split = config.has("split") ? config.get("split") : "keys";
    if (split !== "keys" && split !== "words") {
      throw `config \`split\` = ${JSON.stringify(split)}: expected "keys" or "words"`;
    }
    splitWords = split === "words";
    failOn = config.has("fail_on") ? config.get("fail_on") : null;
    if (config.has("print")) console.log(config.get("print"));
  },

  process(events) {
    const { data, lengths, timestamps } = events;
    const out = new Out();
    let pos = 0;
    for (let i = 0; i < timestamps.length; i++) {
      const klen = lengths[2 * i];
      const vlen = lengths[2 * i + 1];
      const key = bytesToKey(data, pos, pos + klen);
      pos += klen;
      const vstart = pos;
      pos += vlen;
      const ts = timestamps[i];
      if (failOn !== null && key === failOn) {
        throw new TypeError(`fail_on key ${JSON.stringify(key)} arrived`);
      }
      if (splitWords) {
        for (const word of bytesToKey(data, vstart, pos).split(/\s+/)) {
          if (word.length > 0) bump(word, ts, out);
        }
      } else {
        bump(key, ts, out);
      }
    }
    if (pos !== data.length) {
      throw `malformed batch: lengths add up to ${pos} bytes, data has ${data.length}`;
    }
    return out.batch();
  },

  close() {
    log("info", `js-wordcount: ${counts.size} keys counted`);
    return { data: new Uint8Array(0), lengths: new Uint32Array(0), timestamps: new BigInt64Array(0) };
  },
});

const PIECE = 64 * 1024;

export const snapshot = guardAll({
  // Pieces to the host's state writer (it refuses pieces over 1 MiB). The
  // state is not keyed by key group (no rescaling): no group for any piece.
  snapshotState(out) {
    // Sorted, so equal states give equal bytes.
    const entries = [...counts.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    const doc = { version: STATE_VERSION, counts: entries.map(([k, n]) => [hex(k), n]) };
    const text = JSON.stringify(doc);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    for (let at = 0; at < bytes.length; at += PIECE) out.write(undefined, bytes.subarray(at, at + PIECE));
  },

  restoreState(source) {
    const pieces = [];
    let total = 0;
    for (;;) {
      const piece = source.read();
      if (piece === undefined) break;
      pieces.push(piece[1]);
      total += piece[1].length;
    }
    const state = new Uint8Array(total);
    let at = 0;
    for (const p of pieces) {
      state.set(p, at);
      at += p.length;
    }
    let doc;
    try {
      doc = JSON.parse(bytesToKey(state, 0, state.length));
    } catch (e) {
      throw `js-wordcount: corrupt snapshot: ${e}`;
    }
    if (doc === null || doc.version !== STATE_VERSION || !Array.isArray(doc.counts)) {
      throw `js-wordcount: not a version ${STATE_VERSION} snapshot`;
    }
    const restored = new Map();
    for (const entry of doc.counts) {
      if (!Array.isArray(entry) || !Number.isSafeInteger(entry[1]) || entry[1] < 1) {
        throw "js-wordcount: corrupt snapshot: bad count";
      }
      restored.set(unhex(entry[0]), entry[1]);
    }
    counts = restored;
  },
});
