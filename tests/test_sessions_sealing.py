"""
Tests for `twistauth.sessions.sealing` (checklist group H at the sealing
layer: 76 tamper/truncate/short/foreign key/unknown version, 77 nonces, 78
purpose binding, 79 time inside the seal, 80 the keyring, 83 key rules).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import random
import re
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twistauth.sessions import sealing
from twistauth.sessions.sealing import (
    KEY_ID_BYTES,
    MAX_OPENED,
    MAX_PURPOSES,
    MIN_SEALED_BYTES,
    NONCE_BYTES,
    VERSION,
    BadSeal,
    ExpiredSeal,
    FutureSeal,
    Keyring,
    KeyringError,
    MalformedSeal,
    Sealer,
    TamperedSeal,
    UnknownKey,
    UnknownVersion,
    check_key,
    decode_key,
    generate_key,
    key_id,
    load_keys,
)

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
K3 = os.urandom(32)
NOW = 1_700_000_000.0
PURPOSE = "twistauth session/cookie"
PAYLOAD = {"id": "abc", "d": {"cart": ["book"], "n": 7}}


def _sealer(*keys: bytes) -> Sealer:
    return Sealer(keyring=Keyring(list(keys or (K1,))))


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: Characters a base64 text must not hold: padding, the standard
#: alphabet's two, whitespace, and some that are not even ASCII.
NOT_ALPHABET = "=+/ \n\t.\x00é💥"


def _lenient(text: str) -> bytes:
    """
    What a forgiving decoder makes of ``text`` (it ignores unused bits).
    """
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _reference_b64decode(text: str) -> bytes:
    """
    The strict decoding `sealing._b64decode` must match: URL-safe alphabet
    only, then decode and re-encode, refusing a text that does not come
    back unchanged.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise MalformedSeal("not URL-safe base64")
    try:
        raw = _lenient(text)
    except (binascii.Error, ValueError):
        raise MalformedSeal("not URL-safe base64") from None
    if _text(raw) != text:
        raise MalformedSeal("not canonical base64")
    return raw


def _decodes_as(decode: object, text: str) -> object:
    try:
        return decode(text)  # type: ignore[operator]
    except MalformedSeal:
        return MalformedSeal


class SealTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        opened = sealer.unseal(token, purpose=PURPOSE, now=NOW + 59)
        self.assertEqual(opened.payload, PAYLOAD)
        self.assertEqual((opened.issued_at, opened.expires_at), (NOW, NOW + 60))
        self.assertFalse(opened.stale_key)

    def test_envelope(self) -> None:
        """
        ``version | key id | nonce | ciphertext+tag``, base64url without
        padding; the payload is not readable in it.
        """
        token = _sealer().seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        self.assertNotIn("=", token)
        raw = _raw(token)
        self.assertEqual(raw[0], VERSION)
        self.assertEqual(raw[1 : 1 + KEY_ID_BYTES], key_id(K1))
        self.assertNotIn(b"cart", raw)
        self.assertNotIn(b"book", raw)

    def test_nonces_are_random_and_unique(self) -> None:
        """
        Case 77: 12 fresh random bytes per seal: 10 000 seals of the same
        payload, 10 000 different nonces (and tokens).
        """
        sealer = _sealer()
        tokens = [sealer.seal(1, purpose=PURPOSE, now=NOW, lifetime=1) for _ in range(10_000)]
        nonces = {_raw(t)[1 + KEY_ID_BYTES : 1 + KEY_ID_BYTES + NONCE_BYTES] for t in tokens}
        self.assertEqual(len(nonces), 10_000)
        self.assertEqual(len(set(tokens)), 10_000)

    def test_every_bit_flip_fails(self) -> None:
        """
        Case 76: flipping any single bit of the sealed bytes, or changing
        any character of the text, never opens, and never raises anything
        but `BadSeal`.
        """
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        raw = _raw(token)
        for i in range(len(raw)):
            for bit in range(8):
                changed = bytearray(raw)
                changed[i] ^= 1 << bit
                self.assertIsNone(sealer.open(_text(bytes(changed)), purpose=PURPOSE, now=NOW))
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        for i in range(len(token)):
            other = alphabet[(alphabet.index(token[i]) + 1) % 64]
            changed_text = token[:i] + other + token[i + 1 :]
            self.assertIsNone(sealer.open(changed_text, purpose=PURPOSE, now=NOW), i)

    def test_truncation_and_extension_fail(self) -> None:
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        for n in range(len(token)):
            self.assertIsNone(sealer.open(token[:n], purpose=PURPOSE, now=NOW))
        for extra in ("A", "AA", "AAAA", "_", "=", "==", " ", "\n"):
            self.assertIsNone(sealer.open(token + extra, purpose=PURPOSE, now=NOW))

    def test_reasons(self) -> None:
        """
        Each way of failing is the `BadSeal` that names it (so the tests
        above fail for the reason they claim).
        """
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        raw = _raw(token)
        # Base64 whose unused low bits are set decodes, but is not the one
        # canonical text of its bytes.
        short = raw[: len(raw) - (len(raw) % 3) - 2]  # a length with padding bits
        text = _text(short)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        non_canonical = text[:-1] + alphabet[alphabet.index(text[-1]) | 1]
        cases = [
            ("", MalformedSeal),
            (token[:1], MalformedSeal),  # 1 character: never base64
            (token[: (len(token) // 4 - 1) * 4 + 1], MalformedSeal),  # length 4n+1
            (non_canonical, MalformedSeal),
            (_text(raw[: MIN_SEALED_BYTES - 1]), MalformedSeal),
            ("!" * 50, MalformedSeal),
            ("A" * 20000, MalformedSeal),
            (_text(bytes([VERSION + 1]) + raw[1:]), UnknownVersion),
            (_text(bytes([0]) + raw[1:]), UnknownVersion),
            (_text(raw[:1] + b"\x00" * KEY_ID_BYTES + raw[1 + KEY_ID_BYTES :]), UnknownKey),
            (_text(raw[:-1] + bytes([raw[-1] ^ 1])), TamperedSeal),
            (_text(raw[:-16]), TamperedSeal),  # tag cut off, still long enough
        ]
        for text, error in cases:
            with self.assertRaises(error, msg=text[:40]):
                sealer.unseal(text, purpose=PURPOSE, now=NOW)
        with self.assertRaises(MalformedSeal):
            sealer.unseal(None, purpose=PURPOSE, now=NOW)  # type: ignore[arg-type]

    def test_foreign_key(self) -> None:
        token = _sealer(K2).seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        with self.assertRaises(UnknownKey):
            _sealer(K1).unseal(token, purpose=PURPOSE, now=NOW)

    def test_foreign_key_with_the_same_id(self) -> None:
        """
        Even a value that names one of our key ids but was sealed with
        another key does not open (the tag is the check, not the id).
        """
        token = _sealer(K2).seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        raw = _raw(token)
        forged = raw[:1] + key_id(K1) + raw[1 + KEY_ID_BYTES :]
        with self.assertRaises(TamperedSeal):
            _sealer(K1).unseal(_text(forged), purpose=PURPOSE, now=NOW)

    def test_purpose_binds(self) -> None:
        """
        Case 78: a value sealed for one purpose (another cookie, the header,
        a login transaction) does not open for another.
        """
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose="twistauth session/cookie", now=NOW, lifetime=60)
        for other in (
            "twistauth session/header",
            "login-transaction",
            "",
            "twistauth session/cookie ",
        ):
            with self.assertRaises(TamperedSeal):
                sealer.unseal(token, purpose=other, now=NOW)

    def test_expiry_inside(self) -> None:
        """
        Case 79: ``exp`` is sealed inside: past it nothing opens, whatever
        the carrier claims.
        """
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        self.assertIsNotNone(sealer.open(token, purpose=PURPOSE, now=NOW + 59.9))
        with self.assertRaises(ExpiredSeal):
            sealer.unseal(token, purpose=PURPOSE, now=NOW + 60)

    def test_future_skew(self) -> None:
        """
        Case 79: a value sealed up to 5 minutes ahead of our clock opens
        (another process's clock), one further ahead does not.
        """
        sealer = _sealer()
        ahead = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW + 300, lifetime=600)
        self.assertIsNotNone(sealer.open(ahead, purpose=PURPOSE, now=NOW))
        too_far = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW + 301, lifetime=600)
        with self.assertRaises(FutureSeal):
            sealer.unseal(too_far, purpose=PURPOSE, now=NOW)

    def test_keyring_rotation(self) -> None:
        """
        Case 80: the newest key seals, every key opens, and a value from an
        older key says it should be sealed again; a removed key's values do
        not open.
        """
        old = _sealer(K1)
        rotated = _sealer(K2, K1)
        token = old.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        opened = rotated.unseal(token, purpose=PURPOSE, now=NOW)
        self.assertTrue(opened.stale_key)
        fresh = rotated.seal(opened.payload, purpose=PURPOSE, now=NOW, lifetime=60)
        self.assertEqual(_raw(fresh)[1 : 1 + KEY_ID_BYTES], key_id(K2))
        self.assertFalse(rotated.unseal(fresh, purpose=PURPOSE, now=NOW).stale_key)
        retired = _sealer(K2)
        self.assertIsNone(retired.open(token, purpose=PURPOSE, now=NOW))
        self.assertIsNotNone(retired.open(fresh, purpose=PURPOSE, now=NOW))

    def test_payload_is_json(self) -> None:
        """
        Never pickle: the plaintext is JSON, and a payload JSON cannot hold
        is refused at sealing.
        """
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        raw = _raw(token)
        nonce = raw[1 + KEY_ID_BYTES : 1 + KEY_ID_BYTES + NONCE_BYTES]
        aad = b"twistauth seal\x00" + PURPOSE.encode() + b"\x00" + raw[: 1 + KEY_ID_BYTES]
        plaintext = AESGCM(K1).decrypt(nonce, raw[1 + KEY_ID_BYTES + NONCE_BYTES :], aad)
        self.assertEqual(json.loads(plaintext), {"iat": NOW, "exp": NOW + 60, "p": PAYLOAD})
        for bad in (object(), b"x", float("inf")):
            with self.assertRaises(TypeError):
                sealer.seal(bad, purpose=PURPOSE, now=NOW, lifetime=60)

    def test_pickle_inside_a_valid_seal_is_not_run(self) -> None:
        """
        A correctly sealed plaintext that is a pickle (as Toto's cache
        stored) is refused, and nothing in it runs.
        """
        import pickle

        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        ran = []

        class Evil:
            def __reduce__(self) -> object:
                return (ran.append, ("ran",))

        plaintext = pickle.dumps(Evil())
        nonce = os.urandom(NONCE_BYTES)
        header = bytes([VERSION]) + key_id(K1)
        aad = b"twistauth seal\x00" + PURPOSE.encode() + b"\x00" + header
        token = _text(header + nonce + AESGCM(K1).encrypt(nonce, plaintext, aad))
        with self.assertRaises(TamperedSeal):
            _sealer().unseal(token, purpose=PURPOSE, now=NOW)
        self.assertEqual(ran, [])

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(max_size=600), st.binary(max_size=600).map(_text)))
    def test_arbitrary_input_never_raises(self, text: str) -> None:
        self.assertIsNone(_sealer().open(text, purpose=PURPOSE, now=NOW))

    def test_every_non_canonical_last_character_is_refused(self) -> None:
        """
        Case 76: for a token of each length modulo 4, every other last
        character that a forgiving decoder reads as the same bytes (its
        unused low bits set) is refused as malformed; the token itself
        opens.
        """
        sealer = _sealer()
        seen = {}
        for size in range(40):
            token = sealer.seal("x" * size, purpose=PURPOSE, now=NOW, lifetime=60)
            raw = _raw(token)
            alternatives = [
                token[:-1] + c
                for c in ALPHABET
                if c != token[-1] and _lenient(token[:-1] + c) == raw
            ]
            seen[len(token) % 4] = len(alternatives)
            for text in alternatives:
                with self.assertRaises(MalformedSeal, msg=text[-8:]):
                    sealer.unseal(text, purpose=PURPOSE, now=NOW)
                self.assertIsNone(sealer.open(text, purpose=PURPOSE, now=NOW))
                self.assertIsNone(sealer.open_payload(text, purpose=PURPOSE, now=NOW))
            self.assertEqual(sealer.unseal(token, purpose=PURPOSE, now=NOW).payload, "x" * size)
        # 4 unused bits leave 15 other texts, 2 leave 3, none leave none.
        self.assertEqual(seen, {0: 0, 2: 15, 3: 3})

    def test_open_payload(self) -> None:
        """
        `Sealer.open_payload` answers what `Sealer.open` does, as
        ``(payload, stale_key)``, and ``None`` whenever `open` does.
        """
        old, rotated = _sealer(K1), _sealer(K2, K1)
        token = old.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        self.assertEqual(old.open_payload(token, purpose=PURPOSE, now=NOW), (PAYLOAD, False))
        self.assertEqual(rotated.open_payload(token, purpose=PURPOSE, now=NOW), (PAYLOAD, True))
        for text, purpose, now in (
            (token, PURPOSE, NOW + 60),  # expired
            (token, "other", NOW),
            (token[:-2], PURPOSE, NOW),
            (token + "A", PURPOSE, NOW),
            ("", PURPOSE, NOW),
        ):
            self.assertIsNone(old.open(text, purpose=purpose, now=now))
            self.assertIsNone(old.open_payload(text, purpose=purpose, now=now))
        self.assertIsNone(_sealer(K2).open_payload(token, purpose=PURPOSE, now=NOW))

    def test_data_after_the_payload_does_not_open(self) -> None:
        """
        A correctly sealed plaintext that is not exactly one JSON document
        is refused, as `json.loads` would (on every interpreter).
        """
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        header = bytes([VERSION]) + key_id(K1)
        aad = b"twistauth seal\x00" + PURPOSE.encode() + b"\x00" + header
        inner = json.dumps({"iat": NOW, "exp": NOW + 60, "p": 1})
        for plaintext, opens in (
            (inner, True),
            (f" {inner}\n", True),  # whitespace around: json.loads reads it
            (inner + "x", False),
            (inner + inner, False),
            (inner[:-1], False),
            ("[1, 2]", False),
        ):
            nonce = os.urandom(NONCE_BYTES)
            sealed = AESGCM(K1).encrypt(nonce, plaintext.encode(), aad)
            token = _text(header + nonce + sealed)
            if opens:
                self.assertEqual(_sealer().unseal(token, purpose=PURPOSE, now=NOW).payload, 1)
            else:
                with self.assertRaises(TamperedSeal, msg=plaintext):
                    _sealer().unseal(token, purpose=PURPOSE, now=NOW)


