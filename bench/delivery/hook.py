"""The delivery benchmark's webhook process: the admission webhook as the manager runs it.

``bench.delivery.run`` starts this as its own process, so the webhook has
its interpreter (and GIL) to itself, as in the manager, and the bench's
client does not compete with it. It builds the webhook exactly as
tests/integration/test_delivery_webhook.py does (``Env``: the manager's
informers, ``webhook.Delivery``, its CA and certificate in a Secret, the
MutatingWebhookConfiguration with ``clientConfig.url``) and times every
``Admission.review`` call in the handler thread. The gate lifter (the
leader's part) does not run: no scheduling is measured.

Protocol on stdin/stdout, one JSON object a line: prints
``{"config": NAME}`` once serving; each ``dump`` line read answers
``{"handler": [seconds…]}`` (the reviews since the last dump); end of input
stops the webhook and deletes its configuration.

    python3 -m bench.delivery.hook --kubeconfig PATH
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import types
from typing import Any

from tests.integration import test_delivery_webhook as twh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    args = ap.parse_args()
    env = twh.Env(types.SimpleNamespace(kubeconfig=args.kubeconfig))  # type: ignore[arg-type]
    env.start()
    assert env.delivery.server is not None
    admission = env.delivery.server.admission  # type: ignore[attr-defined]
    review = admission.review
    times: list[float] = []
    lock = threading.Lock()

    def timed(body: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            return review(body)  # type: ignore[no-any-return]
        finally:
            dt = time.perf_counter() - t0
            with lock:
                times.append(dt)

    admission.review = timed
    try:
        print(json.dumps({"config": env.cfg.config_name}), flush=True)
        for line in sys.stdin:
            if line.strip() == "dump":
                with lock:
                    out, times[:] = list(times), []
                print(json.dumps({"handler": out}), flush=True)
    finally:
        env.stop()


if __name__ == "__main__":
    main()
