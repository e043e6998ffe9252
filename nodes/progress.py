"""Progress events for the pack's front end: the `litevsr.progress` websocket message and the ETA it carries.

Sent only when a node runs under a server (the node's hidden unique_id is set): direct calls in tests and the
headless tools pass no node id and nothing is imported from the server. The message goes to the client that
queued the prompt:

    {"node": "12", "stage": "chunk", "done": 3, "total": 12, "eta_s": 84.0 | null, "plan": {...}, ...extra}

`js/litevsr.js` shows it as a status line on that node.
"""
import time

EVENT = "litevsr.progress"


class Eta:
    """Seconds left after `done` of `total` units, from the mean time per unit so far.

    With `done=None` the clock starts at the first update (units finished before it, e.g. resumed training steps
    or a validation pass, do not count); with a number it starts now, at that many units done."""

    def __init__(self, done=None, clock=time.monotonic):
        self.clock = clock
        self.start = None if done is None else (done, clock())

    def __call__(self, done, total):
        now = self.clock()
        if self.start is None:
            self.start = (done, now)
            return None
        first, since = self.start
        if done <= first:
            return None
        return max(0.0, (now - since) / (done - first) * (total - done))


def send_progress(node_id, stage, done, total, eta_s=None, plan=None, **extra):
    """Sends one `litevsr.progress` message to the client that queued the prompt; no-op outside a server."""
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    message = {"node": str(node_id), "stage": stage, "done": int(done), "total": int(total),
               "eta_s": None if eta_s is None else round(float(eta_s), 1), "plan": plan or {}, **extra}
    server.send_sync(EVENT, message, server.client_id)