class Base64Tests(SynchronousTestCase):
    """
    `sealing._b64decode` accepts exactly the texts, and answers exactly
    the bytes, of decoding and re-encoding (`_reference_b64decode`).
    """

    def assertSame(self, text: str) -> None:
        self.assertEqual(
            _decodes_as(sealing._b64decode, text), _decodes_as(_reference_b64decode, text), text
        )

    def test_every_short_text(self) -> None:
        characters = ALPHABET + NOT_ALPHABET
        for size in range(3):
            for chars in itertools.product(characters, repeat=size):
                self.assertSame("".join(chars))

    def test_every_last_two_characters(self) -> None:
        """
        After prefixes of every length modulo 4, every pair of last
        characters (the last one's unused bits included).
        """
        characters = ALPHABET + NOT_ALPHABET
        rng = random.Random(76)
        for size in range(2, 12):
            prefix = "".join(rng.choice(ALPHABET) for _ in range(size - 2))
            for a, b in itertools.product(characters, repeat=2):
                self.assertSame(prefix + a + b)

    def test_canonical_texts_decode(self) -> None:
        for size in range(64):
            raw = os.urandom(size)
            self.assertEqual(sealing._b64decode(_text(raw)), raw)

    def test_non_canonical_messages(self) -> None:
        with self.assertRaisesRegex(MalformedSeal, "not canonical"):
            sealing._b64decode("AB")  # 0b000001: an unused bit set
        for text in ("AAAA=", "AA==", "AA+A", "AA/A", "AA A", "AAAAA", "AAé"):
            with self.assertRaisesRegex(MalformedSeal, "not URL-safe"):
                sealing._b64decode(text)

    @settings(max_examples=500, deadline=None)
    @given(
        st.one_of(
            st.text(alphabet=ALPHABET + NOT_ALPHABET, max_size=40),
            st.binary(max_size=40).map(_text),
            st.tuples(st.binary(max_size=40), st.sampled_from(ALPHABET)).map(
                lambda pair: _text(pair[0])[:-1] + pair[1]
            ),
        )
    )
    def test_same_as_reference(self, text: str) -> None:
        self.assertSame(text)


