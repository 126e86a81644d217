"""Every secret is fresh in every process: a deployed SuperNode starts a new process per message,
so nothing may be derived from process start-up state (an RNG seeded at import, a fixed seed).

Two fresh interpreters run the same protocol step on the same request; their secrets must differ.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STEP = r'''
import json, pickle, sys
from fedlora.secagg import participant as protocol, shamir
from fedlora.secagg.identity import simulated_identity
request = pickle.loads(bytes.fromhex(sys.argv[1]))
names = request.member_names
state, advert = protocol.setup(request, simulated_identity(names[request.receiver], names))
shares = shamir.split(b"the same secret", 3, [1, 2, 3, 4])
print(json.dumps({"s_public": state.s_public.hex(), "c_public": advert.c_publics[0].hex(), "shares": [s.hex() for s in shares.values()]}))
'''


def run_step(request_hex: str) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP, request_hex], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_given_the_same_setup_draw_different_keys_and_shamir_coefficients() -> None:
    import pickle

    from fedlora.secagg.server import SecAggServer

    server = SecAggServer("run-x/round-1/bucket-0", list(range(5)), 65, 1.0, names=[f"participant-{i}" for i in range(5)])
    request = server.setup()[0]
    first, second = (run_step(pickle.dumps(request).hex()) for _ in range(2))
    assert first["s_public"] != second["s_public"] and first["c_public"] != second["c_public"]
    assert not set(first["shares"]) & set(second["shares"])  # fresh polynomial coefficients, same secret
