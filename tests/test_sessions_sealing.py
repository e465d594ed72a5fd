"""
Tests for `twistauth.sessions.sealing` (checklist group H at the sealing
layer: 76 tamper/truncate/short/foreign key/unknown version, 77 nonces, 78
purpose binding, 79 time inside the seal, 80 the keyring, 83 key rules).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twistauth.sessions.sealing import (
    KEY_ID_BYTES,
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