class JSONTests(SynchronousTestCase):
    """
    The plaintext decoder answers exactly what `json.loads` answers.
    """

    def test_same_as_json_loads(self) -> None:
        for text in (
            '{"a":1}',
            ' {"a":1}',
            '{"a":1} \n',
            '{"a":1}x',
            '{"a":1}{"a":1}',
            '{"a":',
            "",
            "   ",
            "\ufeff{}",
            "NaN",
            '"\\ud800"',
            "[1,2.5,null,true]",
        ):
            for loads in (sealing._json_loads, sealing._loads):
                try:
                    expected: object = json.loads(text)
                except ValueError as e:
                    expected = type(e)
                try:
                    got: object = loads(text)
                except ValueError as e:
                    got = type(e)
                if expected != expected:  # NaN
                    self.assertNotEqual(got, got, text)
                else:
                    self.assertEqual(got, expected, text)


class PurposeKeysTests(SynchronousTestCase):
    """
    What `Keyring.for_purpose` computes once per purpose.
    """

    def test_kept_and_exact(self) -> None:
        keyring = Keyring([K2, K1])
        keys = keyring.for_purpose(PURPOSE)
        self.assertIs(keyring.for_purpose(PURPOSE), keys)
        self.assertIsNot(keyring.for_purpose(PURPOSE + " "), keys)
        self.assertEqual(keys.header, bytes([VERSION]) + key_id(K2))
        self.assertEqual(set(keys.openers), {key_id(K1), key_id(K2)})
        for key, stale in ((K2, False), (K1, True)):
            cipher, aad, is_stale = keys.openers[key_id(key)]
            self.assertIs(cipher, keyring._ciphers[key_id(key)])
            self.assertEqual(
                aad, b"twistauth seal\x00" + PURPOSE.encode() + b"\x00\x01" + key_id(key)
            )
            self.assertEqual(is_stale, stale)
        self.assertEqual((keys.cipher, keys.aad), keys.openers[key_id(K2)][:2])
        self.assertNotIn(repr(K1), repr(keys))

    def test_bounded(self) -> None:
        """
        However many purposes are used, at most `MAX_PURPOSES` are kept,
        and every purpose still seals and opens correctly (and only for
        itself).
        """
        sealer = _sealer()
        purposes = [f"purpose {n}" for n in range(3 * MAX_PURPOSES)]
        tokens = [sealer.seal(n, purpose=p, now=NOW, lifetime=60) for n, p in enumerate(purposes)]
        self.assertLessEqual(len(sealer.keyring._purposes), MAX_PURPOSES)
        for n, (purpose, token) in enumerate(zip(purposes, tokens)):
            self.assertEqual(sealer.unseal(token, purpose=purpose, now=NOW).payload, n)
            other = purposes[n - 1]
            self.assertIsNone(sealer.open(token, purpose=other, now=NOW))
        self.assertLessEqual(len(sealer.keyring._purposes), MAX_PURPOSES)


