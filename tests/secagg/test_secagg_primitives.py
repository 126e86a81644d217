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


def test_agreement_is_symmetric_and_aead_binds_the_pair():
    a_priv, a_pub = crypto.generate_keypair()
    b_priv, b_pub = crypto.generate_keypair()
    key = crypto.share_key(a_priv, b_pub, "r1")
    assert key == crypto.share_key(b_priv, a_pub, "r1") != crypto.share_key(b_priv, a_pub, "r2")
    assert crypto.pairwise_seed(a_priv, b_pub, "r1") != key
    blob = crypto.encrypt(key, b"shares", crypto.associated_data("r1", 1, 2))
    assert crypto.decrypt(key, blob, crypto.associated_data("r1", 1, 2)) == b"shares"
    for aad in [("r1", 1, 3), ("r1", 2, 1), ("r2", 1, 2)]:
        with pytest.raises(InvalidTag):
            crypto.decrypt(key, blob, crypto.associated_data(*aad))


def test_message_round_trip_and_type_check():
    msg = MaskedInput("r", 4, np.arange(5, dtype=np.uint32))
    back = MaskedInput.from_dict(msg.to_dict())
    assert back.sender == 4 and np.array_equal(back.masked, msg.masked)
    bad = dict(msg.to_dict(), masked=np.zeros(5, np.float64))
    with pytest.raises(SecAggProtocolError, match="participant 4") as err:
        MaskedInput.from_dict(bad, sender=4)
    assert err.value.participant == 4
