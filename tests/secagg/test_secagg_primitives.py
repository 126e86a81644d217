import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from fedlora.secagg import apply_mask, crypto, expand_mask
from fedlora.secagg.errors import SecAggProtocolError
from fedlora.secagg.messages import MaskedInput


def test_apply_mask_matches_expand_across_chunks():
    seed, d = os.urandom(32), 300_001  # more than one 1 MiB chunk, odd tail
    mask = expand_mask(seed, d)
    assert mask.dtype == np.uint32 and mask.shape == (d,)
    acc = np.arange(d, dtype=np.uint32)
    apply_mask(acc, seed, 1)
    np.testing.assert_array_equal(acc, np.arange(d, dtype=np.uint32) + mask)
    apply_mask(acc, seed, -1)
    np.testing.assert_array_equal(acc, np.arange(d, dtype=np.uint32))


def test_masks_are_deterministic_per_seed_and_need_full_seeds():
    a, b = os.urandom(32), os.urandom(32)
    np.testing.assert_array_equal(expand_mask(a, 1000), expand_mask(a, 1000))
    assert np.mean(expand_mask(a, 1000) == expand_mask(b, 1000)) < 0.01
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(a[:4], 10)


PARAMS = crypto.params_digest("run/round-1/bucket-0", [0, 1, 2], 2, 10, 1.0, 100.0, 32, "ctx")


def test_pairwise_seeds_are_symmetric_and_bound_to_every_public_parameter():
    a_priv, a_pub = crypto.generate_keypair()
    b_priv, b_pub = crypto.generate_keypair()
    seed = crypto.pairwise_seed(a_priv, b_pub, PARAMS)
    assert seed == crypto.pairwise_seed(b_priv, a_pub, PARAMS)
    changed = [
        ("run/round-2/bucket-0", [0, 1, 2], 2, 10, 1.0, 100.0, 32, "ctx"),  # another round
        ("run/round-1/bucket-0", [0, 1, 3], 2, 10, 1.0, 100.0, 32, "ctx"),  # other members
        ("run/round-1/bucket-0", [0, 1, 2], 3, 10, 1.0, 100.0, 32, "ctx"),  # threshold
        ("run/round-1/bucket-0", [0, 1, 2], 2, 11, 1.0, 100.0, 32, "ctx"),  # vector length
        ("run/round-1/bucket-0", [0, 1, 2], 2, 10, 1.5, 100.0, 32, "ctx"),  # clip norm
        ("run/round-1/bucket-0", [0, 1, 2], 2, 10, 1.0, 100.0000001, 32, "ctx"),  # scale
        ("run/round-1/bucket-0", [0, 1, 2], 2, 10, 1.0, 100.0, 16, "ctx"),  # modulus
        ("run/round-1/bucket-0", [0, 1, 2], 2, 10, 1.0, 100.0, 32, "ctx2"),  # weight reference
    ]
    for fields in changed:
        assert crypto.pairwise_seed(a_priv, b_pub, crypto.params_digest(*fields)) != seed, fields


def test_a_sealed_bundle_opens_only_for_its_pair_parameters_and_key():
    r_priv, r_pub = crypto.generate_keypair()
    s_pub = crypto.generate_keypair()[1]
    blob = crypto.seal_bundle(r_pub, b"shares", PARAMS, 1, 2, s_pub)
    assert crypto.open_sealed(r_priv, blob, PARAMS, 1, 2, s_pub) == b"shares"
    other = crypto.params_digest("run/round-1/bucket-0", [0, 1, 2], 2, 10, 1.0, 100.0, 32, "other")
    for args in [(PARAMS, 1, 3, s_pub), (PARAMS, 2, 1, s_pub), (other, 1, 2, s_pub), (PARAMS, 1, 2, r_pub)]:
        with pytest.raises(InvalidTag):
            crypto.open_sealed(r_priv, blob, *args)
    with pytest.raises(InvalidTag):
        crypto.open_sealed(crypto.generate_keypair()[0], blob, PARAMS, 1, 2, s_pub)


def test_every_seal_uses_a_fresh_ephemeral_key_and_nonce():
    r_pub, s_pub = crypto.generate_keypair()[1], crypto.generate_keypair()[1]
    blobs = [crypto.seal_bundle(r_pub, b"same", PARAMS, 1, 2, s_pub) for _ in range(2)]
    key_end, nonce_end = crypto.KEY_BYTES, crypto.KEY_BYTES + crypto.NONCE_BYTES
    assert blobs[0][:key_end] != blobs[1][:key_end]
    assert blobs[0][key_end:nonce_end] != blobs[1][key_end:nonce_end]


# Low-order points of Curve25519 (u = 0, 1, and the order-8 points), canonical encodings.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 20).to_bytes(32, "little"),  # u = p - 1
]


@pytest.mark.parametrize("low", LOW_ORDER, ids=["u=0", "u=1", "order-8a", "order-8b", "u=p-1"])
def test_low_order_keys_are_refused_wherever_they_are_used(low):
    priv, pub = crypto.generate_keypair()
    with pytest.raises(ValueError, match="low order"):
        crypto.pairwise_seed(priv, low, PARAMS)
    with pytest.raises(ValueError, match="low order"):
        crypto.seal_bundle(low, b"x", PARAMS, 1, 2, pub)
    with pytest.raises(ValueError, match="low order"):
        crypto.check_possession(priv, [low], bytes(32), PARAMS, 1)


def test_non_canonical_encodings_of_a_key_are_refused():
    pub = crypto.generate_keypair()[1]
    with_top_bit = pub[:-1] + bytes([pub[-1] | 0x80])  # X25519 ignores bit 255: same point
    for key in (with_top_bit, (2**255 - 19).to_bytes(32, "little"), pub[:31]):
        with pytest.raises(ValueError, match="canonical|32 bytes"):
            crypto.check_public_key(key)
    crypto.check_public_key(pub)


def test_possession_is_proved_only_with_every_private_key():
    server_priv, server_pub = crypto.generate_keypair()
    mine = [crypto.generate_keypair() for _ in range(3)]
    proof = crypto.possession_proof([p for p, _ in mine], server_pub, PARAMS, 4)
    publics = [q for _, q in mine]
    crypto.check_possession(server_priv, publics, proof, PARAMS, 4)
    copied = [publics[0], crypto.generate_keypair()[1], publics[2]]  # someone else's key in the middle
    for args in [(copied, proof, PARAMS, 4), (publics, proof, PARAMS, 5), (publics, proof, crypto.params_digest("x", [0], 1, 1, 1.0, 1.0, 32, ""), 4)]:
        with pytest.raises(ValueError, match="does not verify"):
            crypto.check_possession(server_priv, *args)


def test_message_round_trip_and_type_check():
    msg = MaskedInput("r", 4, np.arange(5, dtype=np.uint32), [], [])
    back = MaskedInput.from_dict(msg.to_dict())
    assert back.sender == 4 and np.array_equal(back.masked, msg.masked)
    bad = dict(msg.to_dict(), masked=np.zeros(5, np.float64))
    with pytest.raises(SecAggProtocolError, match="participant 4") as err:
        MaskedInput.from_dict(bad, sender=4)
    assert err.value.participant == 4