class CountingCipher:
    """
    A cipher that counts its decryptions (an ``AESGCM`` cannot be patched).
    """

    def __init__(self, cipher: object) -> None:
        self.cipher = cipher
        self.decrypted = 0

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        self.decrypted += 1
        return self.cipher.decrypt(nonce, data, aad)  # type: ignore[attr-defined, no-any-return]


class OpenedTests(SynchronousTestCase):
    """
    What a `Sealer` remembers of the values it opened: it spares the
    decryption of a value presented again, and nothing else.
    """

    def counting(self, sealer: Sealer, purpose: str = PURPOSE) -> CountingCipher:
        keys = sealer.keyring.for_purpose(purpose)
        ident = sealer.keyring.sealing_id
        cipher, aad, stale = keys.openers[ident]
        counting = CountingCipher(cipher)
        keys.openers[ident] = (counting, aad, stale)  # type: ignore[assignment]
        return counting

    def test_opened_again_without_decrypting(self) -> None:
        """
        The same text opens again without a decryption, into objects of
        its own (a caller may change what it got).
        """
        sealer = _sealer()
        counting = self.counting(sealer)
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        first = sealer.unseal(token, purpose=PURPOSE, now=NOW)
        first.payload["d"]["cart"].append("pen")
        second = sealer.unseal(token, purpose=PURPOSE, now=NOW + 1)
        self.assertEqual(counting.decrypted, 1)
        self.assertEqual(second.payload, PAYLOAD)
        self.assertEqual((second.issued_at, second.expires_at), (NOW, NOW + 60))
        self.assertEqual(sealer.open_payload(token, purpose=PURPOSE, now=NOW), (PAYLOAD, False))
        self.assertEqual(counting.decrypted, 1)

    def test_times_are_checked_on_every_open(self) -> None:
        """
        A remembered value still expires at its ``exp``, and is then
        forgotten; one sealed too far ahead of the clock is refused, even
        once it opened on a clock further on.
        """
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        self.assertIsNotNone(sealer.open(token, purpose=PURPOSE, now=NOW))
        self.assertIn(token, sealer._opened)
        with self.assertRaises(ExpiredSeal):
            sealer.unseal(token, purpose=PURPOSE, now=NOW + 60)
        self.assertNotIn(token, sealer._opened)
        ahead = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW + 301, lifetime=600)
        for _ in range(2):
            with self.assertRaises(FutureSeal):
                sealer.unseal(ahead, purpose=PURPOSE, now=NOW)
        self.assertIsNotNone(sealer.open(ahead, purpose=PURPOSE, now=NOW + 1))
        with self.assertRaises(FutureSeal):
            sealer.unseal(ahead, purpose=PURPOSE, now=NOW)

    def test_only_for_its_purpose(self) -> None:
        """
        A value remembered for one purpose still does not open for
        another, nor once its purpose's keys were dropped and made again
        (`MAX_PURPOSES`) without decrypting it again.
        """
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        self.assertIsNotNone(sealer.open(token, purpose=PURPOSE, now=NOW))
        with self.assertRaises(TamperedSeal):
            sealer.unseal(token, purpose="twistauth session/header", now=NOW)
        for n in range(MAX_PURPOSES):
            sealer.keyring.for_purpose(f"purpose {n}")
        counting = self.counting(sealer)
        self.assertEqual(sealer.unseal(token, purpose=PURPOSE, now=NOW).payload, PAYLOAD)
        self.assertEqual(counting.decrypted, 1)

    def test_stale_key_is_remembered(self) -> None:
        token = _sealer(K1).seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        rotated = _sealer(K2, K1)
        for _ in range(2):
            self.assertTrue(rotated.unseal(token, purpose=PURPOSE, now=NOW).stale_key)

    def test_only_values_that_open(self) -> None:
        sealer = _sealer()
        token = sealer.seal(PAYLOAD, purpose=PURPOSE, now=NOW, lifetime=60)
        raw = _raw(token)
        for text, purpose, now in (
            (_text(raw[:-1] + bytes([raw[-1] ^ 1])), PURPOSE, NOW),
            (token, "other", NOW),
            (token, PURPOSE, NOW + 60),
            (token[:-2], PURPOSE, NOW),
        ):
            self.assertIsNone(sealer.open(text, purpose=purpose, now=now))
        self.assertEqual(sealer._opened, {})

    def test_bounded(self) -> None:
        """
        At most `MAX_OPENED` values are remembered (here made smaller);
        every one still opens once they are forgotten.
        """
        self.patch(sealing, "MAX_OPENED", 8)
        sealer = _sealer()
        tokens = [sealer.seal(n, purpose=PURPOSE, now=NOW, lifetime=60) for n in range(20)]
        for n, token in enumerate(tokens):
            self.assertEqual(sealer.unseal(token, purpose=PURPOSE, now=NOW).payload, n)
            self.assertLessEqual(len(sealer._opened), 8)
        for n, token in enumerate(tokens):
            self.assertEqual(sealer.unseal(token, purpose=PURPOSE, now=NOW).payload, n)
        self.assertGreater(MAX_OPENED, 1000)


