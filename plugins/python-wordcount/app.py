"""`python-wordcount`: the keyed running count of `plugins/wordcount`, in Python.

For every input event the count of its key goes up by one and the operator
emits `(key, count)`, the count as decimal text, with the event's timestamp.
With config `split = "words"` it counts the whitespace-separated words of the
value instead, emitting one update per word. Same output as the Rust
`wordcount` for the same input, so the two can be compared and swapped.

Built against `wit/operator.wit` alone (no memento SDK) with
`componentize-py -d wit -w plugin componentize app -o python_wordcount.wasm`.
Its canonical snapshot is its own format (JSON, keys as hex), written by
`snapshot_state` and read back by `restore_state`.

Test hooks: config `fail_on = "KEY"` raises `ValueError` when that key
arrives, so tests can check that a Python exception failing a task shows
its type and message; `print = "TEXT"` prints TEXT to stdout in `open`
(which the host discards), so tests can see how a printing interpreter is
snapshotted.
"""

import json

from wit_world import exports
from wit_world.imports import log, types
from componentize_py_types import Err

# The canonical state format: bump on an incompatible change, and keep
# reading the older ones.
STATE_VERSION = 1

# State of the one operator instance of this component (the host creates one
# instance per task, and calls into it one export at a time).
_counts = {}
_split_words = False
_fail_on = None


def _config(ctx):
    global _split_words, _fail_on
    config = dict(ctx.config)
    split = config.get("split", "keys")
    if split not in ("keys", "words"):
        raise Err(f'config `split` = "{split}": expected "keys" or "words"')
    _split_words = split == "words"
    fail_on = config.get("fail_on")
    _fail_on = fail_on.encode() if fail_on is not None else None
    if "print" in config:
        print(config["print"], flush=True)


class Operator(exports.Operator):
    def open(self, ctx):
        _config(ctx)

    def process(self, events):
        data = events.data
        lengths = events.lengths
        stamps = events.timestamps
        out = bytearray()
        out_lengths = []
        out_stamps = []
        counts = _counts
        pos = 0
        for i, ts in enumerate(stamps):
            klen = lengths[2 * i]
            vlen = lengths[2 * i + 1]
            key = data[pos : pos + klen]
            pos += klen
            value = data[pos : pos + vlen]
            pos += vlen
            if key == _fail_on:
                raise ValueError(f"fail_on key {key.decode(errors='replace')!r} arrived")
            words = value.split() if _split_words else (key,)
            for word in words:
                n = counts.get(word, 0) + 1
                counts[word] = n
                text = str(n).encode()
                out += word
                out += text
                out_lengths.append(len(word))
                out_lengths.append(len(text))
                out_stamps.append(ts)
        if pos != len(data):
            raise Err(f"malformed batch: lengths add up to {pos} bytes, data has {len(data)}")
        return types.Batch(bytes(out), out_lengths, out_stamps)

    def close(self):
        log.log(log.Level.INFO, f"python-wordcount: {len(_counts)} keys counted")
        return types.Batch(b"", [], [])


# Pieces handed to the host's state writer: the host refuses pieces over
# 1 MiB, and smaller ones let it store the state while it is written.
PIECE = 64 * 1024


class Snapshot(exports.Snapshot):
    def snapshot_state(self, out):
        # Sorted, so equal states give equal bytes. The state is not keyed
        # by key group (no rescaling): every piece is for no group.
        counts = {k.hex(): n for k, n in sorted(_counts.items())}
        data = json.dumps({"version": STATE_VERSION, "counts": counts}).encode()
        for at in range(0, len(data), PIECE):
            out.write(None, data[at : at + PIECE])

    def restore_state(self, source):
        pieces = []
        while True:
            piece = source.read()
            if piece is None:
                break
            pieces.append(piece[1])
        state = b"".join(pieces)
        try:
            doc = json.loads(state)
            version = doc["version"]
            if version != STATE_VERSION:
                raise Err(f"python-wordcount: state version {version} (this build reads {STATE_VERSION})")
            restored = {bytes.fromhex(k): int(n) for k, n in doc["counts"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Err(f"python-wordcount: corrupt snapshot: {type(e).__name__}: {e}")
        _counts.clear()
        _counts.update(restored)
