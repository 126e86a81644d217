"""Break each secure-aggregation (and governance) mechanism on purpose and check that a test notices.

Run by hand (not in CI; the secure-aggregation group takes 30+ minutes on 2 cores):

    python tests/secagg/mutations.py [--only NAME] [--out docs/secagg-mutations.md]
    python tests/secagg/mutations.py --group governance --out docs/governance-mutations.md
    python tests/secagg/mutations.py --group views --out docs/views-mutations.md
    python tests/secagg/mutations.py --group isolation --out docs/isolation-mutations.md

Each mutation replaces one exact piece of source in a temporary copy of the repository and runs
the protocol tests there (tests/secagg and the in-process stage tests of
tests/test_secure_federation.py and tests/test_distributed_dp.py, without the simulated
federations). A mutation is *caught* when at least one test fails. A mutation whose source
text no longer exists is reported as stale, so the list cannot silently rot when the code
changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/secagg", "tests/test_secure_federation.py", "tests/test_distributed_dp.py", "tests/test_privacy_views.py"]
SIMULATIONS = (
    "not secure_round_matches and not vanishing_after_masking and not round_below_threshold and not whole_distributed_dp_round"
    " and not tracks_the_32_bit_one"
)


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the property it removes
    edits: tuple[tuple[str, str, str], ...]  # (file, exact old text, new text): every occurrence
    tests: tuple[str, ...] = ()  # the tests that should notice, if not the secure-aggregation ones (group "governance")
    keyword: str = ""  # pytest -k for `tests`

    @property
    def group(self) -> str:
        if self.tests and self.tests[0] in ISOLATION_TESTS:
            return "isolation"
        return "views" if self.tests and self.tests[0] in (*VIEW_TESTS, *SERVING_TESTS) else ("governance" if self.tests else "secagg")

    def command(self) -> list[str]:
        return [*(self.tests or TESTS), "-k", self.keyword if self.tests else SIMULATIONS]


MUTATIONS = [
    Mutation(
        "no-pairwise-masks",
        "pairwise masks removed from participant and server together",
        (
            ("fedlora/secagg/participant.py",
             "        apply_mask(masked, crypto.pairwise_seed(state.s_private, s_pub, state.params), mask_sign(me, j))",
             "        pass"),
            ("fedlora/secagg/server.py", "                apply_mask(self.total, seed, -mask_sign(i, j))", "                pass"),
        ),
    ),
    Mutation(
        "predictable-self-mask-seed",
        "self-mask seed derived from public data",
        (("fedlora/secagg/participant.py", "    b_seed = os.urandom(SEED_BYTES)", '    b_seed = crypto.commit_seed(state.params, me, b"")'),),
    ),
    Mutation(
        "seeded-shamir-coefficients",
        "Shamir coefficients from a seeded random.Random",
        (("fedlora/secagg/shamir.py", "    draw: _RandRange = rng or _SYSTEM_RNG", '    draw: _RandRange = rng or __import__("random").Random(0)'),),
    ),
    Mutation(
        "fixed-aead-nonce",
        "share encryption with a fixed nonce",
        (("fedlora/secagg/crypto.py", "    nonce = os.urandom(NONCE_BYTES)", "    nonce = bytes(NONCE_BYTES)"),),
    ),
    Mutation(
        "pairwise-seed-ignores-round",
        "pairwise seed not bound to the round (or any public parameter)",
        (("fedlora/secagg/crypto.py", 'b"pairwise-mask|" + params)', 'b"pairwise-mask|")'),),
    ),
    Mutation(
        "no-participant-survivor-check",
        "participant answers unmask with fewer than t-1 surviving neighbours",
        (("fedlora/secagg/reveal.py", "    if len(survived) + 1 < state.threshold:", "    if False:"),),
    ),
    Mutation(
        "no-pre-unmask-abort",
        "server asks for shares although a secret lacks t live holders",
        (("fedlora/secagg/server.py", "                if shares < self.threshold:", "                if False:"),),
    ),
    Mutation(
        "no-possession-check",
        "advertised keys accepted without proof of possession",
        (("fedlora/secagg/server.py",
          "            crypto.check_possession(self._server_private, publics, msg.possession, self.params, i)",
          "            pass"),),
    ),
    Mutation(
        "non-canonical-keys",
        "non-canonical key encodings accepted",
        (("fedlora/secagg/crypto.py", '    if int.from_bytes(public, "little") >= _FIELD:', "    if False:"),),
    ),
    Mutation(
        "low-order-keys",
        "low-order keys accepted (all-zero shared secret used)",
        (("fedlora/secagg/crypto.py",
          '        raise ValueError("public key is of low order (the shared secret would be zero)") from None',
          "        return bytes(32)"),),
    ),
    Mutation(
        "duplicate-keys",
        "a key held by several participants accepted",
        (("fedlora/secagg/server.py", "            if len(holders) > 1:  # each proved possession: they share a private key", "            if False:"),),
    ),
    Mutation(
        "accusations-believed",
        "accusations believed without opening the bundle",
        (("fedlora/secagg/server.py",
          '        """Open the accused bundle with the revealed key, as the accuser did; blame who is wrong."""',
          '        self.blame(accused, "accused"); self.lacking.add((accuser, accused)); return'),),
    ),
    Mutation(
        "share-commitments-unchecked",
        "revealed shares not checked against their owner's commitment",
        (("fedlora/secagg/server.py", "                    if u != h and crypto.commit_share(", "                    if False and crypto.commit_share("),),
    ),
    Mutation(
        "first-t-shares-only",
        "reconstruction from the first t shares, no error decoding",
        (("fedlora/secagg/server.py",
          "            result = shamir.reconstruct(shares, self.threshold)",
          "            result = shamir.Reconstruction(shamir.combine(shares, self.threshold), [])"),),
    ),
    Mutation(
        "count-slot-unchecked",
        "unmasked sum accepted whatever its count slot says",
        (("fedlora/secagg/server.py", "        if int(self.total[-1]) != n:", "        if False:"),),
    ),
    Mutation(
        "params-not-in-share-encryption",
        "share encryption (key and associated data) not bound to the public parameters",
        (
            ("fedlora/secagg/crypto.py", 'b"share-encryption|" + params)', 'b"share-encryption|")'),
            ("fedlora/secagg/crypto.py", '    return DOMAIN + b"|share|" + params + struct.pack(', '    return DOMAIN + b"|share|" + struct.pack('),
        ),
    ),
    Mutation(
        "fixed-rounding-key",
        "stochastic rounding from a key anyone can recompute",
        (("participant/secure.py", "        return os.urandom(32)", "        return bytes(32)"),),
    ),
    Mutation(
        "public-bucket-secret",
        "buckets drawn from a value participants can compute (the round, as the run seed once was)",
        (("coordinator/secure.py",
          "        result.bucket_secret = draw_bucket_secret()",
          '        result.bucket_secret = f"{server_round}".encode().ljust(32, b"/")'),),
    ),
    Mutation(
        "no-replay-refusal",
        "a participant masks again for a round it already masked",
        (("participant/masked.py",
          "    if run_round(config_sha256, server_round) in rounds:",
          "    if False:"),),
    ),
    Mutation(
        "trained-from-unchecked",
        "a participant masks a second update of a round trained from a global adapter it already trained that round from (another configuration)",
        (("participant/masked.py", "    if adapter_sha256 and run_round(adapter_sha256, server_round) in trained_from:", "    if False:"),),
    ),
    Mutation(
        "instance-unchecked",
        "a held update replaced after setup is masked in that instance anyway",
        (("participant/secure.py", "    if held.get(\"instance\") != state.round_id:", "    if False:"),),
    ),
    Mutation(
        "secrets-kept",
        "keys and shares kept after unmask",
        (("fedlora/secagg/reveal.py",
          "    return erase_secrets(state), response",
          '    return dataclasses.replace(state, stage="unmasked"), response'),),
    ),
    Mutation(
        "rotation-not-keyed-by-round",
        "16-bit wire: the same rotation in every instance (seed not bound to the round's parameters)",
        (("fedlora/secagg/crypto.py", 'return hashlib.sha256(DOMAIN + b"|rotation|" + params).digest()', 'return hashlib.sha256(DOMAIN + b"|rotation|").digest()'),),
    ),
    Mutation(
        "rotation-without-signs",
        "16-bit wire: a plain DCT (signs fixed at +1), which a flat update defeats",
        (("fedlora/secagg/rotation.py",
          "    return 1.0 - 2.0 * (expand_mask(seed, length) & 1).astype(np.float64)",
          "    return np.ones(length)"),),
    ),
    Mutation(
        "no-coordinate-clip",
        "16-bit wire: rotated coordinates not clipped to the member's share of the range",
        (("fedlora/secagg/fixedpoint.py", "        np.clip(v[: narrow.length], -narrow.cap, narrow.cap, out=v[: narrow.length])", "        pass"),),
    ),
    Mutation(
        "decode-without-unrotation",
        "16-bit wire: the sum decoded without rotating it back",
        (("fedlora/secagg/fixedpoint.py", "        values[: narrow.length] = unrotate(values[: narrow.length], narrow.seed)", "        pass"),),
    ),
    Mutation(
        "slots-narrowed-too",
        "16-bit wire: the weight and count slots sent (and summed) in 16 bits like the update",
        (
            ("fedlora/secagg/narrow.py",
             "    return np.concatenate([masked[: narrow.length].astype(np.uint16), masked[narrow.length :].view(np.uint16)])",
             "    return masked.astype(np.uint16)"),
            ("fedlora/secagg/narrow.py", "    m = narrow.length\n", "    m = y.size\n"),
            ("fedlora/secagg/narrow.py",
             "    return np.dtype(np.uint16), narrow.length + 2 * (vector_length + 1 - narrow.length)",
             "    return np.dtype(np.uint16), vector_length + 1"),
        ),
    ),
    Mutation(
        "masked-word-unchecked",
        "16-bit wire: a masked input of the wrong word type accepted if its length fits",
        (("fedlora/secagg/server.py", "            if y.shape != (length,) or y.dtype != dtype:", "            if y.shape != (length,):"),),
    ),
    Mutation(
        "no-dp-noise",
        "participants add no DP noise: under distributed DP the sum reaches the coordinator un-noised",
        (("participant/secure.py",
          '    noise = None if held["adversary"] else dp_noise(held, state.scale, clip_norm, state.vector_length)',
          "    noise = None"),),
    ),
    Mutation(
        "masked-rounds-in-memory-only",
        "masked rounds remembered in context.state only: a resumed run (fresh state) masks the round again",
        (("participant/masked.py", "    if site is not None:\n", "    if False:\n"),),
    ),
    Mutation(
        "setup-member-count-unchecked",
        "a site takes part in an instance smaller than its policy.min_bucket_size / the run's bucket size",
        (("participant/terms.py", "    if n < terms.min_members:", "    if False:"),),
    ),
    Mutation(
        "setup-graph-unchecked",
        "a site accepts neighbours the coordinator picked instead of the instance's public graph",
        (("participant/terms.py", "    if sorted(request.neighbours) != expected:", "    if False:"),),
    ),
    Mutation(
        "setup-threshold-unchecked",
        "a site accepts any protocol-valid threshold, not the plan's for its degree",
        (("participant/terms.py", "        if request.threshold != threshold:", "        if False:"),),
    ),
    Mutation(
        "setup-encoding-unchecked",
        "a site accepts another clip norm, wire width, vector length or fixed-point scale than the run's plan",
        (
            ("participant/terms.py", "    if request.clip_norm != input_clip_norm(terms.clip_norm):", "    if False:"),
            ("participant/terms.py", "    if request.wire_bits != terms.wire_bits:", "    if False:"),
            ("participant/terms.py", "    if request.vector_length != update_length + 1:", "    if False:"),
            ("participant/terms.py", "        if request.scale != scale:", "        if False:"),
        ),
    ),
    Mutation(
        "setup-noise-unchecked",
        "a site accepts another noise multiplier or dropout margin than its run configuration's",
        (("participant/terms.py", "    if noise != mine:", "    if False:"),),
    ),
    Mutation(
        "run-binding-unchecked",
        "a site given another global adapter or run configuration than the instance binds takes part",
        (("participant/terms.py", "        if told != held:", "        if False:"),),
    ),
    Mutation(
        "run-binding-not-in-context",
        "the run configuration and global adapter hashes left out of the instance's context (and digest)",
        (
            ("fedlora/secagg/plan.py", ', **dataclasses.asdict(binding)}', "}"),
            ("fedlora/secagg/plan.py", '    return RunBinding(str(context["config_sha256"]), str(context["adapter_sha256"]))', "    return RunBinding()"),
            ("participant/terms.py", "        if told != held:", "        if False:"),
        ),
    ),
    Mutation(
        "relayed-keys-unsigned",
        "a participant accepts relayed keys without checking its neighbour's signature (key substitution)",
        (("fedlora/secagg/participant.py",
          "        fault = check_signed(identity.roster, name, ident, sig, key_statement(state.params, j, me, s_pub, c_pub), identity.known)",
          "        fault = None"),),
    ),
    Mutation(
        "signer-not-checked-against-roster",
        "any valid signature accepted, whatever key made it (the coordinator signs with its own)",
        (("fedlora/secagg/identity.py", "        if opened.fingerprint != expected:", "        if False:"),),
    ),
    Mutation(
        "secure-weight-reference-from-largest-claim",
        "a secure bucket's weight reference is its largest claim again: a member claiming 10^6 outweighs its bucket",
        (("coordinator/secure.py", "        self.weight_ref = 1.0 if noise[0] else weight_ref", "        self.weight_ref = 1.0 if noise[0] else float(max(m.num_examples for m in members))"),),
    ),
    Mutation(
        "noise-ignored-by-the-clip-screen",
        "the clip-bound screen ignores distributed DP's noise: every honest noisy bucket is set aside",
        (("fedlora/aggregate/screen.py", " + noise_norm_bound(unit.noise_std, unit.mean.size)) / unit.weight", ") / unit.weight"),),
    ),
    Mutation(
        "no-clip-screen-under-distributed-dp",
        "noisy bucket sums are not screened against the clip bound (a member's unbounded input passes)",
        (("coordinator/secure.py", "        self.result = Unit.from_total(survivors, total, weight, bound, bound / self.clip_norm, self.noise_std)",
          "        self.result = Unit.from_total(survivors, total, weight, bound, bound / self.clip_norm, 1e30)"),),
    ),
    Mutation(
        "seed-commitment-unchecked",
        "a dealer's self-mask seed accepted from its shares without matching its commitment (its real mask stays in the sum)",
        (("fedlora/secagg/server.py", "            if crypto.commit_seed(self.params, u, b_seed) != self.commitments[u]:", "            if False:"),),
    ),
    Mutation(
        "card-certificate-unchecked",
        "a card's signing key accepted without its node key's certificate (the coordinator presents its own key under a member's node key)",
        (("fedlora/secagg/identity.py", "        node.verify(certificate, _certified_statement(raw), _SIGNATURE)", "        pass"),),
    ),
    Mutation(
        "roster-unchecked-at-setup",
        "a participant takes part in an instance with a member not on its roster (a Sybil)",
        (("fedlora/secagg/participant.py", "    if strangers or mine != identity.name:", "    if False:"),),
    ),
    Mutation(
        "server-relays-unsigned-keys",
        "the server relays keys without checking their signatures and identities (honest neighbours then blame it)",
        (("fedlora/secagg/server.py", "        return self._signature_fault(i, msg)", "        return None"),),
    ),
    Mutation(
        "claimed-sender-trusted",
        "a reply's claimed sender trusted over its authenticated node (the impersonated participant is blamed)",
        (("coordinator/secure.py", "            if msg.sender != request.receiver:", "            if False:"),),
    ),
    Mutation(
        "survivor-signatures-unchecked",
        "a participant reveals shares without verifying the members' signatures on the survivor set it signed",
        (("fedlora/secagg/reveal.py",
          "        fault = check_signed(identity.roster, name, card, signature, statement, identity.known)",
          "        fault = None"),),
    ),
    Mutation(
        "too-few-survivor-signatures",
        "a participant reveals shares whatever the number of signatures on its survivor set",
        (("fedlora/secagg/reveal.py", "    if len(request.signers) + 1 < need:", "    if False:"),),
    ),
    Mutation(
        "survivor-signatures-from-a-neighbourhood",
        "t signatures (a neighbourhood's worth) suffice instead of a majority of the bucket: a sparse bucket can be split",
        (("fedlora/secagg/reveal.py", "    return max(state.threshold, len(state.members) // 2 + 1)", "    return state.threshold"),),
    ),
    Mutation(
        "unmask-request-not-matched-to-signed-set",
        "a participant reveals what the unmask request asks even where it contradicts the survivor set it signed",
        (("fedlora/secagg/reveal.py", "    if disagree:", "    if False:"),),
    ),
    Mutation(
        "under-noised-sum-kept",
        "a bucket sum holding fewer than k (1 - m) noise shares is combined into the adapter (charged at the planned z)",
        (("coordinator/secure.py",
          "            if not meets(self.noise_multiplier, z):  # members took their shares away before masking",
          "            if False:"),),
    ),
    Mutation(
        "coordinator-view-charges-planned-noise",
        "epsilon against the coordinator charged at the planned z, not the noise of the sum it saw",
        (("fedlora/privacy/user_level.py",
          "Charge(self.sample_rate, self.noise_multiplier, seen)",
          "Charge(self.sample_rate, self.noise_multiplier, self.noise_multiplier)"),),
    ),
    Mutation(
        "site-ledger-not-charged-at-mask",
        "a site charges its ledger only if it hears of unmask (a masked input that left is not charged)",
        (("participant/secure.py",
          "        ledger.record_contribution(\n            site, contribution_key(held), charge,",
          "        (lambda *_, **__: None)(\n            site, contribution_key(held), charge,"),),
    ),
    Mutation(
        "site-ledger-limits-ignored",
        "a site takes part past its policy.max_epsilon / max_epsilon_coordinator",
        (("participant/ledger.py", "    if passed:\n", "    if False:\n"),),
    ),
    Mutation(
        "site-ledger-double-charges",
        "a contribution charged again under the same key (a retried message counted twice)",
        (("fedlora/privacy/ledger.py", "        if old is not None and not (", "        if False and not ("),),
    ),
    Mutation(
        "site-ledger-lowered-at-unmask",
        "a site's charge replaced by whatever unmask implies, even if that is less noise than assumed",
        (("participant/secure.py", "raise_only=True)", "raise_only=False)"),),
    ),
    Mutation(
        "unsigned-bundles-accused",
        "a participant accuses the dealer of any bundle that does not open, signed or not (a relay that garbles a target's bundles collects t shares of both its secrets)",
        (("fedlora/secagg/participant.py", "    _check_signed_bundles(state, relay)  # before", "    pass  # before"),),
    ),
    Mutation(
        "server-relays-unsigned-bundles",
        "the server relays share bundles without checking their dealer's signature (honest receivers then blame it)",
        (("fedlora/secagg/server.py",
          "                verify(self.cards[i], signature, bundle_statement(self.params, i, j, self.s_publics[i], self.receiving[(j, i)], blob, b_c, s_c))",
          "                pass"),),
    ),
    Mutation(
        "bundle-signature-ignores-keys",
        "the bundle signature binds neither the dealer's masking key nor the receiving key (a bundle of another setup of the instance verifies)",
        (("fedlora/secagg/identity.py",
          "struct.pack(\">QQ\", sender, receiver) + s_public + c_public\n            + hashlib",
          "struct.pack(\">QQ\", sender, receiver)\n            + hashlib"),),
    ),
    Mutation(
        "plaintext-ledger-keyed-by-run-id",
        "a site's ledger keys a plaintext round by the Flower run id and round only (one run id reused for another configuration is charged once)",
        (("participant/app.py", 'key = f"run-{msg.metadata.run_id}/config-{instruction.config_sha256}/round-{instruction.server_round}"',
          'key = f"run-{msg.metadata.run_id}/round-{instruction.server_round}"'),),
    ),
    Mutation(
        "site-ledger-keyed-by-instance-id",
        "a site's ledger keys a secure contribution by the instance id the coordinator names (one id reused in every run is charged once)",
        (("participant/secure.py",
          "    return f\"config-{held['config_sha256']}/round-{int(held['server_round'])}\"",
          "    return str(held[\"instance\"])"),),
    ),
]


WITHDRAWAL_TESTS = ("tests/test_withdrawal.py",)
DEPLOYED_WITHDRAWAL_TESTS = ("tests/test_withdrawal_deployed.py",)
MUTATIONS += [
    Mutation(
        "withdrawal-record-signature-unchecked",
        "a withdrawal record counts without a valid coordinator signature",
        (("fedlora/registry.py", "    if not document_verifies(record, trusted):\n        return None, [f\"{WITHDRAWAL}: its signature",
          "    if False:\n        return None, [f\"{WITHDRAWAL}: its signature"),),
        WITHDRAWAL_TESTS, "moved or edited",
    ),
    Mutation(
        "withdrawal-record-not-bound-to-version",
        "a withdrawal record copied onto another version counts there",
        (("fedlora/registry.py", "    if record.get(\"manifest_signature\") != manifest.get(\"signature\"):", "    if False:"),),
        WITHDRAWAL_TESTS, "moved or edited",
    ),
    Mutation(
        "lineage-ignores-descendants",
        "only versions whose own round applied the update are withdrawn, not those trained from them",
        (("coordinator/withdrawal.py", "any(name in made.get(v, ()) for v in ancestry(version, parent_of))", "name in made.get(version, ())"),),
        WITHDRAWAL_TESTS, "rolls_back",
    ),
    Mutation(
        "withdrawn-version-exported",
        "adapter export writes a withdrawn version without --force",
        (("fedlora/registry.py", "    if force and problems and problems[0].startswith(\"WITHDRAWN\"):",
          "    if problems and problems[0].startswith(\"WITHDRAWN\"):"),),
        WITHDRAWAL_TESTS, "rolls_back",
    ),
    Mutation(
        "certificate-signature-unchecked",
        "a withdrawal certificate verifies whatever its signature",
        (("coordinator/withdrawal.py", "problems = [] if document_verifies(certificate, trusted_key(public_key_pem)) else", "problems = [] if True else"),),
        WITHDRAWAL_TESTS, "certificate",
    ),
    Mutation(
        "certificate-audit-record-unchecked",
        "a certificate is accepted without its record in the audit chain",
        (("coordinator/withdrawal.py", "        if record.get(\"hash\") != digest:", "        if False:"),),
        WITHDRAWAL_TESTS, "certificate",
    ),
    Mutation(
        "privacy-rolled-back",
        "the accountant rolled back with the adapter (the withdrawn versions' privacy forgotten)",
        (("coordinator/withdrawal.py", "rolled = rolled | {\"privacy\": state[\"privacy\"], \"audit_last\": record[\"hash\"]}",
          "rolled = rolled | {\"audit_last\": record[\"hash\"]}"),),
        WITHDRAWAL_TESTS, "privacy",
    ),
    Mutation(
        "resume-recharges-rolled-back-rounds",
        "a resumption charges every applied round after the checkpoint's, not only those after its audit record",
        (("coordinator/rounds.py", "        since = records[hashes.index(state[\"audit_last\"]) + 1 :]", "        since = records"),),
        WITHDRAWAL_TESTS, "privacy",
    ),
    Mutation(
        "request-signature-unchecked",
        "a withdrawal request honoured without verifying its signature",
        (("fedlora/withdrawal_request.py",
          "        key.verify(bytes.fromhex(str(request.get(\"signature\", \"\"))), canonical_json(body), ec.ECDSA(hashes.SHA384()))", "        pass"),),
        DEPLOYED_WITHDRAWAL_TESTS, "registered_key",
    ),
    Mutation(
        "request-key-not-the-registered-one",
        "a withdrawal request honoured when signed by any key",
        (("fedlora/withdrawal_request.py",
          "if not isinstance(key, ec.EllipticCurvePublicKey) or key_fingerprint(key) != registered_fingerprint:",
          "if not isinstance(key, ec.EllipticCurvePublicKey):"),),
        DEPLOYED_WITHDRAWAL_TESTS, "registered_key",
    ),
    Mutation(
        "in-progress-round-keeps-withdrawn",
        "a member withdrawn while its round runs is still combined",
        (("coordinator/rounds.py", "        if not why:\n            return\n", "        if True:\n            return\n"),),
        DEPLOYED_WITHDRAWAL_TESTS, "during",
    ),
]


VIEW_TESTS = ("tests/test_dashboard.py", "tests/test_participant_monitor.py")
# What a site runs or serves, and what it checks of what it is sent: grouped with the views.
SERVING_TESTS = ("tests/test_export.py", "tests/test_generate.py", "tests/test_prompts.py", "tests/test_sb_mode.py")
MUTATIONS += [  # the read-only views (dashboard, site monitor): who may reach them and what they may do
    Mutation(
        "view-token-not-required",
        "a view served with --token-file answers requests without the token",
        (("fedlora/web.py", "    if token_file:\n        app = require_token(", "    if False:\n        app = require_token("),),
        VIEW_TESTS, "token",
    ),
    Mutation(
        "view-any-token-accepted",
        "any Authorization header passes for the token",
        (("fedlora/exposure.py", "    return hmac.compare_digest(given.encode(), token.encode())", "    return True"),),
        VIEW_TESTS, "token",
    ),
    Mutation(
        "view-writes-allowed",
        "a view answers PUT, DELETE and POST as well as GET",
        (("fedlora/web.py", "        if method in READ or (method == \"POST\"", "        if True or (method == \"POST\""),),
        VIEW_TESTS, "changes_nothing or only_get",
    ),
    Mutation(
        "view-exposed-without-tls-or-token",
        "a view binds a reachable address without TLS and a token",
        (("fedlora/exposure.py", "    if missing and not is_loopback(host):", "    if False:"),),
        VIEW_TESTS, "refuses_to_start or needs_tls",
    ),
    Mutation(
        "view-certificate-from-any-ca",
        "the dashboard serves a certificate the consortium CA did not issue",
        (("fedlora/web.py", "    if tls_cert and ca:\n        check_issued_by(tls_cert, ca)", "    if False:\n        check_issued_by(tls_cert, ca)"),),
        VIEW_TESTS, "refuses_to_start",
    ),
    Mutation(
        "view-verification-never-refreshed",
        "a version verified once is shown as verifying after its files change",
        (("coordinator/observe.py", "    return list(verified(str(directory), file_stamp(directory), public_key))",
          "    return list(verified(str(directory), (), public_key))"),),
        VIEW_TESTS, "tampered",
    ),
    Mutation(
        "served-version-unverified",
        "export and generate use a version whose signature or hashes do not verify",
        (("fedlora/registry.py", "    if problems:\n        raise ValueError(f\"{directory} does not verify, refusing to {purpose}",
          "    if False:\n        raise ValueError(f\"{directory} does not verify, refusing to {purpose}"),),
        SERVING_TESTS, "tampered or does_not_verify",
    ),
    Mutation(
        "served-on-another-base",
        "merged and gguf exports and generate run on a base with another fingerprint than the signed one",
        (("fedlora/export.py", "    if actual != expected_sha256:", "    if False:"),),
        SERVING_TESTS, "another",
    ),
    Mutation(
        "answers-in-another-format",
        "fedlora generate asks in the built-in format whatever prompt format the signed manifest records",
        (("fedlora/generate.py", "    prompt_format = format_from_facts(facts)", "    prompt_format = PromptFormat()"),),
        ("tests/test_prompts.py",), "manifest_records or records_its_format",
    ),
    Mutation(
        "loss-on-the-whole-conversation",
        "the loss covers the system prompt, the questions and the template's headers, not only assistant turns",
        (("fedlora/prompts.py", "        labels += piece if trained else [-100] * len(piece)", "        labels += piece"),),
        ("tests/test_prompts.py",), "only_assistant or every_assistant_turn",
    ),
    Mutation(
        "sb-basis-unchecked",
        "a site in lora.mode='sb' trains from a global adapter whose A or B is not on its own fixed basis",
        (("fedlora/aggregate/sb.py", "        self.check_global(global_vector, layout)\n", "        pass\n"),),
        ("tests/test_sb_mode.py",), "another_basis",
    ),
    Mutation(
        "split-uploads-the-local-part",
        "a split adapter's site-kept tensors (head or lora_B) travel and move on the server with the shared ones",
        (("fedlora/aggregate/split.py",
          "        return self.inner.upload_layout(layout, rank).select(lambda name: not SPLITS[self.split](name))",
          "        return self.inner.upload_layout(layout, rank)"),),
        ("tests/test_split_adapter.py",), "shared_tensors or only_the_shared_part",
    ),
    Mutation(
        "own-part-not-restored",
        "a split adapter's site trains its own part from the global round-0 values every round",
        (("participant/runtime.py",
          "    if own_part is not None:\n        start = runtime.layout.put(",
          "    if False:\n        start = runtime.layout.put("),),
        ("tests/test_split_adapter.py",), "restarted",
    ),
    Mutation(
        "claimed-losses-unchecked",
        "a site's claimed losses (train, eval, personal) are averaged whatever number they are",
        (("fedlora/aggregate/weights.py",
          "        if number and math.isfinite(score) and 0.0 <= score <= upper and math.isfinite(count) and count > 0:",
          "        if number and (upper == math.inf or (math.isfinite(score) and 0.0 <= score <= upper)) and count > 0:"),),
        ("tests/test_weights.py", "tests/test_personalization.py"), "loss or lying",
    ),
]

ISOLATION_TESTS = ("tests/test_isolation.py",)
MUTATIONS += [
    Mutation(
        "isolated-release-without-noise",
        "an isolated member sends the input it masked without noise of its own",
        (("participant/isolation.py",
          "masked_input if held[\"adversary\"] else masked_input + secret_rng().normal(0.0, z * clip_norm, size=masked_input.shape)",
          "masked_input"),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "isolated-releases-not-screened",
        "the coordinator sums every isolated release without screening it alone",
        (("coordinator/isolation.py", "    summed, failed = screen_units(singles, length, 0.0, clip_norm)", "    summed, failed = singles, []"),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "isolated-twice-in-a-round",
        "a site does not record its isolated release, so a coordinator can ask again",
        (("participant/isolation.py", "    remember_isolated(site, context.state, str(held[\"config_sha256\"]), server_round)\n", ""),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "isolation-past-the-runs-rounds",
        "a site releases alone in more rounds than the run accounts for",
        (("participant/isolation.py", "    elif len(done) >= allowed:", "    elif False:"),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "isolation-without-site-consent",
        "a deployed site releases alone whatever its policy.allow_isolation says",
        (("participant/isolation.py", "    if site is not None and not ledger.policy_of(site).allow_isolation:", "    if False:"),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "isolation-uncharged-by-the-site",
        "a deployed site's ledger keeps the bucket's charge alone after an isolated release",
        (("participant/isolation.py", "        ledger.record_charge(site, key, charge, costlier=True)\n", ""),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "isolation-reserve-not-accounted",
        "the accountant charges every round at z, isolated or not",
        (("fedlora/privacy/user_level.py",
          "        return self.noise_multiplier / math.sqrt(2.0) if rounds_before < self.isolation_rounds else self.noise_multiplier",
          "        return self.noise_multiplier"),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "isolated-release-unseen-by-the-coordinator-view",
        "a site's epsilon against the coordinator counts its bucket's sum only, not its isolated release",
        (("coordinator/rounds.py", "            seen[name] = combined_noise_multiplier(*(z for z in (seen.get(name), alone) if z is not None))", "            pass"),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "malformed-isolated-release-unblamed",
        "a member answering isolation with a malformed release is taken for one that refused, not blamed",
        (("coordinator/isolation.py", "    blamed = malformed | {r.members[0]: r.reason for r in failed}", "    blamed = {r.members[0]: r.reason for r in failed}"),),
        ISOLATION_TESTS, "",
    ),
    Mutation(
        "isolation-rounds-uncapped",
        "the coordinator isolates in more rounds than the accountant charged",
        (("coordinator/rounds.py", "        if not (self.dp and self.dp.may_isolate() and clip_norm):", "        if not (self.dp and clip_norm):"),),
        ISOLATION_TESTS, "",
    ),
]

def _copy_tree(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run(mutation: Mutation) -> tuple[str, str, float]:
    """Apply `mutation` to a fresh copy and run the tests: (verdict, first failing test, seconds)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        for file, old, new in mutation.edits:
            path = copy / file
            text = path.read_text()
            if old not in text:
                return "stale", f"{file}: the text to mutate is gone", 0.0
            path.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.command()],
            cwd=copy, env=env, capture_output=True, text=True,
        )
        seconds = time.perf_counter() - started
        failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
        if proc.returncode == 0:
            return "SURVIVED", "", seconds
        if not failed:
            return "error", proc.stdout[-400:] + proc.stderr[-400:], seconds
        return "caught", failed[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run one mutation by name")
    parser.add_argument("--group", choices=["secagg", "governance", "views", "isolation"], help="run one group (default: all)")
    parser.add_argument("--out", type=Path, help="write the result table (markdown) here")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only in (None, m.name) and args.group in (None, m.group)]
    if not chosen:
        parser.error(f"unknown mutation {args.only!r}; choose from {', '.join(m.name for m in MUTATIONS)}")
    rows = ["| mutation | what it breaks | result | first failing test |", "|---|---|---|---|"]
    survived = 0
    for mutation in chosen:
        verdict, test, seconds = run(mutation)
        survived += verdict != "caught"
        print(f"{mutation.name:32s} {verdict:9s} {seconds:6.1f} s  {test}", flush=True)
        rows.append(f"| `{mutation.name}` | {mutation.what} | {verdict} | `{test}` |")
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
