"""Run moto in server mode (S3, DynamoDB, KMS; every region on one port).

Started by scripts/moto.sh. Before serving, it mends two of moto 5.2.5's gaps:

- It widens the key-id field of moto's KMS ciphertext format from 36 to 40
  bytes: moto stores the key id of a ciphertext in a fixed 36-byte field, which
  truncates multi-region key ids ("mrk-" + 36 characters) so that Decrypt of
  their ciphertexts fails.
- It runs DynamoDB's writes one at a time: moto checks a write's condition and
  then writes, on whichever server thread took the request, so two concurrent
  conditional writes to one item could both pass, which DynamoDB never allows.
"""

import functools
import struct
import sys
import threading

import moto.kms.utils as kms_utils
from moto.dynamodb.models import DynamoDBBackend
from moto.server import main

KEY_ID_LEN = 40
kms_utils.KEY_ID_LEN = KEY_ID_LEN
kms_utils.HEADER_LEN = KEY_ID_LEN + kms_utils.IV_LEN + kms_utils.TAG_LEN
kms_utils.CIPHERTEXT_HEADER_FORMAT = (
    f">{KEY_ID_LEN}s{kms_utils.IV_LEN}s{kms_utils.TAG_LEN}s"
)


# moto calls this with the keyword argument ciphertext_blob: keep the parameter name.
def _deserialize_ciphertext_blob(ciphertext_blob: bytes) -> "kms_utils.Ciphertext":
    blob = ciphertext_blob
    header = blob[: kms_utils.HEADER_LEN]
    key_id, iv, tag = struct.unpack(kms_utils.CIPHERTEXT_HEADER_FORMAT, header)
    return kms_utils.Ciphertext(
        key_id=key_id.rstrip(b"\0").decode("utf-8"),
        iv=iv,
        ciphertext=blob[kms_utils.HEADER_LEN :],
        tag=tag,
    )


kms_utils._deserialize_ciphertext_blob = _deserialize_ciphertext_blob

# Reentrant: a transaction's writes go through the single-item methods.
_DYNAMODB_WRITES = threading.RLock()


def _one_at_a_time(method):
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with _DYNAMODB_WRITES:
            return method(*args, **kwargs)

    return locked


for _name in ("put_item", "update_item", "delete_item", "transact_write_items"):
    setattr(DynamoDBBackend, _name, _one_at_a_time(getattr(DynamoDBBackend, _name)))

if __name__ == "__main__":
    main(sys.argv[1:])