class KeyTests(SynchronousTestCase):
    """
    Case 83: a key is exactly 32 random bytes; nothing else starts.
    """

    def test_lengths(self) -> None:
        for n in (0, 16, 24, 31, 33, 64):
            with self.assertRaises(KeyringError):
                check_key(os.urandom(n))
        self.assertEqual(check_key(K1), K1)

    def test_patterns_and_passphrases(self) -> None:
        for key in (b"\x00" * 32, b"a" * 32, b"abcd" * 8, b"passwordpasswordpasswordpassword"):
            with self.assertRaises(KeyringError):
                check_key(key)
        with self.assertRaises(KeyringError):
            check_key("x" * 32)  # type: ignore[arg-type]

    def test_decode_forms(self) -> None:
        urlsafe = base64.urlsafe_b64encode(K3).decode()
        standard = base64.b64encode(K3).decode()
        for text in (
            urlsafe,
            urlsafe.rstrip("="),
            standard,
            standard.rstrip("="),
            f"  {urlsafe}\n",
        ):
            self.assertEqual(decode_key(text), K3)
        self.assertEqual(decode_key(generate_key()).__len__(), 32)

    def test_decode_refuses(self) -> None:
        for text in (
            "",
            "not base64!",
            base64.b64encode(os.urandom(31)).decode(),
            base64.b64encode(os.urandom(33)).decode(),
            "correct horse battery staple",
        ):
            with self.assertRaises(KeyringError):
                decode_key(text)

    def test_key_files(self) -> None:
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "k")
        with open(path, "w") as f:
            f.write(base64.urlsafe_b64encode(K3).decode() + "\n")
        self.assertEqual(load_keys([f"file:{path}", base64.b64encode(K1).decode()]), [K3, K1])
        with self.assertRaises(KeyringError) as caught:
            decode_key(f"file:{path}.missing")
        self.assertIn("cannot read", str(caught.exception))
        with open(path, "wb") as f:
            f.write(K3)  # raw bytes are not accepted: the file holds base64 text
        with self.assertRaises(KeyringError):
            decode_key(f"file:{path}")

    def test_messages_never_show_the_key(self) -> None:
        short = base64.b64encode(b"Sup3rS3cretPassphrase!").decode()
        with self.assertRaises(KeyringError) as caught:
            decode_key(short)
        self.assertNotIn(short, str(caught.exception))
        self.assertNotIn("Sup3rS3cret", str(caught.exception))
        self.assertNotIn(repr(K1), repr(Keyring([K1])))

    def test_keyring_refuses_empty_and_duplicates(self) -> None:
        with self.assertRaises(KeyringError):
            Keyring([])
        with self.assertRaises(KeyringError):
            Keyring([K1, K2, K1])

    def test_key_ids_are_stable_and_distinct(self) -> None:
        self.assertEqual(key_id(K1), key_id(bytes(range(32))))
        self.assertNotEqual(key_id(K1), key_id(K2))
        self.assertEqual(len(key_id(K1)), KEY_ID_BYTES)
        self.assertNotIn(key_id(K1), K1)


def test_bad_seal_tree() -> None:
    for cls in (MalformedSeal, UnknownVersion, UnknownKey, TamperedSeal, ExpiredSeal, FutureSeal):
        assert issubclass(cls, BadSeal)
